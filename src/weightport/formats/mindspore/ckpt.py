"""MindSpore `.ckpt` checkpoints, read and written without MindSpore.

A `.ckpt` file has no header: it is a run of serialized `Checkpoint` protobuf messages (proto2),
each holding one `Value{tag, TensorProto{dims, tensor_type, tensor_content}}`, optionally
followed by a 17-byte trailer `b"crc_num"` + crc32 of everything before it as a 10-byte
big-endian integer. A parameter over 512 MiB is split into adjacent records with the same tag,
each carrying the full dims; its data is the concatenation of their contents.

Reading walks the records by their key byte and length, parsing only the few header bytes of
each (tag, dims, type and where the content lies), so indexing a 16 GB file reads kilobytes;
tensor data is read later by range. The headers are parsed as protobuf's Python parser (the one
MindSpore uses) parses them, and the records checked as MindSpore's load_checkpoint needs them,
so a file it refuses is refused here too (fuzz/differential.py compares the two on mutated
files); a few malformed records it reads are refused on purpose. Writing encodes each record's
header by hand and streams the content after it, so no multi-GB protobuf message is ever built.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from ...dtypes import itemsize
from ...errors import WeightportError
from ...io.hashed_file import HashedFile
from ...io.pread import RangeFile

# MindSpore's SLICE_SIZE (512 * 1024 KB): the most tensor_content bytes one record holds
CHUNK_BYTES = 512 * 2**20

# tensor_type strings (str(mindspore dtype)) and their torch dtypes
MS_DTYPES: dict[str, torch.dtype] = {
    "Float32": torch.float32,
    "Float16": torch.float16,
    "BFloat16": torch.bfloat16,
    "Float64": torch.float64,
    "Int8": torch.int8,
    "UInt8": torch.uint8,
    "Int16": torch.int16,
    "UInt16": torch.uint16,
    "Int32": torch.int32,
    "UInt32": torch.uint32,
    "Int64": torch.int64,
    "UInt64": torch.uint64,
    "Bool": torch.bool,
}
TORCH_TO_MS: dict[torch.dtype, str] = {v: k for k, v in MS_DTYPES.items()}

CRC_MAGIC = b"crc_num"
CRC_TRAILER_BYTES = len(CRC_MAGIC) + 10
# the first 4 bytes of a file MindSpore encrypted (its cipher magic 0x7F3A5ED8, little-endian)
_CIPHER_MAGIC = bytes.fromhex("d85e3a7f")

_WINDOW = 4096  # header bytes read at a time while indexing
_MAX_TAG = 1 << 20  # a longer tag is a corrupt length, not a parameter name
_MAX_PACKED_DIMS = 4096
_READ = 16 * 2**20  # piece size when streaming the whole file for the CRC
_MASK64 = (1 << 64) - 1
# MindSpore reads a map tensor's parts with np.frombuffer(content, np_type_convert.get(type)): these
# types, and float64 (numpy's default) for any other
_MAP_ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8, "int32": 4}


class _Bad(Exception):
    """Internal: the bytes are not a well-formed record (message says why)."""


class _Cut(Exception):
    """Internal: the file ends inside a record header."""


class _Window:
    """Header bytes at absolute offsets, read a small window at a time."""

    def __init__(self, fd: int, end: int):
        self.fd = fd
        self.end = end  # where the records end (the CRC trailer, if any, is beyond)
        self.start = 0
        self.buf = b""

    def take(self, pos: int, n: int) -> bytes:
        if pos + n > self.end:
            raise _Cut
        off = pos - self.start
        if off < 0 or off + n > len(self.buf):
            want = min(max(n, _WINDOW), self.end - pos)
            parts = []
            got = 0
            while got < want:
                part = os.pread(self.fd, want - got, pos + got)
                if not part:
                    raise _Cut
                parts.append(part)
                got += len(part)
            self.buf = b"".join(parts)
            self.start = pos
            off = 0
        return self.buf[off:off + n]

    def varint(self, pos: int, limit: int) -> tuple[int, int]:
        """(value, position after it); the varint must end before `limit`."""
        begin = pos
        value = 0
        for shift in range(0, 70, 7):
            if pos >= limit:
                if limit > self.end:
                    raise _Cut
                raise _Bad(f"varint at byte {begin} runs past the end of its message")
            b = self.take(pos, 1)[0]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:  # protobuf keeps the low 64 bits of a 10-byte varint
                return value & _MASK64, pos
        raise _Bad(f"bad varint at byte {begin}")

    def key(self, pos: int, limit: int) -> tuple[int, int, bool, int]:
        """(field number, wire type, whether the key is minimally encoded, position after it).

        protobuf looks a field up by its key's bytes: a key encoded with extra bytes is an unknown
        field, whatever number it spells. Field number 0 is refused, as protobuf refuses it."""
        value, after = self.varint(pos, limit)
        if not value >> 3:
            raise _Bad(f"field number 0 at byte {pos}")
        return value >> 3, value & 7, after - pos == len(_varint(value)), after

    def length(self, pos: int, limit: int, what: str) -> tuple[int, int]:
        """A length-delimited field's length, checked to fit inside its message."""
        n, pos = self.varint(pos, limit)
        if pos + n > limit:
            raise _Bad(f"field {what} at byte {pos} ({n} bytes) runs past the end of its message")
        return n, pos

    def skip(self, pos: int, wire: int, limit: int, field: int) -> int:
        """Past one unknown field's value, as protobuf skips unknown fields."""
        if wire == 0:
            return self.varint(pos, limit)[1]
        if wire == 2:
            n, pos = self.length(pos, limit, f"#{field}")
            return pos + n
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > limit:
                raise _Bad(f"field #{field} runs past the end of its message")
            return pos
        raise _Bad(f"field #{field} has wire type {wire}, which a checkpoint never uses")


