"""A checkpoint's tensors as one name -> metadata table, whichever files they live in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import itemsize
from ..errors import WeightportError
from ..paths import check_regular
from .safetensors_file import SafetensorsFile
from .torch_file import TorchFile


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def open_file(path: Path):
    path = Path(path)
    check_regular(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return TorchFile(path)


class TensorSource:
    """The tensors of a checkpoint, possibly spread across files, readable one at a time."""

    def __init__(self, files: list):
        self._files = files
        self.tensors: dict[str, TensorMeta] = {}
        self._owner: dict[str, object] = {}
        for f in files:
            for name, entry in f.entries.items():
                if name in self.tensors:
                    raise WeightportError(f"{f.path}: tensor {name} is also in {self.tensors[name].file}")
                self.tensors[name] = TensorMeta(name, tuple(entry[0]), entry[1], f.path)
                self._owner[name] = f

    def load(self, name: str) -> torch.Tensor:
        return self._owner[name].load(name)

    def mapped(self, name: str) -> torch.Tensor | None:
        """A view of the tensor's bytes in its file, or None if its file cannot map them."""
        f = self._owner[name]
        return f.mapped(name) if hasattr(f, "mapped") else None

    def release(self, name: str) -> None:
        f = self._owner[name]
        if hasattr(f, "release"):
            f.release(name)

    def iter_chunks(self, name: str, chunk_bytes: int):
        """Flat pieces of one tensor, or None if its file cannot be read piecewise."""
        f = self._owner[name]
        return f.iter_chunks(name, chunk_bytes) if hasattr(f, "iter_chunks") else None

    def shares_storage(self, a: str, b: str) -> bool:
        f = self._owner.get(a)
        return f is self._owner.get(b) and hasattr(f, "shares_storage") and f.shares_storage(a, b)

    @property
    def skipped(self) -> dict[str, str]:
        """Records of the files that are not tensors (e.g. MindSpore string records), with why."""
        out = {}
        for f in self._files:
            out.update(getattr(f, "skipped", {}))
        return out

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AssembledSource(TensorSource):
    """Tensors put together from several stored pieces when loaded (TP shards, ZeRO partitions):
    never one mapping, never read piecewise, never sharing storage."""

    def mapped(self, name):
        return None

    def release(self, name):
        pass

    def iter_chunks(self, name, chunk_bytes):
        return None

    def shares_storage(self, a, b):
        return False


def open_files(paths: list[Path]) -> TensorSource:
    opened = []
    try:
        for p in paths:
            opened.append(open_file(p))
    except BaseException:
        for f in opened:
            f.close()
        raise
    return TensorSource(opened)
