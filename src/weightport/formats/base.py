"""What a format adapter provides: detect, open (config + tensors + rules), and write."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..archs import Model
from ..io import TensorSource
from ..paths import check_regular
from ..rules import Rule
from ..staging import PARTIAL

# files a tokenizer may consist of, in any of the formats we handle; copied verbatim
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


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

    def layout(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
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


def write_hf_sidecar(directory: Path, source: Checkpoint, model: Model, config: dict | None = None) -> list[str]:
    """config.json (the hub's config, exact, or `config` when given), generation_config.json and
    the tokenizer files: all of the hf format's metadata, and what formats with configs of their
    own keep beside their weights so reading back loses nothing."""
    config = dict(model.config) if config is None else config
    write_json(directory / "config.json", dict(config, architectures=[model.arch.hf_class]))
    written = ["config.json"]
    if source.generation_config is not None:
        write_json(directory / "generation_config.json", source.generation_config)
        written.append("generation_config.json")
    return written + copy_side_files(source.side_files, directory)


def final_dir(directory: Path) -> Path:
    """The path an output directory will have: execute writes into .<name>.weightport-partial-<pid>
    and renames it at the end, and some configs must name the final path."""
    name = directory.name
    if name.startswith(".") and PARTIAL in name:
        name = name[1:].rsplit(PARTIAL, 1)[0]
    return (directory.parent / name).resolve()


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_side_files(files: list[Path], directory: Path, skip: set[str] = frozenset()) -> list[str]:
    written = []
    for f in files:
        if f.name in skip:
            continue
        check_regular(f)  # a FIFO blocks the copy and /dev/zero never ends it
        shutil.copyfile(f, directory / f.name)
        written.append(f.name)
    return written


# what trust_remote_code checkpoints (ChatGLM, Baichuan2, InternLM, Qwen, CogVLM2) run from: their
# modeling/configuration/tokenization modules and Qwen's tokenizer table; copied, never imported
REMOTE_CODE_FILES = ("*.py", "*.tiktoken")


def find_side_files(directory: Path) -> list[Path]:
    named = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    code = sorted(p for pattern in REMOTE_CODE_FILES for p in directory.glob(pattern) if p.is_file())
    return named + code
