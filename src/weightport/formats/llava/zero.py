"""DeepSpeed ZeRO checkpoint directories (the `iter_N.pth/` tag directory xtuner and mmengine write),
read without DeepSpeed and without running pickled code.

ZeRO-1/2: `mp_rank_00_model_states.pt` holds the whole model state dict under `module` (in the
training dtype); that is what is read.
ZeRO-3: every rank's `zero_pp_rank_R_mp_rank_00_model_states.pt` holds only placeholders, and the
parameters live as fp32 master weights in `zero_pp_rank_R_mp_rank_00_optim_states.pt`
(`optimizer_state_dict.fp32_flat_groups`): each rank's groups concatenated form one flat vector in
which every parameter, in `param_shapes` order, takes ceil(numel / world_size) elements; the
parameter is the concatenation of its slices over the ranks, cut to numel. Frozen parameters are
split the same way across `frozen_param_fragments`, and buffers are whole in rank 0's `module`.
Each tensor is put together from memory-mapped slices when it is asked for: peak memory is one
parameter, not a rank's file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ...errors import WeightportError
from ...paths import check_regular, confined
from ...io.source import AssembledSource, TensorMeta
from ...io.torch_file import Inert, first_line, load_weights_only

MODEL_STATES_ZERO2 = "mp_rank_00_model_states.pt"
MODEL_STATES_ZERO3 = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt")
OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def _tag_dir(path: Path) -> Path | None:
    """The directory holding the rank files: `path` itself, or the tag named by its `latest` file."""
    if (path / MODEL_STATES_ZERO2).is_file() or any(MODEL_STATES_ZERO3.fullmatch(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        check_regular(latest)
        try:
            tag = confined(path, latest.read_text(encoding="utf-8").strip(), str(latest))
        except (UnicodeDecodeError, OSError):
            return None
        return tag if tag.is_dir() and _tag_dir(tag) == tag else None
    return None


def is_zero_checkpoint(path: Path) -> bool:
    return path.is_dir() and _tag_dir(path) is not None


def _load(path: Path) -> dict:
    try:
        obj = load_weights_only(path)
    except WeightportError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear line for any unreadable rank file
        raise WeightportError(f"{path}: cannot read DeepSpeed state ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise WeightportError(f"{path}: holds a {type(obj).__name__}, not DeepSpeed's state dict")
    return obj


def _stage(optim: dict) -> int:
    stage = (optim.get("optimizer_state_dict") or {}).get("zero_stage")
    if isinstance(stage, Inert):  # deepspeed's ZeroStageEnum(IntEnum), kept as its constructor argument
        stage = stage.args[0] if stage.args else None
    return int(stage) if stage is not None else 0


class ZeroSource(AssembledSource):
    """The parameters of a ZeRO checkpoint directory, by their module names."""

    def __init__(self, path: Path):
        self.path = path
        tag = _tag_dir(path)
        if tag is None:
            raise WeightportError(f"{path}: not a DeepSpeed checkpoint directory (no *model_states.pt)")
        ranks = sorted((int(m.group(1)), p) for p in tag.iterdir() if (m := MODEL_STATES_ZERO3.fullmatch(p.name)))
        optims = sorted((int(m.group(1)), p) for p in tag.iterdir() if (m := OPTIM_STATES.fullmatch(p.name)))
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._whole: dict[str, torch.Tensor] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        if (tag / MODEL_STATES_ZERO2).is_file() and not ranks:
            self._open_module(tag / MODEL_STATES_ZERO2)
            stage = _stage(_load(optims[0][1])) if optims else 2
            self.variant = f"DeepSpeed ZeRO-{stage} ({len(optims) or '?'} ranks), module states"
        else:
            self._open_zero3(tag, ranks, optims)
            self.variant = f"DeepSpeed ZeRO-3, {len(ranks)} ranks, fp32 master weights"
        self._files, self._rank_files = [], sorted(tag.glob("*.pt"))
        self.tensors = {}
        for name, shape in self._shape.items():
            dtype = self._whole[name].dtype if name in self._whole else self._parts[name][0].dtype
            self.tensors[name] = TensorMeta(name, shape, dtype, tag)

    def _open_module(self, path: Path) -> None:
        module = _load(path).get("module")
        if not isinstance(module, dict):
            raise WeightportError(f"{path}: no `module` state dict")
        for k, v in module.items():
            if isinstance(v, torch.Tensor):
                self._whole[k], self._shape[k] = v, tuple(v.shape)

    def _open_zero3(self, tag: Path, ranks: list, optims: list) -> None:
        world = len(ranks)
        if not world:
            raise WeightportError(f"{tag}: no zero_pp_rank_*_mp_rank_00_model_states.pt")
        for files, what in ((ranks, "model states"), (optims, "optimizer states")):
            got = [r for r, _ in files]
            if got != list(range(world)):
                missing = sorted(set(range(world)) - set(got))
                raise WeightportError(f"{tag}: {what} of rank {missing[0] if missing else got[-1]} missing or extra "
                                      f"(ranks {got}, {world} model-state files)")
        models = [_load(p) for _, p in ranks]
        flats = []
        for r, p in optims:
            opt = _load(p).get("optimizer_state_dict") or {}
            groups = opt.get("fp32_flat_groups")
            if _stage({"optimizer_state_dict": opt}) != 3 or not groups:
                raise WeightportError(f"{p}: not a ZeRO-3 optimizer state (no fp32_flat_groups)")
            flats.append(torch.cat([g.reshape(-1) for g in groups]) if len(groups) > 1 else groups[0].reshape(-1))
        m0 = models[0]
        shapes = m0.get("param_shapes")
        if isinstance(shapes, dict):
            shapes = [shapes]
        offset = 0
        for group in shapes or []:
            for name, shape in group.items():
                shape = tuple(int(s) for s in shape)
                part = math.ceil(math.prod(shape) / world)
                if offset + part > flats[0].numel():
                    raise WeightportError(f"{tag}: parameter {name} {list(shape)} runs past the end of the fp32 "
                                          f"partition ({flats[0].numel()} elements a rank)")
                self._parts[name] = [f.narrow(0, offset, part) for f in flats]
                self._shape[name] = shape
                offset += part
        if offset == 0:
            raise WeightportError(f"{tag}: rank 0 model states hold no param_shapes")
        for name, shape in (m0.get("frozen_param_shapes") or {}).items():
            self._parts[name] = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
            self._shape[name] = tuple(int(s) for s in shape)
        module = m0.get("module") or {}
        for name in m0.get("buffer_names") or []:
            if isinstance(module.get(name), torch.Tensor):
                self._whole[name], self._shape[name] = module[name], tuple(module[name].shape)
        shared = m0.get("shared_params") or {}
        for alias, target in shared.items() if isinstance(shared, dict) else shared:
            if target in self._shape:
                self._shape[alias] = self._shape[target]
                (self._parts if target in self._parts else self._whole)[alias] = \
                    (self._parts if target in self._parts else self._whole)[target]

    def load(self, name: str) -> torch.Tensor:
        if name in self._whole:
            return self._whole[name].clone()
        numel = math.prod(self._shape[name])
        return torch.cat(self._parts[name])[:numel].reshape(self._shape[name])

    @property
    def files(self) -> list[Path]:
        return self._rank_files

    def close(self) -> None:
        self._parts, self._whole = {}, {}


def open_zero_checkpoint(path: Path) -> ZeroSource:
    return ZeroSource(path)
