"""Our readers refuse what the libraries that define the formats refuse (issue 19): safetensors'
own reader, torch.load(weights_only=True), MindSpore's load_checkpoint. One test per class of
refusal, each checking that the library refuses the file too, that we refuse it with one line
naming the file and the tensor, and that what the library reads we read byte for byte.
tests/test_fuzz_differential.py does the same with random mutations."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import build_hf, run_cli
from weightport.errors import WeightportError
from weightport.formats.mindspore.ckpt import MsCkptFile, _varint
from weightport.io.safetensors_file import SafetensorsFile
from weightport.io.torch_file import TorchFile

# --- safetensors ------------------------------------------------------------------------------


def st_bytes(header: str | bytes, data: bytes = b"") -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


def lib_reads(path: Path) -> dict[str, torch.Tensor] | None:
    """What safetensors' own reader returns, or None if it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal
        return None


def ours_refuses(path: Path) -> str:
    """Our one-line refusal, without the leading path."""
    with pytest.raises(WeightportError) as e:
        f = SafetensorsFile(path)
        f.close()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: "):]


F = '"dtype":"F32","shape":[2]'
D8 = struct.pack("<2f", 1.0, 2.0)
D16 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)

# (case, header, data, our message): the library refuses every one of these
REFUSED = [
    ("hole before the first tensor", '{"a":{%s,"data_offsets":[4,12]}}' % F, bytes(12),
     "tensor a: data_offsets [4, 12] leave a hole of 4 bytes before the first tensor (tensors must be back to "
     "back from byte 0 of the data)"),
    ("hole between tensors", '{"a":{%s,"data_offsets":[0,8]},"b":{%s,"data_offsets":[12,20]}}' % (F, F), bytes(20),
     "tensor b: data_offsets [12, 20] leave a hole of 4 bytes after tensor a (tensors must be back to back from "
     "byte 0 of the data)"),
    ("overlap", '{"a":{%s,"data_offsets":[0,8]},"b":{%s,"data_offsets":[4,12]}}' % (F, F), bytes(12),
     "tensor b: data_offsets [4, 12] overlap tensor a (which ends at byte 8)"),
    ("same range twice", '{"a":{%s,"data_offsets":[0,8]},"b":{%s,"data_offsets":[0,8]}}' % (F, F), D8,
     "tensor b: data_offsets [0, 8] overlap tensor a (which ends at byte 8)"),
    ("end before begin", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', D8,
     "tensor a: data_offsets [8, 0] end before they begin"),
    ("float offset", '{"a":{%s,"data_offsets":[0,8.0]}}' % F, D8,
     "tensor a: data_offsets [0, 8.0] are not two integers >= 0"),
    ("exponent offset", '{"a":{%s,"data_offsets":[0,8e0]}}' % F, D8,
     "tensor a: data_offsets [0, 8.0] are not two integers >= 0"),
    ("string offset", '{"a":{%s,"data_offsets":[0,"8"]}}' % F, D8,
     'tensor a: data_offsets [0, "8"] are not two integers >= 0'),
    ("negative zero offset", '{"a":{%s,"data_offsets":[-0,8]}}' % F, D8,
     "tensor a: data_offsets [-0.0, 8] are not two integers >= 0"),
    ("three offsets", '{"a":{%s,"data_offsets":[0,8,8]}}' % F, D8,
     "tensor a: data_offsets [0, 8, 8] are not two integers >= 0"),
    ("offsets as a string", '{"a":{%s,"data_offsets":"08"}}' % F, D8,
     'tensor a: data_offsets "08" are not two integers >= 0'),
    ("boolean dim", '{"a":{"dtype":"F32","shape":[true,2],"data_offsets":[0,8]}}', D8,
     "tensor a: shape [true, 2] is not a list of integers >= 0"),
    ("float dim", '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', D8,
     "tensor a: shape [2.0] is not a list of integers >= 0"),
    ("shape as a string", '{"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}', D8,
     'tensor a: shape "2" is not a list of integers >= 0'),
    ("dims overflow before a zero", '{"a":{"dtype":"F32","shape":[4611686018427387904,4,0],"data_offsets":[0,0]}}', b"",
     "tensor a: shape [4611686018427387904, 4, 0] overflows (more than 2^64 elements)"),
    ("duplicate tensor name", '{"a":{%s,"data_offsets":[0,8]},"a":{%s,"data_offsets":[8,16]}}' % (F, F), D16,
     "tensor a: appears twice in the header"),
    ("nested duplicate", '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D8,
     "tensor a: field dtype appears twice"),
    ("__metadata__ twice", '{"__metadata__":{},"__metadata__":{},"a":{%s,"data_offsets":[0,8]}}' % F, D8,
     "corrupt safetensors header (__metadata__ appears twice)"),
    ("__metadata__ value not a string", '{"__metadata__":{"format":1},"a":{%s,"data_offsets":[0,8]}}' % F, D8,
     "corrupt safetensors header (__metadata__ 'format' is an integer, not a string)"),
    ("__metadata__ value null", '{"__metadata__":{"format":null},"a":{%s,"data_offsets":[0,8]}}' % F, D8,
     "corrupt safetensors header (__metadata__ 'format' is null, not a string)"),
    ("__metadata__ not an object", '{"__metadata__":"pt","a":{%s,"data_offsets":[0,8]}}' % F, D8,
     "corrupt safetensors header (__metadata__ is a string, not an object of strings)"),
    ("__metadata__ a list", '{"__metadata__":[],"a":{%s,"data_offsets":[0,8]}}' % F, D8,
     "corrupt safetensors header (__metadata__ is a list, not an object of strings)"),
    ("trailing bytes", '{"a":{%s,"data_offsets":[0,8]}}' % F, D8 + bytes(4),
     "4 bytes after the tensors are not covered by any: the last tensor (a) ends at byte 8 of the data but the "
     "file holds 12"),
    ("data but no tensor", "{}", bytes(3),
     "3 bytes after the tensors are not covered by any: the header lists no tensor, so the data ends at byte 0 of "
     "the data but the file holds 3"),
    ("NaN in an ignored field", '{"a":{%s,"data_offsets":[0,8],"x":NaN}}' % F, D8,
     "corrupt safetensors header (not JSON: NaN is not JSON)"),
    ("a number past a double", '{"a":{%s,"data_offsets":[0,8],"x":1e400}}' % F, D8,
     "corrupt safetensors header (not JSON: number out of range (1e400))"),
    ("lone surrogate", '{"a":{%s,"data_offsets":[0,8],"x":"\\ud800"}}' % F, D8,
     "corrupt safetensors header (not JSON: a string holds a lone surrogate escape (\\ud800-\\udfff))"),
    ("UTF-8 byte order mark", b'\xef\xbb\xbf{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D8,
     "corrupt safetensors header (not JSON)"),
    ("nested 128 deep", '{"a":{%s,"data_offsets":[0,8],"x":%s}}' % (F, "[" * 126 + "]" * 126), D8,
     "corrupt safetensors header (not JSON: JSON nested deeper than 127 levels)"),
    ("unknown dtype", '{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', D8, "tensor a: unknown dtype 'f32'"),
    ("entry not an object", '{"a":null}', b"", "tensor a: header entry is null, not an object"),
    ("missing dtype", '{"a":{"shape":[2],"data_offsets":[0,8]}}', D8, "tensor a: header entry has no dtype"),
    ("size mismatch", '{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}', D8,
     "tensor a: data_offsets [0, 8] do not match shape [2] F16 (4 bytes)"),
]


