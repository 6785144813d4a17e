"""Reading tensors by byte range straight into fresh memory, with no mapping left behind."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..dtypes import itemsize
from ..errors import WeightportError


def read_range(fd: int, offset: int, nbytes: int) -> torch.Tensor | None:
    """nbytes from offset as a uint8 tensor, or None if the file ends first."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return None
        done += got
    return buf


class RangeFile:
    """A tensor file whose tensors each lie at a known byte range; subclasses say where.

    `locate(name)` returns (offset, shape, dtype), or None when a tensor cannot be read by
    range (then the subclass's own `load` must handle it and pieces are unavailable).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def locate(self, name: str) -> tuple[int, tuple[int, ...], torch.dtype] | None:
        raise NotImplementedError

    def _fail(self, why: str) -> WeightportError:
        return WeightportError(f"{self.path}: {why}")

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, name: str) -> torch.Tensor:
        offset, shape, dtype = self.locate(name)
        nbytes = itemsize(dtype)
        for d in shape:
            nbytes *= d
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        buf = read_range(self._descriptor(), offset, nbytes)
        if buf is None:
            raise self._fail(f"truncated while reading tensor {name}")
        return buf.view(dtype).reshape(shape)

    def iter_chunks(self, name: str, chunk_bytes: int):
        """The tensor's elements, flat, in pieces of about chunk_bytes; None if not by range."""
        where = self.locate(name)
        if where is None:
            return None
        offset, shape, dtype = where
        nbytes = itemsize(dtype)
        for d in shape:
            nbytes *= d
        return self._pieces(name, offset, nbytes, dtype, chunk_bytes)

    def _pieces(self, name, offset, nbytes, dtype, chunk_bytes):
        step = max(itemsize(dtype), chunk_bytes - chunk_bytes % itemsize(dtype))
        for start in range(0, nbytes, step):
            buf = read_range(self._descriptor(), offset + start, min(step, nbytes - start))
            if buf is None:
                raise self._fail(f"truncated while reading tensor {name}")
            yield buf.view(dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
