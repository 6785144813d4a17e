"""What a format is to the core: an opened source `Checkpoint`, the `OutputTensor`s and
`OutputFile`s a plan writes, the `WriteOptions` and `Writer` that write them, and the `Format`
protocol every format folder implements. It names no format, so the core can depend on it
without loading any."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .archs import Model
from .io import TensorSource
from .rules import Rule


@dataclass
class Checkpoint:
    """An opened source checkpoint: its model, its tensors, and how they map to the hub."""

    path: Path
    format: "Format"
    variant: str
    model: Model
    source: TensorSource
    rules: list[Rule]
    side_files: list[Path] = field(default_factory=list)
    generation_config: dict | None = None
    notes: list[str] = field(default_factory=list)
    # stored tensors the format itself sets aside (e.g. optimizer state), with why
    dropped: dict[str, str] = field(default_factory=dict)
    # what reading it this way approximates (an architecture change under --allow-approximate)
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.source.close()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # a second name for the tensor before it (tied weights): stored once, so no bytes of its own
    alias: bool = False

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass
class OutputFile:
    name: str
    tensors: list[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if not t.alias)


@dataclass
class WriteOptions:
    max_shard_size: int = 5 * 10**9
    # a format's tensor layout variant (Format.layouts), None for its default
    layout: str | None = None
    # a format's file container (Format.containers), None for its default
    container: str | None = None
    # tensor- and pipeline-parallel sizes for formats that store per-rank files (a `tensor_parallel = True` adapter)
    tp: int = 1
    pp: int = 1
    # convert what the target can only approximate (with a warning) instead of refusing it
    allow_approximate: bool = False
    # checkpoint version a nanotron output declares (None: the format's default)
    nanotron_version: str | None = None
    # ONNX: the decoder also takes past keys/values and returns the present ones (a KV cache)
    with_past: bool = False


class Writer:
    """Receives the output tensors in plan order; `close` finishes the files."""

    def write_group(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass


class Format:
    name: str = ""
    title: str = ""
    # architectures (by Arch.name) this format can read and write
    archs: tuple[str, ...] = ()
    # architectures it can only read (a training checkpoint nothing writes), besides `archs`
    read_only_archs: tuple[str, ...] = ()
    # layout variants a format can be read and written in; the first is the default
    layouts: tuple[str, ...] = ()
    # file containers a format can write its tensors in; the first is the default
    containers: tuple[str, ...] = ()

    def detect(self, path: Path) -> bool:
        raise NotImplementedError

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        raise NotImplementedError

    def layouts_for(self, model: Model) -> tuple[str, ...]:
        """The layouts this model can be written in (all of the format's, unless they differ by model)."""
        return self.layouts

    def default_layout(self, model: Model) -> str | None:
        """The layout written when none is asked for (None: the format has only one)."""
        return self.layouts[0] if self.layouts else None

    def prepare(self, source: Checkpoint, options: WriteOptions) -> Checkpoint:
        """The source as this format will write it: a format whose model needs something the
        source lacks (LLaVA in transformers needs an image token) returns it with that added."""
        return source

    def check_write(self, model: Model, options: WriteOptions) -> list[str]:
        """Refuse (WeightportError) what this format cannot hold of the model with these options,
        before any work; returns warnings for what --allow-approximate lets through."""
        return []

    def write_notes(self, model: Model, options: WriteOptions) -> list[str]:
        """What writing this model changes that is not an approximation (e.g. padding the format
        adds and reading back removes); shown in the plan."""
        return []

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        """Expanded hub -> format rules for writing this model in `layout` for `tp` tensor-parallel
        ranks (what is stored can depend on it: Nanotron pads a vocabulary to a multiple of TP)."""
        raise NotImplementedError

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        """The output files and which tensors each holds, in write order (shards, per-rank files).
        Not `layouts`: those are arrangements of the tensors themselves (fused q/k/v, ...)."""
        raise NotImplementedError

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        raise NotImplementedError

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        """Config, tokenizer and other non-tensor files; returns the names written."""
        raise NotImplementedError

    def write_index(self, directory: Path, files: list[OutputFile], model: Model, dtype: torch.dtype,
                    options: WriteOptions) -> list[str]:
        """Files that say where each written tensor lies (an ONNX graph names its weights' byte
        offsets); most formats' weight files describe themselves. Returns the names written."""
        return []