@pytest.mark.parametrize("header,data,expected", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_safetensors_refusals(tmp_path, header, data, expected):
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_bytes(header, data))
    assert lib_reads(path) is None, "the safetensors library reads this file"
    assert ours_refuses(path) == expected


def test_header_over_the_librarys_limit(tmp_path):
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as f:  # sparse: 100 MB of header that takes no disk
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(8 + 100_000_001)
    assert lib_reads(path) is None
    assert ours_refuses(path) == ("not safetensors (header length 100000001 is over the 100,000,000 bytes the "
                                  "format allows)")


# read by both: the same names, dtypes, shapes and bytes
READ = [
    ("whitespace around the header", ' \t{"a":{%s,"data_offsets":[0,8]}}\n  ' % F, D8),
    ("tensors listed out of order", '{"b":{%s,"data_offsets":[8,16]},"a":{%s,"data_offsets":[0,8]}}' % (F, F), D16),
    ("empty tensors at one offset",
     '{"a":{%s,"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[8,8]},'
     '"f":{"dtype":"I64","shape":[2,0],"data_offsets":[8,8]}}' % F, D8),
    ("an unknown field, even twice", '{"a":{%s,"data_offsets":[0,8],"x":1,"x":[2]}}' % F, D8),
    ("__metadata__ null", '{"__metadata__":null,"a":{%s,"data_offsets":[0,8]}}' % F, D8),
    ("a name with a newline and the empty name", '{"a\\nb":{%s,"data_offsets":[0,8]},"":{%s,"data_offsets":[8,16]}}'
     % (F, F), D16),
    ("a big integer in an ignored field", '{"a":{%s,"data_offsets":[0,8],"x":1%s}}' % (F, "0" * 300), D8),
]