class _Tensor:
    """One TensorProto as protobuf's parser leaves it: repeated dims appended, the last
    tensor_type and tensor_content kept."""

    __slots__ = ("dims", "ttype", "content")

    def __init__(self):
        self.dims: list[int] = []
        self.ttype: str | None = None
        self.content: tuple[int, int] | None = None  # (offset, length)


class _Record:
    """The header of one top-level record: what it is and where its content lies."""

    __slots__ = ("start", "tag", "kind", "tensor", "maps")

    def __init__(self, start: int):
        self.start = start
        self.tag: str | None = None
        self.kind: str | None = None  # "tensor" or "maptensor"
        self.tensor = _Tensor()
        self.maps: list[_Tensor] = []  # a maptensor's parts

    @property
    def dims(self) -> list[int]:
        return self.tensor.dims

    @property
    def ttype(self) -> str | None:
        return self.tensor.ttype

    @property
    def content(self) -> tuple[int, int] | None:
        return self.tensor.content


def _expect_len(wire: int, what: str) -> None:
    if wire != 2:
        raise _Bad(f"field {what} has wire type {wire}, expected 2 (length-delimited)")


def _string(w: _Window, pos: int, end: int, what: str) -> tuple[str, int]:
    """A string field, strictly UTF-8 as protobuf decodes it; (value, position after it)."""
    n, pos = w.length(pos, end, what)
    if n > _MAX_TAG:
        raise _Bad(f"{what} of {n} bytes is not a {'parameter' if what == 'tag' else 'type'} name (corrupt length)")
    raw = w.take(pos, n)
    try:
        return raw.decode("utf-8"), pos + n
    except UnicodeDecodeError:
        shown = raw[:60]
        raise _Bad(f"{what} is not UTF-8 ({shown!r}{'...' if n > 60 else ''})") from None


