"""safetensors read from the header alone, and written as a stream.

The safetensors library maps whole files; reading through `pread` instead keeps the resident
set at one tensor, which is what lets a 16 GB checkpoint convert in a few hundred MB.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, itemsize
from ..errors import WeightportError
from .hashed_file import HashedFile
from .pread import RangeFile

# a header larger than this is not a checkpoint header but a corrupt length field
_MAX_HEADER = 100 * 2**20


def safetensors_metadata(path: Path) -> dict:
    """The header's __metadata__, or {} when the file is not readable safetensors (for detection)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                return {}
            meta = json.loads(f.read(n)).get("__metadata__")
    except (OSError, struct.error, ValueError, AttributeError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


class SafetensorsFile(RangeFile):
    """An open .safetensors file: names, shapes and dtypes from the header; data on demand."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        self.metadata: dict[str, str] = {}
        self._map: mmap.mmap | None = None
        self._read_header()

    def _read_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail("not a safetensors file (shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise self._fail(f"truncated or not safetensors (header length {n} but file has {size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror}") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._fail("corrupt safetensors header (not JSON)") from None
        except RecursionError:
            raise self._fail("corrupt safetensors header (JSON nested too deep)") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        # by offset, so a cut file is reported at the first tensor the cut reaches
        for name, e in sorted(header.items(), key=lambda kv: _begin(kv[1])):
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"tensor {name}: bad header entry {e!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * itemsize(dtype) or begin < 0:
                raise self._fail(f"tensor {name}: data_offsets {begin}..{end} do not match shape {list(shape)} {e['dtype']}")
            if end > data_size:
                raise self._fail(f"truncated: tensor {name} ends at byte {end} of the data but the file holds {data_size}")
            self.entries[name] = (shape, dtype, begin, end)

    def locate(self, name: str):
        shape, dtype, begin, _ = self.entries[name]
        return self._data_start + begin, shape, dtype

    def load(self, name: str) -> torch.Tensor:
        return self.read(name)

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor as a view of the file's pages, for a writer that copies it straight out.

        This saves a copy and the zeroing of a fresh buffer; `release` hands the pages back."""
        shape, dtype, begin, end = self.entries[name]
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only on purpose: nothing writes through this view
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin)
        return flat.view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        _, _, begin, end = self.entries[name]
        if self._map is not None and hasattr(self._map, "madvise"):
            lo = self._data_start + begin
            lo -= lo % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, lo, self._data_start + end - lo)

    def close(self) -> None:
        super().close()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a mapped view is still alive; the mapping goes with it
                pass
            self._map = None


def _begin(entry) -> int:
    try:
        return int(entry["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return -1


def header_bytes(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for tensors laid out back to back in this order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in tensors:
        n = itemsize(dtype)
        for d in shape:
            n *= d
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensor list is known up front, one tensor at a time."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]):
        self.path = Path(path)
        self._expected = list(tensors)
        self._next = 0
        self._f = HashedFile(self.path)
        self._f.write(header_bytes(self._expected, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_shape, want_dtype = self._expected[self._next]
        if name != want_name or tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise WeightportError(
                f"{self.path}: internal plan mismatch at tensor {name} {list(tensor.shape)} {tensor.dtype}, "
                f"planned {want_name} {list(want_shape)} {want_dtype}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1

    def write_stream(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, chunks) -> None:
        """Write one tensor from flat pieces, so it is never whole in memory."""
        want_name, want_shape, want_dtype = self._expected[self._next]
        if name != want_name or tuple(shape) != want_shape or dtype != want_dtype:
            raise WeightportError(f"{self.path}: internal plan mismatch at tensor {name}, planned {want_name}")
        n = itemsize(dtype)
        for d in shape:
            n *= d
        written = 0
        for piece in chunks:
            if piece.dtype != dtype:
                raise WeightportError(f"{self.path}: internal dtype mismatch streaming tensor {name}")
            data = piece.contiguous().view(torch.uint8).numpy()
            self._f.write(memoryview(data))
            written += data.nbytes
        if written != n:
            raise WeightportError(f"{self.path}: tensor {name} streamed {written} bytes, planned {n}")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            raise WeightportError(f"{self.path}: internal error, tensor {missing} was planned but never written")
        self._f.close()

    def abort(self) -> None:
        self._f.abort()
