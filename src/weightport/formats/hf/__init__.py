"""Hugging Face Transformers checkpoints: the hub format, so its rules are the identity."""

from __future__ import annotations

from pathlib import Path

import torch

from ...archs import ARCHS, Model, model_from_hf_config
from ...dtypes import short_name
from ...errors import WeightportError
from ...hf_config import load_json
from ...io import open_files
from ...paths import check_regular, confined
from ...io.safetensors_file import SafetensorsStreamWriter, safetensors_metadata
from ...rules import Rule, identity_rules
from ...format import Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions
from ..common import find_side_files, write_hf_sidecar, write_json

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The weight files to read, the index's weight_map if there is one, and the index path."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            weight_map = load_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightportError(f"{index}: has no weight_map")
            for tensor, shard in weight_map.items():
                if not isinstance(shard, str):
                    raise WeightportError(f"{index}: weight_map gives tensor {tensor} the shard {shard!r}, not a "
                                          "file name")
            files = []
            # every shard confined to the directory before any is opened
            for shard in dict.fromkeys(weight_map.values()):
                path = confined(directory, shard, str(index))
                check_regular(path)
                if not path.is_file():
                    tensor = next(t for t, s in weight_map.items() if s == shard)
                    raise WeightportError(f"{index}: names shard {shard} (for tensor {tensor}) which does not exist")
                files.append(path)
            return files, weight_map, index
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single], None, None
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, None, None
    raise WeightportError(f"{directory}: no model.safetensors, pytorch_model.bin or index found")


def _stored_names(model: Model, stored: dict) -> tuple[list[Rule], dict[str, str]]:
    """Rules from the hub names to the names this checkpoint uses (an arch's aliases apply where the
    hub prefix is absent and the alias present), and stored tensors dropped as recomputed."""
    prefixes = [(hub, alt) for hub, alt in model.arch.aliases
                if not any(n.startswith(hub) for n in stored)
                and any(n.startswith(alt) and not n.startswith(hub) for n in stored)]

    def name(h: str) -> str:
        for hub, alt in prefixes:
            if h.startswith(hub):
                return alt + h.removeprefix(hub)
        return h

    rules = [Rule(h, name(h)) for h in model.hub_tensors()]
    dropped = {}
    for hub, alt in prefixes:
        for n in stored:
            if n.startswith(alt) and model.arch.is_droppable(hub + n.removeprefix(alt)):
                dropped[n] = "recomputed by the model"
    return rules, dropped


class HFFormat(Format):
    name = "hf"
    title = "Hugging Face Transformers (safetensors or pytorch_model.bin, config.json)"
    # LLaVA has its own formats (llava-hf adds what transformers needs to run it)
    archs = tuple(a for a in ARCHS if a != "llava")

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / "config.json").is_file()):
            return False
        if any((path / n).is_file() for n in (SAFE_INDEX, BIN_INDEX, "pytorch_model.bin")):
            return True
        # MindSpore writes safetensors too, marked format "ms"; those are the mindspore format's
        return any(safetensors_metadata(p).get("format") != "ms" for p in path.glob("*.safetensors"))

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        config_path = path / "config.json"
        config = load_json(config_path)
        model = model_from_hf_config(config, str(config_path))
        files, weight_map, index = _weight_files(path)
        source = open_files(files)
        if weight_map is not None:
            for tensor, shard in weight_map.items():
                meta = source.tensors.get(tensor)
                if meta is None or meta.file.name != shard:
                    source.close()
                    raise WeightportError(f"{index}: names tensor {tensor} in {shard}, but {shard} does not hold it")
        generation = path / "generation_config.json"
        variant = "safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin"
        rules, dropped = _stored_names(model, source.tensors)
        for hub, alt in model.arch.aliases:
            if any(r.hub[0].startswith(hub) and r.fmt[0] != r.hub[0] for r in rules):
                variant += f", base-model names (no {hub!r})" if not alt else f", names {alt!r}* for {hub!r}*"
        return Checkpoint(
            path=path, format=self, variant=f"{variant}, {len(files)} file(s)", model=model, source=source,
            rules=rules, dropped=dropped,
            side_files=find_side_files(path),
            generation_config=load_json(generation) if generation.is_file() else None,
        )

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        return identity_rules(list(model.hub_tensors()))

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        shards: list[list[OutputTensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > options.max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        if len(shards) == 1:
            return [OutputFile("model.safetensors", shards[0])]
        n = len(shards)
        return [OutputFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        return ShardedSafetensorsWriter(directory, files)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        # transformers 4.x reads torch_dtype; 5.x reads dtype and still accepts torch_dtype
        config = dict(model.config, dtype=short_name(dtype), torch_dtype=short_name(dtype))
        return write_hf_sidecar(directory, source, model, config)


class ShardedSafetensorsWriter(Writer):
    """Shards written in sequence; the index lists exactly what was written."""

    def __init__(self, directory: Path, files: list[OutputFile], metadata: dict[str, str] | None = None):
        self.directory = directory
        self.metadata = metadata or {"format": "pt"}
        self.files = files
        self._shard_of = {t.name: i for i, f in enumerate(files) for t in f.tensors}
        self._current: SafetensorsStreamWriter | None = None
        self._current_index = -1
        self._written: dict[str, str] = {}

    def _open(self, i: int) -> None:
        if self._current is not None:
            self._current.close()
        f = self.files[i]
        self._current = SafetensorsStreamWriter(
            self.directory / f.name, [(t.name, t.shape, t.dtype) for t in f.tensors], self.metadata)
        self._current_index = i

    def write_group(self, names, tensors):
        for name, tensor in zip(names, tensors):
            i = self._shard_of[name]
            if i != self._current_index:
                self._open(i)
            self._current.write(name, tensor)
            self._written[name] = self.files[i].name

    def write_chunks(self, name, shape, dtype, chunks):
        i = self._shard_of[name]
        if i != self._current_index:
            self._open(i)
        self._current.write_stream(name, shape, dtype, chunks)
        self._written[name] = self.files[i].name

    def close(self):
        if self._current is not None:
            self._current.close()
            self._current = None
        if len(self.files) > 1:
            total = sum(f.nbytes for f in self.files)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self._written.items()))}
            write_json(self.directory / SAFE_INDEX, index)

    def abort(self):
        if self._current is not None:
            self._current.abort()


FORMAT = HFFormat()
