"""safetensors read from the header alone, and written as a stream.

The safetensors library maps whole files; reading through `pread` instead keeps the resident
set at one tensor, which is what lets a 16 GB checkpoint convert in a few hundred MB. The header
is checked as the library checks it, so a file it refuses is refused here too
(tests/test_strict_readers.py; fuzz/differential.py compares the two on mutated files).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
import warnings
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS, itemsize
from ..errors import WeightportError
from .hashed_file import HashedFile
from .pread import RangeFile

# The safetensors library's own limits (safetensors/src/tensor.rs, 0.8): a longer header is refused
# (HeaderTooLarge), and serde_json refuses JSON nested deeper than 127 arrays and objects.
_MAX_HEADER = 100_000_000
_MAX_DEPTH = 127
_U64 = 2**64 - 1
_I64 = 2**63 - 1
# every dtype the library knows, with its width in bits; SAFETENSORS_DTYPES is the part weightport converts
_LIB_DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
                   "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
                   "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _NotJson(ValueError):
    """Internal: JSON that Python's parser takes but serde_json (the library's) refuses."""


class _Obj(dict):
    """A JSON object that remembers the keys it had more than once (the last value is kept)."""

    __slots__ = ("dups",)


def _pairs(pairs) -> _Obj:
    obj = _Obj()
    obj.dups = []
    for k, v in pairs:
        if k in obj:
            obj.dups.append(k)
        obj[k] = v
    return obj


def _json_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _NotJson(f"number out of range ({text[:20]}{'...' if len(text) > 20 else ''})")
    return value


def _json_int(text: str):
    # serde_json reads an integer outside i64/u64, and -0, as a float (which no size or offset may be)
    if len(text) <= 20:
        value = int(text)
        if -2**63 <= value <= _U64 and text != "-0":
            return value
    return _json_float(text)


def _json_constant(text: str):
    raise _NotJson(f"{text} is not JSON")


def _parse_header(raw: bytes) -> object:
    """The header as serde_json parses it: strict UTF-8 (no BOM), no NaN/Infinity, no numbers beyond a
    double, no lone surrogate escapes, at most 127 levels of nesting; objects are _Obj."""
    text = raw.decode("utf-8")  # UnicodeDecodeError: json.loads(bytes) would guess UTF-16 or skip a BOM
    header = json.loads(text, object_pairs_hook=_pairs, parse_int=_json_int, parse_float=_json_float,
                        parse_constant=_json_constant)
    stack = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _NotJson("a string holds a lone surrogate escape (\\ud800-\\udfff)")
        elif isinstance(value, (dict, list)):
            if depth > _MAX_DEPTH:
                raise _NotJson(f"JSON nested deeper than {_MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for k, v in items:
                if k is not None and _SURROGATE.search(k):
                    raise _NotJson("a key holds a lone surrogate escape (\\ud800-\\udfff)")
                stack.append((v, depth + 1))
    return header


def _is_size(x) -> bool:
    """A JSON integer that deserializes as a Rust usize (bool is not one, nor 8.0, nor "8")."""
    return type(x) is int and 0 <= x <= _U64


def safetensors_metadata(path: Path) -> dict:
    """The header's __metadata__, or {} when the file is not readable safetensors (for detection).
    A FIFO or device is not opened (it would block, or never end): {} too, and the reader that
    opens the checkpoint refuses it by name."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return {}
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
        """Index the header, refusing everything the safetensors library refuses (read_metadata and
        Metadata::validate in safetensors/src/tensor.rs, 0.8) and a few ambiguous headers it reads."""
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail("not a safetensors file (shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER:
                    raise self._fail(f"not safetensors (header length {n} is over the {_MAX_HEADER:,} bytes the "
                                     "format allows)")
                if 8 + n > size:
                    raise self._fail(f"truncated or not safetensors (header length {n}: the file needs {8 + n} bytes "
                                     f"for its header but has {size})")
                raw = f.read(n)
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror}") from None
        try:
            header = _parse_header(raw)
        except UnicodeDecodeError:
            raise self._fail("corrupt safetensors header (not UTF-8)") from None
        except _NotJson as e:
            raise self._fail(f"corrupt safetensors header (not JSON: {e})") from None
        except ValueError:  # JSONDecodeError, and an integer too long for int()
            raise self._fail("corrupt safetensors header (not JSON)") from None
        except RecursionError:
            raise self._fail("corrupt safetensors header (JSON nested too deep)") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt safetensors header (not a JSON object)")
        # The library keeps the last of two same-named tensors or metadata keys; weightport refuses
        # both, because which one a reader keeps differs between JSON parsers.
        if "__metadata__" in header.dups:
            raise self._fail("corrupt safetensors header (__metadata__ appears twice)")
        if header.dups:
            raise self._fail(f"tensor {header.dups[0]}: appears twice in the header")
        self.metadata = self._check_metadata(header.pop("__metadata__", None))
        self._data_start = 8 + n
        data_size = size - self._data_start
        infos = [(name, *self._check_entry(name, e)) for name, e in header.items()]
        # as the library validates: by offsets, contiguous from 0, each tensor exactly its size
        start, previous = 0, None
        for name, shape, dtype, begin, end, nbytes in sorted(infos, key=lambda x: (x[3], x[4], x[0])):
            where = f"data_offsets [{begin}, {end}]"
            if end < begin:
                raise self._fail(f"tensor {name}: {where} end before they begin")
            if begin < start:
                raise self._fail(f"tensor {name}: {where} overlap tensor {previous} (which ends at byte {start})")
            if begin > start:
                after = f"after tensor {previous}" if previous is not None else "before the first tensor"
                raise self._fail(f"tensor {name}: {where} leave a hole of {begin - start} bytes {after} "
                                 "(tensors must be back to back from byte 0 of the data)")
            if end - begin != nbytes:
                raise self._fail(f"tensor {name}: {where} do not match shape {_short(list(shape))} "
                                 f"{TORCH_TO_SAFETENSORS[dtype]} ({nbytes} bytes)")
            if end > data_size:
                raise self._fail(f"truncated: tensor {name} ends at byte {end} of the data but the file holds "
                                 f"{data_size}")
            self.entries[name] = (shape, dtype, begin, end)
            start, previous = end, name
        if start != data_size:
            last = (f"the last tensor ({previous}) ends" if previous is not None
                    else "the header lists no tensor, so the data ends")
            raise self._fail(f"{data_size - start} bytes after the tensors are not covered by any: {last} at byte "
                             f"{start} of the data but the file holds {data_size}")

    def _check_metadata(self, meta) -> dict[str, str]:
        """__metadata__ is absent, null, or an object of strings (the library's Option<HashMap<String, String>>)."""
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            raise self._fail(f"corrupt safetensors header (__metadata__ is {_json_type(meta)}, "
                             "not an object of strings)")
        if meta.dups:
            raise self._fail(f"corrupt safetensors header (__metadata__ key {meta.dups[0]!r} appears twice)")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise self._fail(f"corrupt safetensors header (__metadata__ {k!r} is {_json_type(v)}, not a string)")
        return dict(meta)

    def _check_entry(self, name: str, e) -> tuple[tuple[int, ...], torch.dtype, int, int, int]:
        """(shape, dtype, begin, end, size in bytes) of one entry, typed as the library types it."""
        if not isinstance(e, dict):
            # the library also takes an entry written as a 3-element array; no writer does that, and the
            # format specifies an object
            raise self._fail(f"tensor {name}: header entry is {_json_type(e)}, not an object")
        dup = next((k for k in e.dups if k in _FIELDS), None)
        if dup is not None:
            raise self._fail(f"tensor {name}: field {dup} appears twice")
        missing = [k for k in _FIELDS if k not in e]
        if missing:
            raise self._fail(f"tensor {name}: header entry has no {missing[0]}")
        name_of = e["dtype"]
        if not isinstance(name_of, str):
            raise self._fail(f"tensor {name}: dtype is {_json_type(name_of)}, not a string")
        if name_of not in _LIB_DTYPE_BITS:
            raise self._fail(f"tensor {name}: unknown dtype {name_of!r}")
        dtype = SAFETENSORS_DTYPES.get(name_of)
        if dtype is None:  # a dtype the library knows but weightport does not convert
            raise self._fail(f"tensor {name}: dtype {name_of} is not supported "
                             f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        shape, offsets = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise self._fail(f"tensor {name}: shape {_short(shape)} is not a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(x) for x in offsets):
            raise self._fail(f"tensor {name}: data_offsets {_short(offsets)} are not two integers >= 0")
        numel = 1
        for d in shape:  # checked as the library checks, one multiplication at a time
            numel *= d
            if numel > _U64:
                raise self._fail(f"tensor {name}: shape {_short(shape)} overflows (more than 2^64 elements)")
        nbits = numel * _LIB_DTYPE_BITS[name_of]
        if nbits > _U64:
            raise self._fail(f"tensor {name}: shape {_short(shape)} of {name_of} overflows (more than 2^64 bits)")
        extent = 1
        for d in shape:
            extent *= d or 1
        if extent > _I64:
            # torch cannot make such a tensor even when it is empty; the library fails there with
            # MemoryError or an overflow for some of these and reads others as empty
            raise self._fail(f"tensor {name}: shape {_short(shape)} is too large for a torch tensor")
        return tuple(shape), dtype, offsets[0], offsets[1], nbits // 8

    def locate(self, name: str):
        shape, dtype, begin, _ = self.entries[name]
        return self._data_start + begin, shape, dtype

    def load(self, name: str) -> torch.Tensor:
        return self.read(name)

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor as a view of the file's pages, for a writer that copies it straight out.

        This saves a copy and the zeroing of a fresh buffer; `release` hands the pages back."""
        shape, dtype, begin, end = self.entries[name]
        if end == begin:  # frombuffer refuses a count of 0 (differential fuzzing found a ValueError here)
            return torch.empty(shape, dtype=dtype)
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


def _json_type(value) -> str:
    """What a JSON value is, with its article: "an object", "a list", "null"."""
    if value is None:
        return "null"
    for kind, word in ((bool, "a boolean"), (dict, "an object"), (list, "a list"), (str, "a string"),
                       (int, "an integer")):
        if isinstance(value, kind):
            return word
    return "a number"


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


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