def _parse_value(w: _Window, rec: _Record, pos: int, end: int) -> None:
    """Fill rec from the Checkpoint.Value spanning [pos, end), reading headers only.

    As protobuf parses it: a tensor (or maptensor) field that comes again is merged into the one
    before; tensor and maptensor are a oneof, so one of them replaces the other."""
    while pos < end:
        field, wire, canonical, pos = w.key(pos, end)
        if canonical and field == 1:
            _expect_len(wire, "tag")
            rec.tag, pos = _string(w, pos, end, "tag")
        elif canonical and field in (2, 3):
            what = "tensor" if field == 2 else "maptensor"
            _expect_len(wire, what)
            n, pos = w.length(pos, end, what)
            if rec.kind != what:
                rec.tensor, rec.maps = _Tensor(), []
            rec.kind = what
            if field == 2:
                _parse_tensor(w, rec.tensor, pos, pos + n)
            else:
                _parse_map(w, rec.maps, pos, pos + n)
            pos += n
        else:
            pos = w.skip(pos, wire, end, field)
    if rec.tag is None:
        raise _Bad("record has no tag")
    if rec.kind is None:
        raise _Bad("record holds neither a tensor nor a maptensor")
    if rec.kind == "tensor":
        if rec.tensor.ttype is None:
            raise _Bad("tensor has no tensor_type")
        if rec.tensor.content is None:
            raise _Bad("tensor has no tensor_content")


def _parse_map(w: _Window, parts: list[_Tensor], pos: int, end: int) -> None:
    """A MapTensorProto: its repeated TensorProto parts, appended to `parts`."""
    while pos < end:
        field, wire, canonical, pos = w.key(pos, end)
        if canonical and field == 1 and wire == 2:
            n, pos = w.length(pos, end, "maptensor part")
            part = _Tensor()
            _parse_tensor(w, part, pos, pos + n)
            parts.append(part)
            pos += n
        else:
            pos = w.skip(pos, wire, end, field)


def _parse_tensor(w: _Window, t: _Tensor, pos: int, end: int) -> None:
    while pos < end:
        field, wire, canonical, pos = w.key(pos, end)
        if not canonical:
            pos = w.skip(pos, wire, end, field)
        elif field == 1:
            if wire == 0:
                d, pos = w.varint(pos, end)
                t.dims.append(_int64(d))
            elif wire == 2:  # packed, which parsers must accept
                n, pos = w.length(pos, end, "dims")
                if n > _MAX_PACKED_DIMS:
                    raise _Bad(f"packed dims of {n} bytes (corrupt length)")
                stop = pos + n
                while pos < stop:
                    d, pos = w.varint(pos, stop)
                    t.dims.append(_int64(d))
            else:
                raise _Bad(f"field dims has wire type {wire}, expected 0 (varint)")
        elif field == 2:
            _expect_len(wire, "tensor_type")
            t.ttype, pos = _string(w, pos, end, "tensor_type")
        elif field == 3:
            _expect_len(wire, "tensor_content")
            n, pos = w.length(pos, end, "tensor_content")
            t.content = (pos, n)
            pos += n
        else:
            pos = w.skip(pos, wire, end, field)


def _int64(d: int) -> int:
    """An int64 field, which arrives as an unsigned 64-bit varint."""
    return d - (1 << 64) if d >= 1 << 63 else d


