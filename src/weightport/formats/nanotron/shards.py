"""Nanotron's one-file-per-parameter tree: TP shards read back into whole parameters, and whole
parameters cut into TP shards, with the three-key shard metadata Nanotron reshards by.

Model-agnostic: which parameters are sharded, along which dim and in which fused chunks is the
caller's (see ../../../shared/formats/nanotron.md §1.2-1.6 for the on-disk rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import WeightportError
from ...io.safetensors_file import SafetensorsFile, SafetensorsStreamWriter
from ...io.source import AssembledSource, TensorMeta

# Nanotron's fork refuses newer versions on its resharding path; upstream (1.5) accepts 1.4.
# Nanotron 0.4 (PyPI) reshards only <= 1.2; the shard metadata is the same in 1.2 to 1.5
VERSION = "1.4"
VERSIONS = ("1.2", "1.3", "1.4", "1.5")
MAX_VERSION = 1.5
METADATA_KEYS = {"version", "local_global_slices_pairs", "unsharded_shape"}

_NAME = re.compile(r"model_(?P<leaf>[A-Za-z0-9]+)"
                   r"(?:_pp-rank-(?P<p>\d+)-of-(?P<P>\d+)_tp-rank-(?P<t>\d+)-of-(?P<T>\d+)"
                   r"(?P<exp>_exp-rank-\d+-of-\d+)?)?\.safetensors")
_LEGACY = re.compile(r"model_.*\.safetensors_pp-rank-.*\.safetensors")

Slices = tuple[slice, ...]
Pairs = list[tuple[Slices, Slices]]


@dataclass(frozen=True)
class Sharding:
    """How a parameter is split over TP ranks: along `dim`, each of `chunks` (fused blocks)
    separately, so a rank's shard of [q; k; v] is [q_r; k_r; v_r]."""

    dim: int
    chunks: tuple[int, ...] | None = None


def file_name(param: str, tp: tuple[int, int] | None, pp: tuple[int, int] = (0, 1)) -> str:
    """model/<dirs>/model_<leaf>[_pp-rank-p-of-P_tp-rank-t-of-T].safetensors for a parameter."""
    *dirs, leaf = param.split(".")
    suffix = f"_pp-rank-{pp[0]}-of-{pp[1]}_tp-rank-{tp[0]}-of-{tp[1]}" if tp else ""
    return "/".join(["model", *dirs, f"model_{leaf}{suffix}.safetensors"])


def shard_pairs(shape: tuple[int, ...], sharding: Sharding, rank: int, tp: int) -> Pairs:
    """(local, global) slice pairs of one rank, as Nanotron's create_sharded_parameter computes them."""
    full = (slice(None),) * len(shape)

    def on_dim(s: slice, base: Slices = full) -> Slices:
        return base[:sharding.dim] + (s,) + base[sharding.dim + 1:]

    if sharding.chunks is None:
        n = shape[sharding.dim] // tp
        return [(full, on_dim(slice(rank * n, (rank + 1) * n)))]
    pairs, start = [], 0
    for c in sharding.chunks:
        n = c // tp
        local = start // tp
        pairs.append((on_dim(slice(local, local + n)), on_dim(slice(start + rank * n, start + (rank + 1) * n))))
        start += c
    return pairs


def local_shape(shape: tuple[int, ...], sharding: Sharding, tp: int) -> tuple[int, ...]:
    out = list(shape)
    out[sharding.dim] //= tp
    return tuple(out)


def pairs_to_str(pairs: Pairs) -> str:
    def one(s: slice) -> str:
        return ",".join(str(x) for x in (s.start, s.stop, s.step))

    return ";".join("#".join("|".join(one(s) for s in side) for side in pair) for pair in pairs)


def pairs_from_str(text: str, ndim: int) -> Pairs:
    def num(x: str) -> int | None:
        return None if x == "None" else int(x)

    pairs = []
    for pair in text.split(";"):
        sides = pair.split("#")
        if len(sides) != 2:
            raise ValueError(f"pair {pair!r} is not local#global")
        parsed = []
        for side in sides:
            dims = side.split("|")
            if len(dims) != ndim:
                raise ValueError(f"{side!r} has {len(dims)} dims, the tensor has {ndim}")
            parts = [d.split(",") for d in dims]
            if any(len(x) != 3 for x in parts):
                raise ValueError(f"{side!r} is not start,stop,step per dim")
            parsed.append(tuple(slice(*map(num, x)) for x in parts))
        pairs.append(tuple(parsed))
    return pairs


def shape_to_str(shape: tuple[int, ...]) -> str:
    return str(tuple(int(d) for d in shape))