@pytest.mark.parametrize("header,data", [c[1:] for c in READ], ids=[c[0] for c in READ])
def test_safetensors_read_as_the_library_reads(tmp_path, header, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_bytes(header, data))
    theirs = lib_reads(path)
    assert theirs is not None
    f = SafetensorsFile(path)
    try:
        assert sorted(f.entries) == sorted(theirs)
        for name, t in theirs.items():
            ours = f.load(name)
            assert (ours.dtype, ours.shape) == (t.dtype, t.shape) and torch.equal(ours, t), name
            assert torch.equal(f.mapped(name), t), name
    finally:
        f.close()


# read by the library, refused by us on purpose (fuzz/differential.py STRICTER says why)
STRICTER = [
    ("same tensor twice", '{"a":{%s,"data_offsets":[0,8]},"a":{%s,"data_offsets":[0,8]}}' % (F, F), D8,
     "tensor a: appears twice in the header"),
    ("metadata key twice", '{"__metadata__":{"format":"pt","format":"ms"},"a":{%s,"data_offsets":[0,8]}}' % F, D8,
     "corrupt safetensors header (__metadata__ key 'format' appears twice)"),
    ("entry as an array", '{"a":["F32",[2],[0,8]]}', D8, "tensor a: header entry is a list, not an object"),
    ("dtype as an object", '{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', D8,
     "tensor a: dtype is an object, not a string"),
    ("a dtype weightport does not convert", '{"a":{"dtype":"U16","shape":[4],"data_offsets":[0,8]}}', D8,
     "tensor a: dtype U16 is not supported (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, "
     "F8_E5M2)"),
    ("an empty tensor past torch's size",
     '{"a":{"dtype":"F32","shape":[0,4611686018427387904,4],"data_offsets":[0,0]}}', b"",
     "tensor a: shape [0, 4611686018427387904, 4] is too large for a torch tensor"),
]


@pytest.mark.parametrize("header,data,expected", [c[1:] for c in STRICTER], ids=[c[0] for c in STRICTER])
def test_safetensors_deliberately_stricter(tmp_path, header, data, expected):
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_bytes(header, data))
    assert lib_reads(path) is not None
    assert ours_refuses(path) == expected