def _short(text: str | None) -> str:
    """A tensor_type for a message: repr, cut to 60 characters."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _cut(text: str | None) -> str:
    text = str(text)
    return text if len(text) <= 60 else text[:57] + "..."


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class MsCkptFile(RangeFile):
    """An open MindSpore .ckpt: tensor names, shapes and dtypes from the record headers alone.

    `entries` maps each dense tensor to (shape, dtype), in file order. Records that are not
    dense tensors (`str` values, map tensors) are listed in `skipped` as name -> reason. A
    tensor stored in several records (over 512 MiB) is one entry read across all of them.
    """

    def __init__(self, path: Path, check_crc: bool = False):
        super().__init__(path)
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.skipped: dict[str, str] = {}
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        self.has_crc = False
        self._crc_stored = 0
        try:
            self._open(check_crc)
        except BaseException:
            self.close()
            raise

    # --- indexing -------------------------------------------------------------------------

    def _open(self, check_crc: bool) -> None:
        try:
            fd = self._descriptor()
            size = os.fstat(fd).st_size
            tail = os.pread(fd, CRC_TRAILER_BYTES, size - CRC_TRAILER_BYTES) if size >= CRC_TRAILER_BYTES else b""
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror}") from None
        if size == 0:
            raise self._fail("empty file, not a MindSpore checkpoint")
        self._body = size
        if tail[:len(CRC_MAGIC)] == CRC_MAGIC:  # MindSpore strips this whether or not it checks it
            self.has_crc = True
            self._crc_stored = int.from_bytes(tail[len(CRC_MAGIC):], "big")
            self._body = size - CRC_TRAILER_BYTES
        if check_crc and self.has_crc:  # first, so a damaged file is reported as damaged
            self.verify_crc()
        if self._body == 0:
            raise self._fail("holds no checkpoint records, only a crc_num trailer")
        self._index(_Window(fd, self._body))
        if check_crc and not self.has_crc:
            raise self._fail("has no crc_num trailer to check (it was saved without crc_check)")

    def _index(self, w: _Window) -> None:
        records: list[_Record] = []
        pos = 0
        while pos < w.end:
            rec = _Record(pos)
            try:
                key = w.take(pos, 1)[0]
                if key != 0x0A:
                    raise _Bad(f"field key 0x{key:02x} where a Checkpoint.value record (0x0a) must start")
                n, body = w.varint(pos + 1, float("inf"))
                _parse_value(w, rec, body, body + n)
            except _Cut:
                if not records and rec.tag is None:
                    raise self._not_ckpt(w, f"its first record is cut off at byte {w.end}") from None
                raise self._fail(self._where(rec, records) + f"truncated: the file ends at byte {w.end} "
                                 "inside this record's header") from None
            except _Bad as e:
                if not records:
                    raise self._not_ckpt(w, f"first record: {e}") from None
                raise self._fail(self._where(rec, records) + str(e)) from None
            if body + n > w.end:
                raise self._fail(self._where(rec, records) + f"truncated: its record ends at byte {body + n} "
                                 f"but the data ends at byte {w.end}")
            records.append(rec)
            pos = body + n
        self._group(records)

    def _where(self, rec: _Record, records: list[_Record]) -> str:
        if rec.tag is not None:
            return f"tensor {rec.tag}: "
        after = f", after tensor {records[-1].tag}" if records else ""
        return f"record at byte {rec.start}{after}: "

    def _not_ckpt(self, w: _Window, why: str) -> WeightportError:
        try:
            head = os.pread(w.fd, 4, 0)
        except OSError:
            head = b""
        if head == _CIPHER_MAGIC:
            why = "it starts with MindSpore's encryption magic 0x7F3A5ED8"
        return self._fail(f"not a MindSpore checkpoint ({why}); encrypted checkpoints need MindSpore itself")

    def _group(self, records: list[_Record]) -> None:
        """Join adjacent records of one tag into one tensor and check each against its dims."""
        seen: set[str] = set()
        i = 0
        while i < len(records):
            first = records[i]
            j = i + 1
            while j < len(records) and records[j].tag == first.tag:
                j += 1
            group = records[i:j]
            tag = first.tag
            if tag in seen:
                raise self._fail(f"tensor {tag}: appears again at byte {first.start} after other records "
                                 "(a tensor's records must be adjacent; MindSpore would keep only the later copy)")
            seen.add(tag)
            i = j
            kinds = {r.kind for r in group}
            if kinds != {"tensor"}:
                if kinds != {"maptensor"}:
                    raise self._fail(f"tensor {tag}: mixes tensor and maptensor records")
                self._check_map(tag, group)
                self.skipped[tag] = "maptensor record (a MindSpore MapParameter, not a dense tensor)"
                continue
            for r in group[1:]:
                if r.dims != first.dims or r.ttype != first.ttype:
                    raise self._fail(f"tensor {tag}: record at byte {r.start} has dims {r.dims} of {_cut(r.ttype)}, "
                                     f"its first record dims {first.dims} of {_cut(first.ttype)}")
            ttype = first.ttype
            if ttype == "str":
                self._check_str(tag, group)
                self.skipped[tag] = "str record (a string value, not a tensor)"
                continue
            dtype = MS_DTYPES.get(ttype)
            if dtype is None:
                if ttype == "Int4":
                    raise self._fail(f"tensor {tag}: tensor_type Int4 (packed 4-bit integers) has no torch dtype")
                raise self._fail(f"tensor {tag}: unknown tensor_type {_short(ttype)}")
            if any(d < 0 for d in first.dims):
                raise self._fail(f"tensor {tag}: negative size in dims {first.dims}")
            total = sum(r.content[1] for r in group)
            size = itemsize(dtype)
            shape = tuple(first.dims)
            if shape == (0,):  # MindSpore reads dims [0] as a scalar (from an empty content, past its buffer)
                shape = ()
            need = _numel(shape) * size
            if total != need:
                over = f" over {len(group)} records" if len(group) > 1 else ""
                raise self._fail(f"tensor {tag}: tensor_content has {total} bytes{over}, "
                                 f"its dims {first.dims} of {ttype} need {need}")
            self.entries[tag] = (shape, dtype)
            self._ranges[tag] = [r.content for r in group if r.content[1]]

    def _check_str(self, tag: str, group: list[_Record]) -> None:
        """What MindSpore's load_checkpoint needs of a string: it reads the joined content as
        np.frombuffer(content, "U<n>") with n a quarter of the last record's size, and keeps the first
        string, so n must be >= 1, the content a whole number of such strings, and the first one,
        when it is a single character, at most U+10FFFF (differential fuzzing found all three read
        by us and refused by MindSpore)."""
        n = group[-1].content[1] // 4
        total = sum(r.content[1] for r in group)
        if not n:
            raise self._fail(f"tensor {tag}: str record of {group[-1].content[1]} bytes holds no character")
        if total % (4 * n):
            raise self._fail(f"tensor {tag}: str records hold {total} bytes, not a whole number of "
                             f"{4 * n}-byte strings")
        first = torch.empty(4 * n, dtype=torch.uint8)
        self._fill(tag, first, 0, [r.content for r in group if r.content[1]])
        units = first.view(torch.int32).to(torch.int64).bitwise_and(0xFFFFFFFF).tolist()
        while units and not units[-1]:
            units.pop()
        # numpy makes a str of one code unit with a check (refusing one past U+10FFFF), of several without
        if len(units) == 1 and units[0] > 0x10FFFF:
            raise self._fail(f"tensor {tag}: str record holds a character beyond U+10FFFF ({units[0]:#x})")

    def _check_map(self, tag: str, group: list[_Record]) -> None:
        """What MindSpore's _load_map_parameter needs of a map tensor's records (at most 3 parts, each
        a whole number of its numpy type, with dims, reshaped to dims[0] summed over the records);
        it reads no data (differential fuzzing found maps read by us and refused by MindSpore)."""
        import numpy as np

        lengths, rows = [0, 0, 0], [0, 0, 0]
        for i, r in enumerate(group):
            last = i == len(group) - 1
            for k, part in enumerate(r.maps):
                what = f"tensor {tag}: maptensor part {k} at byte {r.start}"
                if k >= 3:
                    raise self._fail(f"{what}: a map tensor has at most 3 parts")
                ttype = part.ttype if part.ttype in _MAP_ITEMSIZE else "float64"
                size = _MAP_ITEMSIZE[ttype]
                n = part.content[1] if part.content else 0
                if n % size:
                    raise self._fail(f"{what}: {n} bytes are not a whole number of {ttype} values")
                lengths[k] += n
                if not part.dims:
                    raise self._fail(f"{what}: no dims")
                if not last:
                    rows[k] += part.dims[0]
                    continue
                if lengths[k] % size:
                    raise self._fail(f"{what}: {lengths[k]} bytes over its records are not a whole number of "
                                     f"{ttype} values")
                first = part.dims[0] + rows[k]
                if not -(1 << 63) <= first < 1 << 63:
                    raise self._fail(f"{what}: dims[0] {first} over its records is out of range")
                dims = [first, *part.dims[1:]]
                flat = np.lib.stride_tricks.as_strided(np.zeros(1, ttype), shape=(lengths[k] // size,), strides=(0,))
                try:
                    flat.reshape(dims)
                except ValueError as e:
                    raise self._fail(f"{what}: {lengths[k] // size} values do not fit dims {dims} ({e})") from None

    # --- CRC --------------------------------------------------------------------------------

    def verify_crc(self) -> bool:
        """Check the crc_num trailer against the records: True if it matches, False if the file
        has none; a mismatch raises."""
        if not self.has_crc:
            return False
        fd = self._descriptor()
        crc = 0
        pos = 0
        while pos < self._body:
            try:
                part = os.pread(fd, min(_READ, self._body - pos), pos)
            except OSError as e:
                raise self._fail(f"cannot read: {e.strerror}") from None
            if not part:
                raise self._fail("truncated while checking the crc_num trailer")
            crc = zlib.crc32(part, crc)
            pos += len(part)
        if crc != self._crc_stored:
            raise self._fail(f"CRC mismatch: the crc_num trailer says {self._crc_stored:#010x} but the records "
                             f"hash to {crc:#010x} (the file is damaged)")
        return True

    # --- reading ----------------------------------------------------------------------------

    def _meta(self, name: str):
        if name not in self.entries and name in self.skipped:
            raise self._fail(f"{name} is a {self.skipped[name]}")
        shape, dtype = self.entries[name]
        return shape, dtype, self._ranges[name]

    def locate(self, name: str):
        shape, dtype, ranges = self._meta(name)
        if len(ranges) != 1:
            return None
        return ranges[0][0], shape, dtype

    def _fill(self, name: str, out: torch.Tensor, start: int, ranges: list[tuple[int, int]]) -> None:
        """Bytes [start, start + len(out)) of the tensor's joined contents into `out` (uint8)."""
        view = memoryview(out.numpy())
        stop = start + len(view)
        fd = self._descriptor()
        at = 0  # where the current range begins in the joined contents
        for offset, length in ranges:
            lo, hi = max(start, at), min(stop, at + length)
            if lo < hi:
                done = 0
                while lo + done < hi:
                    got = os.preadv(fd, [view[lo - start + done:hi - start]], offset + (lo - at) + done)
                    if got == 0:
                        raise self._fail(f"truncated while reading tensor {name}")
                    done += got
            at += length
            if at >= stop:
                break

    def load(self, name: str) -> torch.Tensor:
        shape, dtype, ranges = self._meta(name)
        nbytes = sum(n for _, n in ranges)
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self._fill(name, buf, 0, ranges)
        return buf.view(dtype).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        return self.load(name)

    def iter_chunks(self, name: str, chunk_bytes: int):
        """The tensor's elements, flat, in pieces of about chunk_bytes, across its records."""
        shape, dtype, ranges = self._meta(name)
        return self._chunks(name, dtype, ranges, chunk_bytes)

    def _chunks(self, name, dtype, ranges, chunk_bytes):
        size = itemsize(dtype)
        nbytes = sum(n for _, n in ranges)
        step = max(size, chunk_bytes - chunk_bytes % size)
        for start in range(0, nbytes, step):
            buf = torch.empty(min(step, nbytes - start), dtype=torch.uint8)
            self._fill(name, buf, start, ranges)
            yield buf.view(dtype)