def shape_from_str(text: str) -> tuple[int, ...]:
    # numpy >= 2 prints contiguous-chunk shapes as np.int64(6144)
    inner = re.fullmatch(r"\((.*)\)", text.strip())
    if inner is None:
        raise ValueError(f"{text!r} is not a tuple")
    items = [x.strip() for x in inner.group(1).split(",") if x.strip()]
    dims = [re.fullmatch(r"(?:np\.int64\()?(\d+)\)?", x) for x in items]
    if not all(dims):
        raise ValueError(f"{text!r} is not a tuple of integers")
    return tuple(int(d.group(1)) for d in dims)


def shard_metadata(shape: tuple[int, ...], pairs: Pairs, version: str = VERSION) -> dict[str, str]:
    return {"version": version, "local_global_slices_pairs": pairs_to_str(pairs),
            "unsharded_shape": shape_to_str(shape)}


def _bounds(s: slice, size: int) -> tuple[int, int]:
    start, stop, step = s.indices(size)
    if step != 1 or any(x is not None and not 0 <= x <= size for x in (s.start, s.stop)):
        raise ValueError(f"slice {s.start}:{s.stop}:{s.step} does not fit a dimension of {size}")
    return start, max(start, stop)


def _boxes(slices: Slices, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [_bounds(s, n) for s, n in zip(slices, shape)]


def _volume(box) -> int:
    v = 1
    for a, b in box:
        v *= b - a
    return v


@dataclass
class _Param:
    shape: tuple[int, ...]
    dtype: torch.dtype
    # (file, pairs or None for a whole-tensor file)
    parts: list[tuple[SafetensorsFile, Pairs | None]] = field(default_factory=list)
    tp: int = 1
    pp: int = 1


class NanotronSource(AssembledSource):
    """Every parameter under <ckpt>/model/, whole, by its Nanotron name; reassembled from its
    shard files on `load`, with only the headers read up front."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._files: list[SafetensorsFile] = []
        self.tensors: dict[str, TensorMeta] = {}
        self._params: dict[str, _Param] = {}
        try:
            groups: dict[str, list[tuple[Path, re.Match]]] = {}
            for path in sorted(self.root.rglob("*.safetensors")):
                m = _NAME.fullmatch(path.name)
                if m is None:
                    why = ("legacy Nanotron file name; rename it with Nanotron's scripts/fix_checkpoint_bad_naming.py"
                           if _LEGACY.fullmatch(path.name) else "not a Nanotron parameter file name")
                    raise WeightportError(f"{path}: {why}")
                if m["exp"]:
                    raise WeightportError(f"{path}: expert-parallel (MoE) shards are not supported")
                name = ".".join(path.parent.relative_to(self.root).parts + (m["leaf"],))
                groups.setdefault(name, []).append((path, m))
            if not groups:
                raise WeightportError(f"{self.root}: no parameter files (model_*.safetensors)")
            for name, files in groups.items():
                self._params[name] = self._read_param(name, files)
                p = self._params[name]
                self.tensors[name] = TensorMeta(name, p.shape, p.dtype, p.parts[0][0].path)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> SafetensorsFile:
        f = SafetensorsFile(path)
        self._files.append(f)
        if list(f.entries) != ["data"]:
            raise WeightportError(f"{path}: expected one tensor named 'data', found {sorted(f.entries)}")
        return f

    def _read_param(self, name: str, files: list[tuple[Path, re.Match]]) -> _Param:
        where = files[0][0].parent
        sharded = [(p, m) for p, m in files if m["T"] is not None]
        if len(sharded) != len(files):
            if sharded:
                raise WeightportError(f"{where}: holds both an unsharded model_{files[0][1]['leaf']}.safetensors and "
                                      "TP shard files of it; remove the stale ones")
            f = self._open(files[0][0])
            shape, dtype = f.entries["data"][:2]
            return _Param(tuple(shape), dtype, [(f, None)])
        sizes = sorted({(int(m["T"]), int(m["P"])) for _, m in sharded})
        if len(sizes) > 1:
            listed = ", ".join(f"TP={t} PP={p}" for t, p in sizes)
            raise WeightportError(f"{where}: shard files of {name} from different parallel sizes ({listed}); "
                                  "stale shards of another run would be merged silently, so remove them")
        tp, pp = sizes[0]
        ranks = sorted(int(m["t"]) for _, m in sharded)
        if len({int(m["p"]) for _, m in sharded}) > 1:
            raise WeightportError(f"{where}: shard files of {name} name different pipeline ranks")
        missing = sorted(set(range(tp)) - set(ranks))
        if missing or len(ranks) != tp:
            what = f"missing tp-rank {missing[0]}" if missing else "duplicate or out-of-range TP ranks"
            raise WeightportError(f"{where}: shard files of {name} (TP={tp}): {what}")
        param, covered = None, []
        for path, _ in sorted(sharded, key=lambda pm: int(pm[1]["t"])):
            f = self._open(path)
            shape, dtype = tuple(f.entries["data"][0]), f.entries["data"][1]
            meta = f.metadata
            if set(meta) != METADATA_KEYS:
                raise WeightportError(f"{path}: shard metadata has keys {sorted(meta)}, expected exactly "
                                      f"{sorted(METADATA_KEYS)}")
            try:
                if float(meta["version"]) > MAX_VERSION:
                    raise ValueError(f"checkpoint version {meta['version']} is newer than {MAX_VERSION}")
                full = shape_from_str(meta["unsharded_shape"])
                pairs = pairs_from_str(meta["local_global_slices_pairs"], len(shape))
                if len(full) != len(shape):
                    raise ValueError(f"unsharded_shape {list(full)} and shard shape {list(shape)} differ in rank")
                boxes = self._check_pairs(pairs, shape, full)
            except (ValueError, AttributeError) as e:
                raise WeightportError(f"{path}: bad shard metadata ({e})") from None
            if param is None:
                param = _Param(full, dtype, tp=tp, pp=pp)
            elif (full, dtype) != (param.shape, param.dtype):
                raise WeightportError(f"{path}: unsharded_shape {list(full)} {dtype} disagrees with the other shards "
                                      f"of {name} ({list(param.shape)} {param.dtype})")
            param.parts.append((f, pairs))
            covered += boxes
        self._check_cover(where, name, param.shape, covered)
        return param

    @staticmethod
    def _check_pairs(pairs: Pairs, shape, full) -> list:
        out = []
        for local, glob in pairs:
            lo, gl = _boxes(local, shape), _boxes(glob, full)
            if [b - a for a, b in lo] != [b - a for a, b in gl]:
                raise ValueError(f"local {lo} and global {gl} slices differ in size")
            out.append(gl)
        return out

    @staticmethod
    def _check_cover(where: Path, name: str, shape: tuple[int, ...], boxes: list) -> None:
        total = 1
        for d in shape:
            total *= d
        overlap = any(all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(x, y))
                      for i, x in enumerate(boxes) for y in boxes[i + 1:])
        if overlap or sum(map(_volume, boxes)) != total:
            raise WeightportError(f"{where}: the shards of {name} do not cover its unsharded shape "
                                  f"{list(shape)} exactly once (inconsistent metadata)")

    def load(self, name: str) -> torch.Tensor:
        p = self._params[name]
        if p.parts[0][1] is None:
            f = p.parts[0][0]
            try:
                return f.load("data")
            finally:
                f.close()
        out = torch.empty(p.shape, dtype=p.dtype)
        for f, pairs in p.parts:
            data = f.load("data")
            f.close()  # one descriptor open at a time, whatever the TP size
            for local, glob in pairs:
                out[glob] = data[local]
        return out

    def parallel_sizes(self) -> set[tuple[int, int]]:
        return {(p.tp, p.pp) for p in self._params.values() if p.parts[0][1] is not None}


@dataclass
class ShardFile:
    """One file to write: `name` relative to the checkpoint, holding `tensor` (by its Nanotron
    name) cut by `pairs` (None: the whole tensor), with `metadata`."""

    name: str
    tensors: list
    pairs: Pairs | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class NanotronWriter:
    """Writes each parameter, as it arrives, into all of its files."""

    def __init__(self, directory: Path, files: list[ShardFile]):
        self.directory = Path(directory)
        self._files_of: dict[str, list[ShardFile]] = {}
        for f in files:
            self._files_of.setdefault(f.tensors[0].name, []).append(f)
        self._current: SafetensorsStreamWriter | None = None

    def write_group(self, names, tensors):
        for name, tensor in zip(names, tensors):
            for f in self._files_of[name]:
                planned = f.tensors[0]
                data = tensor
                if f.pairs is not None:
                    data = torch.empty(planned.shape, dtype=tensor.dtype)
                    for local, glob in f.pairs:
                        data[local] = tensor[glob]
                path = self.directory / f.name
                path.parent.mkdir(parents=True, exist_ok=True)
                self._current = SafetensorsStreamWriter(path, [("data", planned.shape, planned.dtype)], f.metadata)
                self._current.write("data", data)
                self._current.close()
                self._current = None

    def close(self):
        pass

    def abort(self):
        if self._current is not None:
            self._current.abort()