def test_embedding_overlapping_the_lm_head_is_refused(tmp_path):
    """The bug of issue 19: an embedding whose data_offsets are the lm_head's converted with exit 0,
    and the output's embedding was the lm_head."""
    src = build_hf("llama3", tmp_path / "src")
    path = src / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    embed, head = header["model.embed_tokens.weight"], header["lm_head.weight"]
    assert embed["shape"] == head["shape"] and embed["dtype"] == head["dtype"]
    # every tensor but the embedding back to back; the embedding pointed at the lm_head's bytes
    out, at = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        if name == "model.embed_tokens.weight":
            continue
        b, end = e["data_offsets"]
        out[name] = {**e, "data_offsets": [at, at + end - b]}
        at += end - b
    out["model.embed_tokens.weight"] = {**embed, "data_offsets": out["lm_head.weight"]["data_offsets"]}
    body = b"".join(data[b:end] for b, end in (e["data_offsets"] for name, e in sorted(
        header.items(), key=lambda kv: kv[1]["data_offsets"]) if name != "model.embed_tokens.weight"))
    text = json.dumps({"__metadata__": meta, **out}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    assert lib_reads(path) is None, "the safetensors library reads it"
    begin, end = out["lm_head.weight"]["data_offsets"]
    proc = run_cli("convert", src, tmp_path / "out", "--to", "litgpt")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"weightport: error: {path}: tensor model.embed_tokens.weight: data_offsets [{begin}, {end}] overlap tensor "
        f"lm_head.weight (which ends at byte {end})"], proc.stderr
    assert not (tmp_path / "out").exists()


# --- torch zip ---------------------------------------------------------------------------------


def _members(data: bytes) -> list[tuple[str, bytes]]:
    z = zipfile.ZipFile(io.BytesIO(data))
    return [(i.filename, z.read(i)) for i in z.infolist()]


def _rezip(members: list[tuple[str, bytes]]) -> bytes:
    """A stored zip, each member's data 64-byte aligned as torch.save aligns it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            pad = -(buf.tell() + 30 + len(name.encode()) + 4) % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(info, data)
    return buf.getvalue()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_refuses(path: Path) -> str:
    with pytest.raises(WeightportError) as e:
        TorchFile(path).close()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: "):]


def test_a_storage_larger_than_its_record_is_refused(tmp_path):
    """torch.load with mmap (how we load) took the storage's 8 bytes from a 4-byte record and the zip
    header after it; without mmap, torch refuses the file."""
    members = _members(_torch_bytes({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}))
    members = [(n, d[:4] if n.endswith("/data/0") else d) for n, d in members]
    path = tmp_path / "m.bin"
    path.write_bytes(_rezip(members))
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(path, weights_only=True)
    assert torch_refuses(path) == "storage 0: its record data/0 holds 4 bytes, the pickle reads 8 (2 x float32) from it"


def test_a_local_header_that_disagrees_with_the_directory_is_refused(tmp_path):
    """torch.load returned uninitialized memory for such a member."""
    data = bytearray(_torch_bytes({"a": torch.arange(4.0)}))
    z = zipfile.ZipFile(io.BytesIO(bytes(data)))
    info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data[info.header_offset + 6] ^= 0x08  # the local header loses its data-descriptor flag
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(data))
    assert torch_refuses(path) == (f"zip member {info.filename}: local header (flags 0x800, method 0) disagrees "
                                   "with the zip directory (flags 0x808, method 0)")


def test_a_big_endian_file_reads_as_torch_reads_it(tmp_path):
    """torch byte-swaps a big-endian file's storages in its mapping; we used to read the file's bytes by
    range, and to hand the swapped pages back (so a tied tensor read second came back unswapped)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, generator=g)
    members = _members(_torch_bytes({"w": w, "tied": w, "i": torch.arange(3, dtype=torch.int32)}))
    members = [(n, b"big" if n.endswith("/byteorder") else d) for n, d in members]
    path = tmp_path / "m.bin"
    path.write_bytes(_rezip(members))
    theirs = torch.load(path, weights_only=True)
    f = TorchFile(path)
    try:
        for name in ("w", "tied", "i"):
            assert torch.equal(f.load(name), theirs[name]), name
        assert not torch.equal(theirs["w"], w)  # the bytes were swapped
    finally:
        f.close()


