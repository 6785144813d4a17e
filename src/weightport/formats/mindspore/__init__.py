"""MindSpore Transformers (MindFormers) checkpoints: MindFormers parameter names in a MindSpore
`.ckpt` or in the safetensors files newer MindFormers versions save (metadata format "ms").

Both are read and written without MindSpore (`ckpt.py`, `io/safetensors_file.py`). The names and
layouts of each model family live in `families/`; this adapter finds the file, the config and the
layout, the same way for all of them. `compat.py` is MindFormers' own `convert_weight.py` command
line (`weightport mindformers`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ...archs import Model, model_from_hf_config
from ...errors import WeightportError
from ...hf_config import load_json, load_yaml
from ...io import TensorSource, open_files
from ...paths import check_regular
from .ckpt import MsCkptFile, MsCkptWriter
from ...io.safetensors_file import safetensors_metadata
from ...rules import Rule
from ..hf import ShardedSafetensorsWriter
from ...format import Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions
from ..common import find_side_files, write_hf_sidecar
from .families import ALL_LAYOUTS, BY_ARCH, names_for
from .families import from_yaml as mindformers_yaml
from .families.llama_config import TRAINING_STATE

YAML = "mindformers.yaml"
# file container -> the weights file we write
CONTAINERS = {"ckpt": "model.ckpt", "safetensors": "model.safetensors"}
LAYOUTS = ALL_LAYOUTS


def is_ms_safetensors(path: Path) -> bool:
    """MindSpore's save_checkpoint(format="safetensors") marks its files {"format": "ms"}."""
    return path.suffix == ".safetensors" and safetensors_metadata(path).get("format") == "ms"


def _weights_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.ckpt")) + [p for p in sorted(directory.glob("*.safetensors")) if is_ms_safetensors(p)]


def _find(path: Path) -> Path:
    if path.is_file():
        return path
    found = _weights_in(path)
    if len(found) != 1:
        raise WeightportError(f"{path}: expected one .ckpt or MindSpore .safetensors file, found {len(found)}")
    return found[0]


def open_weights(path: Path) -> TensorSource:
    """A MindSpore weights file: a .ckpt through this format's own codec, a .safetensors as any other."""
    if path.suffix != ".ckpt":
        return open_files([path])
    check_regular(path)
    return TensorSource([MsCkptFile(path)])


