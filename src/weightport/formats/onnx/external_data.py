"""The raw weights file an ONNX graph points into (ONNX "external data"): tensors back to back,
each where `offsets` says, so the graph can be written from the plan before or after the bytes.

Large tensors start at multiples of 64 KiB, as onnx's own external_data_helper aligns them, so
ONNX Runtime can memory-map them instead of copying.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...io.hashed_file import HashedFile
from ...io.pread import RangeFile
from ...format import OutputFile, Writer

ALIGN, ALIGN_FROM = 65536, 2**20


def offsets(file: OutputFile) -> dict[str, tuple[int, int]]:
    """name -> (offset, length) of each tensor in the data file."""
    out, end = {}, 0
    for t in file.tensors:
        if t.nbytes >= ALIGN_FROM:
            end = -(-end // ALIGN) * ALIGN
        out[t.name] = (end, t.nbytes)
        end += t.nbytes
    return out


class ExternalDataWriter(Writer):
    def __init__(self, directory: Path, files: list[OutputFile]):
        self._places = {name: (directory / f.name, at) for f in files for name, at in offsets(f).items()}
        self._handles = {f.name: HashedFile(directory / f.name) for f in files}

    def _seek(self, name: str):
        path, (offset, _) = self._places[name]
        f = self._handles[path.name]
        if f.tell() < offset:
            f.write(b"\0" * (offset - f.tell()))
        if f.tell() != offset:
            raise RuntimeError(f"internal: {name} written out of plan order")
        return f

    def write_group(self, names, tensors):
        for name, tensor in zip(names, tensors):
            self._seek(name).write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def write_chunks(self, name, shape, dtype, chunks):
        f = self._seek(name)
        for piece in chunks:
            f.write(memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self):
        for f in self._handles.values():
            f.close()

    def abort(self):
        for f in self._handles.values():
            f.abort()


class ExternalDataFile(RangeFile):
    """One data file's tensors, as the graph's initializers locate them (read by byte range)."""

    def __init__(self, path: Path, located: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]]):
        super().__init__(path)
        size = path.stat().st_size
        for name, (offset, length, shape, dtype) in located.items():
            if offset + length > size:
                raise self._fail(f"tensor {name} lies at bytes {offset}..{offset + length}, past the file's end ({size})")
        self._located = located
        self.entries = {name: (shape, dtype) for name, (_, _, shape, dtype) in located.items()}

    def locate(self, name):
        offset, _, shape, dtype = self._located[name]
        return offset, shape, dtype

    def load(self, name):
        return self.read(name)