def test_a_tensor_under_a_key_that_is_not_a_string_is_refused(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({1: torch.ones(2), "b": torch.ones(1)}, path)
    assert torch_refuses(path) == "a tensor is stored under the key '1', which is int, not a string"


def test_a_name_twice_once_orig_mod_is_dropped_is_refused(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"_orig_mod.a": torch.ones(2), "a": torch.zeros(2)}, path)
    assert torch_refuses(path) == "tensor a appears twice (with and without _orig_mod.)"


# --- MindSpore .ckpt ---------------------------------------------------------------------------


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(field: int, body: bytes) -> bytes:
    return _key(field, 2) + _varint(len(body)) + body


def _tensor(dims, ttype: bytes, content: bytes) -> bytes:
    return b"".join(_key(1, 0) + _varint(d) for d in dims) + _ld(2, ttype) + _ld(3, content)


def _record(tag: bytes, tensor_body: bytes, extra: bytes = b"") -> bytes:
    return _ld(1, _ld(1, tag) + _ld(2, tensor_body) + extra)


def _map_record(tag: bytes, parts: list[bytes]) -> bytes:
    return _ld(1, _ld(1, tag) + _ld(3, b"".join(_ld(1, p) for p in parts)))


A = _record(b"a", _tensor([2], b"Float32", struct.pack("<2f", 1.0, 2.0)))