class MindSporeFormat(Format):
    name = "mindspore"
    title = ("MindSpore Transformers / MindFormers (.ckpt or MindSpore safetensors, MindFormers names; layouts: "
             + ", ".join(LAYOUTS) + ")")
    archs = tuple(BY_ARCH)
    layouts = tuple(LAYOUTS)
    containers = tuple(CONTAINERS)

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix == ".ckpt" or is_ms_safetensors(path)
        return path.is_dir() and bool(_weights_in(path))

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        weights = _find(path)
        directory = weights.parent
        source = open_weights(weights)
        try:
            model, recorded, notes = _read_config(directory)
            names_set = names_for(model)
            if layout is not None and layout not in names_set.layouts:
                raise WeightportError(f"layout {layout!r} is not one of {model.arch.name}'s MindFormers layouts "
                                      f"({', '.join(names_set.layouts)})")
            stored = {n: tuple(m.shape) for n, m in source.tensors.items()}
            matching = names_set.layouts_matching(model, stored)
            chosen = layout or recorded
            if chosen is None:
                chosen = matching[0] if matching else next(iter(names_set.layouts))
                if len(matching) > 1:
                    notes.append(f"layout not recorded; read as {chosen} ({names_set.layouts[chosen]}); the names "
                                 f"and shapes also fit " + ", ".join(f"{m} (pass --from-layout {m})" for m in matching[1:]))
            elif matching and chosen not in matching:
                raise WeightportError(f"{weights}: its names and shapes are those of layout "
                                      f"{' or '.join(matching)}, not {chosen}")
            rules = names_set.rules(model, chosen, set(stored))
            claimed = {n for r in rules for n in r.fmt}
            dropped = {n: "training state, not a weight" for n in stored
                       if n not in claimed and (n in TRAINING_STATE or n.startswith(("adam_m.", "adam_v.", "accu_grads.")))}
            notes += [f"not a tensor, skipped: {n} ({why})" for n, why in source.skipped.items()]
            container = "safetensors" if weights.suffix == ".safetensors" else ".ckpt"
            return Checkpoint(path=path, format=self, variant=f"{container}, {chosen} layout", model=model,
                              source=source, rules=rules, side_files=find_side_files(directory),
                              generation_config=_generation(directory), notes=notes, dropped=dropped)
        except BaseException:
            source.close()
            raise

    def layouts_for(self, model: Model) -> tuple[str, ...]:
        return tuple(names_for(model).layouts)

    def default_layout(self, model: Model) -> str | None:
        return next(iter(names_for(model).layouts))

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        names_set = names_for(model)
        names_set.check(model)
        layout = layout or next(iter(names_set.layouts))
        if layout not in names_set.layouts:
            raise WeightportError(f"layout {layout!r} is not one of {model.arch.name}'s MindFormers layouts "
                                  f"({', '.join(names_set.layouts)})")
        return sorted(names_set.rules(model, layout, None), key=lambda r: names_set.write_order(r.fmt[0], layout))

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        container = options.container or "ckpt"
        if container not in CONTAINERS:
            raise WeightportError(f"format mindspore has no container {container!r} (choose {', '.join(CONTAINERS)})")
        return [OutputFile(CONTAINERS[container], tensors)]

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        (f,) = files
        if f.name.endswith(".safetensors"):
            return ShardedSafetensorsWriter(directory, files, metadata={"format": "ms"})
        return _CkptWriter(directory / f.name)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        names_set = names_for(model)
        layout = options.layout or next(iter(names_set.layouts))
        with open(directory / YAML, "w", encoding="utf-8") as f:
            yaml.safe_dump(names_set.to_yaml(model, dtype, layout), f, sort_keys=False)
        return [YAML] + write_hf_sidecar(directory, source, model)


def _generation(directory: Path) -> dict | None:
    path = directory / "generation_config.json"
    return load_json(path) if path.is_file() else None


def _read_config(directory: Path) -> tuple[Model, str | None, list[str]]:
    """The model from config.json (exact) or a MindFormers yaml, and the layout either records."""
    recorded = None
    yaml_path = directory / YAML
    if not yaml_path.is_file():
        candidates = sorted(directory.glob("*.yaml"))
        yaml_path = candidates[0] if len(candidates) == 1 else None
    mf = None
    if yaml_path is not None:
        mf = load_yaml(yaml_path)
        if not isinstance(mf, dict):
            raise WeightportError(f"{yaml_path}: expected a MindFormers config mapping")
        recorded = (mf.get("weightport") or {}).get("layout")
    config_path = directory / "config.json"
    if config_path.is_file():
        if mf is not None and recorded is None:
            recorded = mindformers_yaml(mf, str(yaml_path))[1]
        return model_from_hf_config(load_json(config_path), str(config_path)), recorded, []
    if mf is None:
        raise WeightportError(f"{directory}: no config.json or MindFormers yaml next to the checkpoint; "
                              "put the model's Hugging Face config.json beside it")
    hf, implied = mindformers_yaml(mf, str(yaml_path))
    return model_from_hf_config(hf, str(yaml_path)), recorded or implied, [f"config from {yaml_path.name}"]


class _CkptWriter(Writer):
    def __init__(self, path: Path):
        self._ckpt = MsCkptWriter(path)

    def write_group(self, names, tensors):
        for name, t in zip(names, tensors):
            self._ckpt.write(name, t)

    def write_chunks(self, name, shape, dtype, chunks):
        self._ckpt.write_chunks(name, shape, dtype, chunks)

    def close(self):
        self._ckpt.close()

    def abort(self):
        self._ckpt.abort()


FORMAT = MindSporeFormat()