# --- writing ------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def record_header(tag: bytes, dims: Iterable[int], ttype: bytes, content_len: int) -> bytes:
    """Every byte of one serialized `Checkpoint{value: [Value{tag, tensor}]}` before its
    tensor_content, in protobuf's own field order; the content's bytes follow it."""
    tensor_head = b"".join(b"\x08" + _varint(d) for d in dims)
    tensor_head += b"\x12" + _varint(len(ttype)) + ttype + b"\x1a" + _varint(content_len)
    tensor_len = len(tensor_head) + content_len
    value_head = b"\x0a" + _varint(len(tag)) + tag + b"\x12" + _varint(tensor_len)
    return b"\x0a" + _varint(len(value_head) + tensor_len) + value_head + tensor_head


class MsCkptWriter:
    """Writes a MindSpore .ckpt one tensor at a time, as MindSpore's save_checkpoint lays it
    out: one record per tensor, or one per CHUNK_BYTES of content for larger tensors."""

    def __init__(self, path: Path, crc: bool = False):
        self.path = Path(path)
        self._crc: int | None = 0 if crc else None
        self._names: set[str] = set()
        try:
            self._f = HashedFile(self.path)
        except OSError as e:
            raise WeightportError(f"{self.path}: cannot write: {e.strerror}") from None

    def _out(self, data) -> None:
        if self._crc is not None:
            self._crc = zlib.crc32(data, self._crc)
        self._f.write(data)

    def _plan(self, name: str, shape, dtype: torch.dtype) -> tuple[bytes, bytes, list[int], int]:
        if self._f.closed:
            raise WeightportError(f"{self.path}: internal error, tensor {name} written after close")
        if name in self._names:
            raise WeightportError(f"{self.path}: tensor {name} written twice")
        ttype = TORCH_TO_MS.get(dtype)
        if ttype is None:
            raise WeightportError(f"{self.path}: tensor {name}: dtype {dtype} has no MindSpore checkpoint type")
        shape = tuple(int(d) for d in shape)
        if shape == (0,):
            raise WeightportError(f"{self.path}: tensor {name}: shape [0] cannot be stored, "
                                  "MindSpore reads dims [0] as a scalar")
        try:
            tag = name.encode("utf-8")
        except UnicodeEncodeError:
            raise WeightportError(f"{self.path}: tensor {name!r}: name is not valid UTF-8") from None
        self._names.add(name)
        nbytes = _numel(shape) * itemsize(dtype)
        # MindSpore cuts the raw bytes at each CHUNK_BYTES; an empty tensor still gets a record
        sizes = [min(CHUNK_BYTES, nbytes - s) for s in range(0, nbytes, CHUNK_BYTES)] or [0]
        return tag, ttype.encode(), sizes, nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        self.write_chunks(name, tuple(t.shape), t.dtype, [t.reshape(-1)])

    def write_chunks(self, name: str, shape, dtype: torch.dtype, pieces: Iterable[torch.Tensor]) -> None:
        """Write one tensor from flat pieces in C order, holding no more than one piece."""
        tag, ttype, sizes, nbytes = self._plan(name, shape, dtype)
        dims = tuple(int(d) for d in shape)

        def byte_pieces():
            for piece in pieces:
                if piece.dtype != dtype:
                    raise WeightportError(f"{self.path}: internal dtype mismatch streaming tensor {name} "
                                          f"({piece.dtype}, planned {dtype})")
                data = piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes:
                    yield memoryview(data)

        source = byte_pieces()
        left = memoryview(b"")
        written = 0
        for size in sizes:
            self._out(record_header(tag, dims, ttype, size))
            need = size
            while need:
                if not left:
                    left = next(source, None)
                    if left is None:
                        raise WeightportError(f"{self.path}: tensor {name} streamed {written} bytes, planned {nbytes}")
                part = left[:need]
                self._out(part)
                left = left[len(part):]
                need -= len(part)
                written += len(part)
        extra = len(left) + sum(len(p) for p in source)
        if extra:
            raise WeightportError(f"{self.path}: tensor {name} streamed {written + extra} bytes, planned {nbytes}")

    def close(self) -> None:
        if self._f.closed:
            return
        if self._crc is not None:
            self._f.write(CRC_MAGIC + self._crc.to_bytes(10, "big"))
        self._f.close()

    def abort(self) -> None:
        """Close and remove the partial file."""
        try:
            self._f.abort()
        finally:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()