def ckpt(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "m.ckpt"
    path.write_bytes(data)
    return path


def ckpt_refuses(path: Path) -> str:
    with pytest.raises(WeightportError) as e:
        MsCkptFile(path).close()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: "):]


# (case, data, our message): MindSpore's load_checkpoint refuses each of these (protobuf first)
CKPT_REFUSED = [
    ("field number 0", A + _ld(1, _ld(1, b"b") + _ld(2, _tensor([1], b"Float32", bytes(4))) + b"\x00\x00"),
     "tensor b: field number 0 at byte 52"),
    ("a tensor_type that is not UTF-8, even when a later one is",
     A + _record(b"b", _ld(2, b"\xff") + _tensor([1], b"Float32", bytes(4))),
     "tensor b: tensor_type is not UTF-8 (b'\\xff')"),
    ("a str of less than one character", A + _record(b"s", _tensor([0], b"str", b"abc")),
     "tensor s: str record of 3 bytes holds no character"),
    ("a str not a whole number of strings", A + _record(b"s", _tensor([0], b"str", b"ab\0\0")
                                                       + b"") + _record(b"s", _tensor([0], b"str", b"c\0\0\0d\0\0\0")),
     "tensor s: str records hold 12 bytes, not a whole number of 8-byte strings"),
    ("a one-character str past U+10FFFF", A + _record(b"s", _tensor([0], b"str", struct.pack("<2I", 0x110000, 0))),
     "tensor s: str record holds a character beyond U+10FFFF (0x110000)"),
    ("a map part not a whole number of values",
     A + _map_record(b"m", [_tensor([3], b"int32", bytes(10))]),
     "tensor m: maptensor part 0 at byte 28: 10 bytes are not a whole number of int32 values"),
    ("a map of four parts", A + _map_record(b"m", [_tensor([1], b"int32", bytes(4))] * 4),
     "tensor m: maptensor part 3 at byte 28: a map tensor has at most 3 parts"),
    ("a map part that does not fit its dims", A + _map_record(b"m", [_tensor([3, 2], b"float32", bytes(8))]),
     "tensor m: maptensor part 0 at byte 28: 2 values do not fit dims [3, 2] (cannot reshape array of size 2 into "
     "shape (3,2))"),
    ("a map part without dims", A + _map_record(b"m", [_ld(2, b"int32") + _ld(3, bytes(4))]),
     "tensor m: maptensor part 0 at byte 28: no dims"),
]


@pytest.mark.parametrize("data,expected", [c[1:] for c in CKPT_REFUSED], ids=[c[0] for c in CKPT_REFUSED])
def test_ckpt_refusals(tmp_path, data, expected):
    assert ckpt_refuses(ckpt(tmp_path, data)) == expected


def _read(path: Path) -> dict:
    f = MsCkptFile(path)
    try:
        return {n: f.load(n) for n in f.entries}, dict(f.skipped)
    finally:
        f.close()


def test_ckpt_read_as_protobuf_parses_it(tmp_path):
    """A 10-byte varint keeps its low 64 bits; a tag field under an over-long key is an unknown field;
    a second tensor field is merged into the first; a str of several characters past U+10FFFF and a
    well-formed map are read (and skipped), as MindSpore reads them."""
    content = struct.pack("<2f", 3.0, 4.0)
    masked = _key(1, 0) + b"\x82" + b"\x80" * 8 + b"\x7e"  # dims 2, with bits past 64 dropped
    b_rec = _ld(1, _ld(1, b"b") + b"\x8a\x00" + _varint(1) + b"x" + _ld(2, masked + _ld(2, b"Float32"))
                + _ld(2, _ld(3, content)))
    strs = _record(b"s", _tensor([0], b"str", struct.pack("<2I", 0x110000, 0x110000)))
    maps = _map_record(b"m", [_tensor([2], b"int32", bytes(8)), _tensor([2, 2], b"float32", bytes(16))])
    tensors, skipped = _read(ckpt(tmp_path, A + b_rec + strs + maps))
    assert sorted(tensors) == ["a", "b"]
    assert torch.equal(tensors["b"], torch.tensor([3.0, 4.0]))
    assert set(skipped) == {"s", "m"}


def test_ckpt_dims_zero_is_a_scalar(tmp_path):
    """MindSpore reads dims [0] as a scalar; with an empty content it read 4 bytes past the buffer,
    where we read an empty tensor. Now that is refused."""
    path = ckpt(tmp_path, A + _record(b"z", _tensor([0], b"Float32", b"")))
    assert ckpt_refuses(path) == "tensor z: tensor_content has 0 bytes, its dims [0] of Float32 need 4"
    tensors, _ = _read(ckpt(tmp_path, A + _record(b"z", _tensor([0], b"Float32", struct.pack("<f", 5.0)))))
    assert tensors["z"].shape == () and float(tensors["z"]) == 5.0


def test_mindspore_refuses_and_reads_these_too(tmp_path):
    """The same files through MindSpore's own load_checkpoint (fuzz/ms_reference.py, in a subprocess)."""
    import importlib.util
    import os
    import sys

    from conftest import ROOT, mindspore_python

    exe = mindspore_python()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("mindspore missing in CI (`make test` must install it into the test venv)")
        pytest.skip("mindspore not installed; run `make test` to install it")
    spec = importlib.util.spec_from_file_location("differential", ROOT / "fuzz" / "differential.py")
    diff = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("differential", diff)
    spec.loader.exec_module(diff)
    paths = []
    for i, (_, data, _) in enumerate(CKPT_REFUSED):
        paths.append(tmp_path / f"r{i}.ckpt")
        paths[-1].write_bytes(data)
    content = struct.pack("<2f", 3.0, 4.0)
    masked = _key(1, 0) + b"\x82" + b"\x80" * 8 + b"\x7e"
    read = tmp_path / "read.ckpt"
    read.write_bytes(A + _ld(1, _ld(1, b"b") + b"\x8a\x00" + _varint(1) + b"x" + _ld(2, masked + _ld(2, b"Float32"))
                             + _ld(2, _ld(3, content)))
                     + _record(b"s", _tensor([0], b"str", struct.pack("<2I", 0x110000, 0x110000)))
                     + _map_record(b"m", [_tensor([2], b"int32", bytes(8)), _tensor([2, 2], b"float32", bytes(16))]))
    outcomes = diff.ref_ckpt_batch(paths + [read], exe, tmp_path)
    for (case, _, _), outcome in zip(CKPT_REFUSED, outcomes):
        assert not outcome.read, f"MindSpore reads: {case}"
    theirs, ours = outcomes[-1], diff.ours_ckpt(read)
    assert theirs.read and ours.read
    assert theirs.tensors == ours.tensors and theirs.extra == ours.extra == {"str": ["s"], "map": ["m"]}
