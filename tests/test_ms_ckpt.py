"""MindSpore .ckpt reading and writing without MindSpore, checked against protobuf and the real
MindSpore (tests/peers/mindspore_peer.py, run as a subprocess by the `mindspore_peer` fixture)."""

from __future__ import annotations

import binascii
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from weightport.errors import WeightportError
from weightport.formats.mindspore import ckpt as ms_ckpt
from weightport.formats.mindspore import open_weights
from weightport.formats.mindspore.ckpt import CHUNK_BYTES, MS_DTYPES, TORCH_TO_MS, MsCkptFile, MsCkptWriter, record_header


# --- the schema, built at runtime (mindspore.train.checkpoint_pb2 needs MindSpore) -----------

def _schema():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="weightport_test_checkpoint.proto", syntax="proto2")
    ck = fdp.message_type.add(name="Checkpoint")
    ck.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".Checkpoint.Value")
    value = ck.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    value.field.add(name="tensor", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".TensorProto", oneof_index=0)
    value.field.add(name="maptensor", number=3, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".MapTensorProto", oneof_index=0)
    value.oneof_decl.add(name="value")
    tp = fdp.message_type.add(name="TensorProto")
    tp.field.add(name="dims", number=1, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
    tp.field.add(name="tensor_type", number=2, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    tp.field.add(name="tensor_content", number=3, label=F.LABEL_REQUIRED, type=F.TYPE_BYTES)
    mp = fdp.message_type.add(name="MapTensorProto")
    mp.field.add(name="tensor", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".TensorProto")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("Checkpoint"))


Checkpoint = _schema()


def pb_record(tag: str, dims, ttype: str, content: bytes) -> bytes:
    """One record as protobuf itself serializes it (what MindSpore writes per record)."""
    ck = Checkpoint()
    v = ck.value.add()
    v.tag = tag
    v.tensor.dims.extend(dims)
    v.tensor.tensor_type = ttype
    v.tensor.tensor_content = content
    return ck.SerializeToString()


def pb_records(tag: str, t: torch.Tensor, chunk: int = CHUNK_BYTES) -> bytes:
    raw = _raw(t)
    cuts = range(0, len(raw), chunk) if raw else [0]
    return b"".join(pb_record(tag, list(t.shape), TORCH_TO_MS[t.dtype], raw[i:i + chunk]) for i in cuts)


def with_crc(body: bytes) -> bytes:
    return body + b"crc_num" + binascii.crc32(body).to_bytes(10, "big")


def parse(data: bytes):
    if data[-17:-10] == b"crc_num":
        data = data[:-17]
    ck = Checkpoint()
    ck.ParseFromString(data)
    return list(ck.value)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample(dtype: torch.dtype, shape=(3, 4), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits."""
    return a.shape == b.shape and a.dtype == b.dtype and _raw(a) == _raw(b)


def write(path: Path, tensors: dict[str, torch.Tensor], crc=False) -> Path:
    w = MsCkptWriter(path, crc=crc)
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    return path


EVERY = {f"t.{name}": sample(dt, seed=i) for i, (name, dt) in enumerate(MS_DTYPES.items())}
EVERY.update({
    "scalar.i64": torch.tensor(7, dtype=torch.int64),
    "scalar.f32": torch.tensor(0.5, dtype=torch.float32),
    "scalar.bool": torch.tensor(True),
    "empty.2x0": torch.zeros(2, 0),
    "empty.0x3": torch.zeros(0, 3, dtype=torch.bfloat16),
    # bf16 values that float16 cannot hold, so a bf16-as-fp16 mix-up shows
    "bf16.wide": torch.tensor([1e30, -3e-30, 1.0 / 3, 65504 * 4], dtype=torch.bfloat16),
    "model.layers.0.attention.wq.weight": sample(torch.float16, (8, 16)),
})


# --- pure tests ----------------------------------------------------------------------------

def test_dtype_table_matches_mindspore_names():
    assert set(MS_DTYPES) == {"Float32", "Float16", "BFloat16", "Float64", "Int8", "UInt8", "Int16", "UInt16",
                              "Int32", "UInt32", "Int64", "UInt64", "Bool"}
    assert all(TORCH_TO_MS[dt] == name for name, dt in MS_DTYPES.items())


@pytest.mark.parametrize("crc", [False, True])
def test_round_trip_every_dtype(tmp_path, crc):
    path = write(tmp_path / "m.ckpt", EVERY, crc=crc)
    f = MsCkptFile(path, check_crc=crc)
    try:
        assert list(f.entries) == list(EVERY)
        assert f.skipped == {}
        assert f.has_crc is crc
        for name, t in EVERY.items():
            assert f.entries[name] == (tuple(t.shape), t.dtype)
            assert same(f.load(name), t), name
    finally:
        f.close()
    # and protobuf agrees on every record
    values = parse(path.read_bytes())
    assert [v.tag for v in values] == list(EVERY)
    for v, (name, t) in zip(values, EVERY.items()):
        assert list(v.tensor.dims) == list(t.shape)
        assert v.tensor.tensor_type == TORCH_TO_MS[t.dtype]
        assert v.tensor.tensor_content == _raw(t)


def test_bytes_identical_to_protobuf_serialization(tmp_path, monkeypatch):
    """Hand-encoded headers + streamed content == protobuf's own bytes, varint edge cases too."""
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "s": torch.tensor(5, dtype=torch.int64),
        "e": torch.zeros(0, 3),
        "n" * 130 + ".ü": sample(torch.bfloat16, (70,)),  # tag and content lengths over 127
        "big": sample(torch.float16, (3, 5000)),  # 30,000 bytes: a 3-byte length varint
        "dims": torch.zeros(200, 1, 1, 1, 129, dtype=torch.uint8),  # dims >= 128
    }
    path = write(tmp_path / "m.ckpt", tensors, crc=True)
    expected = with_crc(b"".join(pb_records(n, t) for n, t in tensors.items()))
    assert path.read_bytes() == expected
    for n, t in tensors.items():
        raw = _raw(t)
        assert record_header(n.encode(), t.shape, TORCH_TO_MS[t.dtype].encode(), len(raw)) + raw == pb_records(n, t)

    # and a tensor over the record limit: the same cut points as protobuf-per-chunk writing
    monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", 30)
    t = sample(torch.float32, (7, 5))  # 140 bytes -> 30, 30, 30, 30, 20
    path = write(tmp_path / "multi.ckpt", {"w": t, "b": torch.ones(3)})
    assert path.read_bytes() == pb_records("w", t, 30) + pb_records("b", torch.ones(3), 30)


def test_multi_record_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", 30)  # not a multiple of 4: records split elements
    t = sample(torch.float32, (7, 5))
    path = write(tmp_path / "m.ckpt", {"before": torch.ones(2), "w": t, "after": torch.zeros(3, dtype=torch.int8)})
    values = parse(path.read_bytes())
    assert [v.tag for v in values] == ["before"] + ["w"] * 5 + ["after"]
    assert all(list(v.tensor.dims) == [7, 5] for v in values if v.tag == "w")  # full dims in every chunk
    assert [len(v.tensor.tensor_content) for v in values if v.tag == "w"] == [30, 30, 30, 30, 20]
    f = MsCkptFile(path)
    try:
        assert list(f.entries) == ["before", "w", "after"]
        assert f.entries["w"] == ((7, 5), torch.float32)
        assert same(f.load("w"), t)
        assert f.locate("w") is None and f.locate("before") is not None
        for chunk_bytes in (4, 24, 30, 64, 1000, 3):
            pieces = list(f.iter_chunks("w", chunk_bytes))
            step = max(1, chunk_bytes // 4)
            assert [p.numel() for p in pieces[:-1]] == [step] * (len(pieces) - 1)
            assert all(p.dtype == torch.float32 and p.dim() == 1 for p in pieces)
            assert same(torch.cat(pieces).reshape(7, 5), t)
        assert list(f.iter_chunks("before", 4))[1].tolist() == [1.0]
    finally:
        f.close()


def test_write_chunks_streams_into_records(tmp_path, monkeypatch):
    monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", 32)
    t = sample(torch.bfloat16, (9, 7))
    flat = t.reshape(-1)
    whole = write(tmp_path / "whole.ckpt", {"w": t})
    w = MsCkptWriter(tmp_path / "pieces.ckpt")
    # pieces that straddle record boundaries, including an empty one
    w.write_chunks("w", t.shape, t.dtype, [flat[:5], flat[5:5], flat[5:40], flat[40:]])
    w.close()
    assert (tmp_path / "pieces.ckpt").read_bytes() == whole.read_bytes()

    w = MsCkptWriter(tmp_path / "short.ckpt")
    with pytest.raises(WeightportError, match="tensor w streamed 20 bytes, planned 126"):
        w.write_chunks("w", t.shape, t.dtype, [flat[:10]])
    with pytest.raises(WeightportError, match="tensor v streamed 128 bytes, planned 126"):
        w.write_chunks("v", t.shape, t.dtype, [flat, flat[:1]])
    with pytest.raises(WeightportError, match="internal dtype mismatch streaming tensor u"):
        w.write_chunks("u", t.shape, t.dtype, [flat.float()])
    w.abort()
    assert not (tmp_path / "short.ckpt").exists()


def test_crc_trailer(tmp_path):
    t = {"a": sample(torch.float32, (4, 4)), "b": sample(torch.int64, (3,))}
    with_trailer = write(tmp_path / "c.ckpt", t, crc=True)
    plain = write(tmp_path / "p.ckpt", t, crc=False)
    data = with_trailer.read_bytes()
    assert data[:-17] == plain.read_bytes()
    assert data[-17:-10] == b"crc_num" and int.from_bytes(data[-10:], "big") == binascii.crc32(data[:-17])

    f = MsCkptFile(with_trailer, check_crc=True)
    assert f.has_crc and f.verify_crc() is True
    f.close()
    f = MsCkptFile(plain)
    assert not f.has_crc and f.verify_crc() is False
    f.close()
    with pytest.raises(WeightportError) as e:
        MsCkptFile(plain, check_crc=True)
    assert str(e.value) == f"{plain}: has no crc_num trailer to check (it was saved without crc_check)"

    damaged = tmp_path / "d.ckpt"
    bad = bytearray(data)
    bad[-20] ^= 0x01  # inside b's content
    damaged.write_bytes(bytes(bad))
    calc = binascii.crc32(bytes(bad[:-17]))
    with pytest.raises(WeightportError) as e:
        MsCkptFile(damaged, check_crc=True)
    assert str(e.value) == (f"{damaged}: CRC mismatch: the crc_num trailer says {binascii.crc32(data[:-17]):#010x} "
                            f"but the records hash to {calc:#010x} (the file is damaged)")
    f = MsCkptFile(damaged)  # unchecked, it reads (as MindSpore does without crc_check)
    assert not torch.equal(f.load("b"), t["b"])
    with pytest.raises(WeightportError, match="CRC mismatch"):
        f.verify_crc()
    f.close()


def test_indexing_reads_headers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", 2**20)
    tensors = {f"layer.{i}": sample(torch.float32, (512, 1024), seed=i) for i in range(4)}  # 2 MiB each
    path = write(tmp_path / "m.ckpt", tensors, crc=True)
    size = path.stat().st_size
    counted = {"n": 0}
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd, n, offset):
        out = real_pread(fd, n, offset)
        counted["n"] += len(out)
        return out

    def preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        counted["n"] += got
        return got

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    f = MsCkptFile(path)
    try:
        assert len(parse(path.read_bytes())) == 8  # two records per tensor
        assert f.entries == {n: ((512, 1024), torch.float32) for n in tensors}
        assert counted["n"] <= 8 * 4096 + 17, counted["n"]  # a small window per record, of 8 MiB
        counted["n"] = 0
        assert same(f.load("layer.2"), tensors["layer.2"])
        assert counted["n"] == 2 * 2**20  # the tensor's bytes and nothing else
        counted["n"] = 0
        assert f.verify_crc() and counted["n"] == size - 17
    finally:
        f.close()


def test_the_format_opens_a_ckpt_as_a_tensor_source(tmp_path):
    tensors = {"x": sample(torch.float16, (2, 3)), "y": torch.tensor(3, dtype=torch.int64)}
    path = write(tmp_path / "m.ckpt", tensors)
    with open_weights(path) as src:
        assert {n: (m.shape, m.dtype, m.file) for n, m in src.tensors.items()} == {
            "x": ((2, 3), torch.float16, path), "y": ((), torch.int64, path)}
        assert same(src.load("x"), tensors["x"])
        assert same(torch.cat(list(src.iter_chunks("x", 4))).reshape(2, 3), tensors["x"])


def test_str_and_maptensor_records_are_skipped(tmp_path):
    ck = Checkpoint()
    v = ck.value.add()
    v.tag = "map"
    for arr in (np.arange(3, dtype=np.int32), np.ones((3, 2), np.float32), np.zeros(3, np.int32)):
        tp = v.maptensor.tensor.add()
        tp.dims.extend(arr.shape)
        tp.tensor_type = str(arr.dtype)
        tp.tensor_content = arr.tobytes()
    body = (pb_record("w", [2], "Float32", _raw(torch.ones(2)))
            + pb_record("note", [0], "str", np.array("héllo").tobytes())  # as MindSpore writes a str
            + ck.SerializeToString() + ck.SerializeToString()  # a map tensor in two slices
            + pb_record("step", [], "Int64", _raw(torch.tensor(7))))
    path = tmp_path / "m.ckpt"
    path.write_bytes(with_crc(body))
    f = MsCkptFile(path, check_crc=True)
    try:
        assert list(f.entries) == ["w", "step"]
        assert f.skipped == {"note": "str record (a string value, not a tensor)",
                             "map": "maptensor record (a MindSpore MapParameter, not a dense tensor)"}
        with pytest.raises(WeightportError) as e:
            f.load("note")
        assert str(e.value) == f"{path}: note is a str record (a string value, not a tensor)"
    finally:
        f.close()


def _key(field: int, wire: int) -> bytes:
    return ms_ckpt._varint(field << 3 | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + ms_ckpt._varint(len(payload)) + payload


def test_any_field_order_packed_dims_and_unknown_fields(tmp_path):
    """What protobuf accepts: fields out of order, packed dims, unknown fields."""
    content = _raw(torch.arange(6, dtype=torch.int16))
    tensor = (_ld(3, content) + _key(9, 0) + b"\x05" + _ld(1, b"\x02\x03") + _key(7, 5) + b"abcd"
              + _ld(2, b"Int16") + _key(8, 1) + b"12345678")
    value = _ld(2, tensor) + _ld(15, b"ignored") + _ld(1, b"odd")
    path = tmp_path / "m.ckpt"
    path.write_bytes(_ld(1, value) + pb_record("zero", [0], "Float32", _raw(torch.tensor(2.5))))
    ck = Checkpoint()
    ck.ParseFromString(path.read_bytes())  # protobuf agrees this is valid
    f = MsCkptFile(path)
    try:
        assert f.entries == {"odd": ((2, 3), torch.int16), "zero": ((), torch.float32)}  # dims [0] + 4 bytes: scalar
        assert f.load("odd").tolist() == [[0, 1, 2], [3, 4, 5]]
        assert f.load("zero").item() == 2.5
    finally:
        f.close()


def _ok(tag="a", n=2) -> bytes:
    return pb_record(tag, [n], "Float32", _raw(torch.ones(n)))


# (name, file bytes, expected message after "{path}: "); offsets are computed from the bytes
A = _ok()
MALFORMED = [
    ("empty", b"", "empty file, not a MindSpore checkpoint"),
    ("trailer only", with_crc(b""), "holds no checkpoint records, only a crc_num trailer"),
    ("truncated content", A + _ok("b", 8)[:-5],
     f"tensor b: truncated: its record ends at byte {len(A) + len(_ok('b', 8))} but the data ends at byte "
     f"{len(A) + len(_ok('b', 8)) - 5}"),
    ("truncated header", A + _ok("b")[:3],
     f"record at byte {len(A)}, after tensor a: truncated: the file ends at byte {len(A) + 3} inside this "
     "record's header"),
    ("truncated after tag", A + _ok("bee")[:9],
     f"tensor bee: truncated: the file ends at byte {len(A) + 9} inside this record's header"),
    ("bad varint", A + b"\x0a" + b"\xff" * 11 + b"\x01",
     f"record at byte {len(A)}, after tensor a: bad varint at byte {len(A) + 1}"),
    ("wrong wire type for tag", A + _ld(1, _key(1, 0) + b"\x05"),
     f"record at byte {len(A)}, after tensor a: field tag has wire type 0, expected 2 (length-delimited)"),
    ("wrong wire type in tensor", A + _ld(1, _ld(1, b"b") + _ld(2, _key(2, 0) + b"\x01" + _ld(3, b""))),
     "tensor b: field tensor_type has wire type 0, expected 2 (length-delimited)"),
    ("group wire type", A + _ld(1, _ld(1, b"b") + _key(4, 3)),
     "tensor b: field #4 has wire type 3, which a checkpoint never uses"),
    ("top-level key", A + _ld(2, b"xx"),
     f"record at byte {len(A)}, after tensor a: field key 0x12 where a Checkpoint.value record (0x0a) must start"),
    ("no tag", A + _ld(1, _ld(2, _ld(2, b"Float32") + _ld(3, b""))),
     f"record at byte {len(A)}, after tensor a: record has no tag"),
    ("no tensor", A + _ld(1, _ld(1, b"b")), "tensor b: record holds neither a tensor nor a maptensor"),
    ("no tensor_type", A + _ld(1, _ld(1, b"b") + _ld(2, _ld(3, b""))), "tensor b: tensor has no tensor_type"),
    ("no tensor_content", A + _ld(1, _ld(1, b"b") + _ld(2, _ld(2, b"Float32"))),
     "tensor b: tensor has no tensor_content"),
    ("field overruns", A + _ld(1, _ld(1, b"b") + _key(2, 2) + b"\x50" + b"\x0a"),
     f"tensor b: field tensor at byte {len(A) + 7} (80 bytes) runs past the end of its message"),
    ("content size", A + pb_record("model.norm_out.weight", [4], "Float32", b"\0" * 12),
     "tensor model.norm_out.weight: tensor_content has 12 bytes, its dims [4] of Float32 need 16"),
    ("chunked size", A + pb_record("w", [2, 4], "Float16", b"\0" * 8) + pb_record("w", [2, 4], "Float16", b"\0" * 6),
     "tensor w: tensor_content has 14 bytes over 2 records, its dims [2, 4] of Float16 need 16"),
    ("chunk dims differ", A + pb_record("w", [2, 4], "Float16", b"\0" * 8) + pb_record("w", [4, 2], "Float16", b"\0" * 8),
     f"tensor w: record at byte {len(A) + len(pb_record('w', [2, 4], 'Float16', bytes(8)))} has dims [4, 2] of "
     "Float16, its first record dims [2, 4] of Float16"),
    ("negative dim", A + pb_record("w", [-2], "Float32", b""), "tensor w: negative size in dims [-2]"),
    ("unknown tensor_type", A + pb_record("w", [2], "Float8", b"\0\0"), "tensor w: unknown tensor_type 'Float8'"),
    ("int4", A + pb_record("w", [2], "Int4", b"\0"),
     "tensor w: tensor_type Int4 (packed 4-bit integers) has no torch dtype"),
    ("non-UTF-8 tag", A + _ld(1, _ld(1, b"\xff\xfe") + _ld(2, _ld(2, b"Float32") + _ld(3, b""))),
     f"record at byte {len(A)}, after tensor a: tag is not UTF-8 (b'\\xff\\xfe')"),
    ("tag repeated", A + _ok("b") + _ok("a"),
     f"tensor a: appears again at byte {2 * len(A)} after other records (a tensor's records must be adjacent; "
     "MindSpore would keep only the later copy)"),
    ("not protobuf", b"PK\x03\x04" + bytes(100),
     "not a MindSpore checkpoint (first record: field key 0x50 where a Checkpoint.value record (0x0a) must start); "
     "encrypted checkpoints need MindSpore itself"),
    ("cut first record", A[:3],
     "not a MindSpore checkpoint (its first record is cut off at byte 3); encrypted checkpoints need MindSpore itself"),
    ("encrypted", bytes.fromhex("d85e3a7f") + os.urandom(200),
     "not a MindSpore checkpoint (it starts with MindSpore's encryption magic 0x7F3A5ED8); "
     "encrypted checkpoints need MindSpore itself"),
]


@pytest.mark.parametrize("data,expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_one_line(tmp_path, data, expected):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(data)
    with pytest.raises(WeightportError) as e:
        MsCkptFile(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == f"{path}: {expected}"


def test_malformed_checks_also_hold_under_a_crc(tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(with_crc(A + pb_record("w", [2], "Float8", b"\0\0")))
    with pytest.raises(WeightportError) as e:
        MsCkptFile(path, check_crc=True)
    assert str(e.value) == f"{path}: tensor w: unknown tensor_type 'Float8'"


def test_writer_refuses_what_mindspore_cannot_hold(tmp_path):
    path = tmp_path / "w.ckpt"
    w = MsCkptWriter(path)
    with pytest.raises(WeightportError) as e:
        w.write("f8", torch.zeros(2, dtype=torch.float8_e4m3fn))
    assert str(e.value) == f"{path}: tensor f8: dtype torch.float8_e4m3fn has no MindSpore checkpoint type"
    with pytest.raises(WeightportError) as e:
        w.write("e", torch.zeros(0))
    assert str(e.value) == f"{path}: tensor e: shape [0] cannot be stored, MindSpore reads dims [0] as a scalar"
    w.write("x", torch.ones(1))
    with pytest.raises(WeightportError) as e:
        w.write("x", torch.ones(1))
    assert str(e.value) == f"{path}: tensor x written twice"
    w.abort()
    assert not path.exists()

    with pytest.raises(RuntimeError):
        with MsCkptWriter(path) as w:
            w.write("x", torch.ones(1))
            raise RuntimeError("stop")
    assert not path.exists()
    with MsCkptWriter(path, crc=True) as w:
        w.write("x", sample(torch.float32, (2, 2)).t())  # a non-contiguous view is written in C order
    f = MsCkptFile(path, check_crc=True)
    assert same(f.load("x"), sample(torch.float32, (2, 2)).t().contiguous())
    f.close()


# --- against the real MindSpore -----------------------------------------------------------

def _as_f32_or_native(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_mindspore_loads_our_files(tmp_path, monkeypatch, mindspore_peer):
    monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", 1000)
    tensors = dict(EVERY)
    tensors["multi.w"] = sample(torch.bfloat16, (30, 40))  # 2,400 bytes: 3 records
    tensors["multi.i"] = sample(torch.int32, (7, 100))  # 2,800 bytes: records cut at 1000, 2000
    with_trailer = write(tmp_path / "crc.ckpt", tensors, crc=True)
    plain = write(tmp_path / "plain.ckpt", tensors, crc=False)
    assert sum(v.tag == "multi.w" for v in parse(plain.read_bytes())) == 3
    damaged = tmp_path / "damaged.ckpt"
    bad = bytearray(with_trailer.read_bytes())
    bad[len(bad) // 2] ^= 0x40
    damaged.write_bytes(bytes(bad))

    ops = [{"op": "load", "path": str(with_trailer), "crc_check": True, "out_dir": str(tmp_path / "o1")},
           {"op": "load", "path": str(plain), "crc_check": False, "out_dir": str(tmp_path / "o2")},
           {"op": "load", "path": str(with_trailer), "crc_check": False, "out_dir": str(tmp_path / "o3")},
           {"op": "load", "path": str(damaged), "crc_check": True, "out_dir": str(tmp_path / "o4")},
           {"op": "load", "path": str(damaged), "crc_check": False, "out_dir": str(tmp_path / "o5")}]
    r = mindspore_peer(ops, tmp_path)
    for res in r[:3]:
        assert "error" not in res, res
        params = res["params"]
        assert [p["name"] for p in params] == list(tensors)
        for p, (name, t) in zip(params, tensors.items()):
            assert p["kind"] == "tensor" and p["param_name"] == name
            assert tuple(p["shape"]) == tuple(t.shape), name
            assert p["dtype"] == TORCH_TO_MS[t.dtype], name
            got = np.load(p["npy"])
            want = _as_f32_or_native(t)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
    # MindSpore words its CRC failure as "Failed to read the checkpoint file ...", so the
    # unchecked load of the same file shows that it was the CRC that failed
    assert r[3]["error"].startswith("ValueError: Failed to read the checkpoint file"), r[3]
    assert "error" not in r[4], r[4]
    with pytest.raises(WeightportError, match="CRC mismatch"):
        MsCkptFile(damaged, check_crc=True)


def _bf16_exact(shape, seed) -> torch.Tensor:
    return sample(torch.float32, shape, seed).to(torch.bfloat16)


def test_we_read_mindspore_files(tmp_path, monkeypatch, mindspore_peer):
    tensors = {
        "model.tok_embeddings.embedding_weight": sample(torch.float32, (16, 8)),
        "model.layers.0.attention.wq.weight": sample(torch.float16, (8, 8), 1),
        "model.norm_out.weight": _bf16_exact((8,), 2),
        "lm_head.weight": _bf16_exact((40, 50), 3),  # 4,000 bytes: 4 records of at most 1 KiB
        "count": torch.tensor(11, dtype=torch.int64),
        "mask": sample(torch.bool, (3, 3), 4),
        "ids": sample(torch.uint8, (5,), 5),
        "step": sample(torch.float64, (2, 2), 6),
    }
    params = []
    for i, (name, t) in enumerate(tensors.items()):
        npy = tmp_path / f"in{i}.npy"
        np.save(npy, _as_f32_or_native(t))
        params.append({"name": name, "npy": str(npy), "dtype": "bfloat16" if t.dtype == torch.bfloat16 else None})
    theirs, extra, small = tmp_path / "theirs.ckpt", tmp_path / "extra.ckpt", tmp_path / "small.ckpt"
    ops = [{"op": "save", "path": str(theirs), "params": params, "crc_check": True, "slice_kb": 1},
           {"op": "save", "path": str(extra), "params": params[:2], "crc_check": True,
            "append": {"note": "héllo wörld", "global_step": 7, "loss_scale": 0.5}},
           {"op": "save", "path": str(small), "params": params, "crc_check": False}]
    r = mindspore_peer(ops, tmp_path)
    assert all("error" not in x for x in r), r
    assert sum(v.tag == "lm_head.weight" for v in parse(theirs.read_bytes())) == 4

    for path in (theirs, small):
        f = MsCkptFile(path, check_crc=path == theirs)
        try:
            assert list(f.entries) == list(tensors) and f.skipped == {}
            for name, t in tensors.items():
                assert f.entries[name] == (tuple(t.shape), t.dtype)
                assert same(f.load(name), t), name
                assert same(torch.cat(list(f.iter_chunks(name, 300))).reshape(t.shape), t), name
        finally:
            f.close()

    f = MsCkptFile(extra, check_crc=True)
    try:
        assert list(f.entries) == list(tensors)[:2] + ["global_step", "loss_scale"]
        assert f.skipped == {"note": "str record (a string value, not a tensor)"}
        assert same(f.load("global_step"), torch.tensor(7, dtype=torch.int64))
        assert same(f.load("loss_scale"), torch.tensor(0.5, dtype=torch.float32))
    finally:
        f.close()

    # same tensors, same order, same record size: our writer's bytes are MindSpore's bytes
    assert write(tmp_path / "ours_small.ckpt", tensors).read_bytes() == small.read_bytes()
    monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", 1024)
    assert write(tmp_path / "ours.ckpt", tensors, crc=True).read_bytes() == theirs.read_bytes()


def test_mindspore_schema_serializes_as_we_write(tmp_path, mindspore_peer):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "s": torch.tensor(5, dtype=torch.int64),
               "é" * 100: sample(torch.bfloat16, (300,)), "e": torch.zeros(2, 0, dtype=torch.int16)}
    records = [{"tag": n, "dims": list(t.shape), "tensor_type": TORCH_TO_MS[t.dtype], "content_hex": _raw(t).hex()}
               for n, t in tensors.items()]
    out = tmp_path / "pb.ckpt"
    r = mindspore_peer([{"op": "serialize", "path": str(out), "records": records}], tmp_path)
    assert "error" not in r[0], r
    assert write(tmp_path / "ours.ckpt", tensors).read_bytes() == out.read_bytes()


def test_encrypted_mindspore_file_is_refused(tmp_path, mindspore_peer):
    npy = tmp_path / "w.npy"
    np.save(npy, np.ones((3, 4), np.float32))
    enc = tmp_path / "enc.ckpt"
    r = mindspore_peer([{"op": "save", "path": str(enc), "params": [{"name": "w", "npy": str(npy)}],
                         "enc_key": "0123456789abcdef"}], tmp_path)
    assert "error" not in r[0], r
    with pytest.raises(WeightportError) as e:
        MsCkptFile(enc)
    assert str(e.value) == (f"{enc}: not a MindSpore checkpoint (it starts with MindSpore's encryption magic "
                            "0x7F3A5ED8); encrypted checkpoints need MindSpore itself")


def test_real_512mib_records_both_ways(tmp_path, mindspore_peer):
    """The real record limit, not a patched one: a 513 MiB tensor is two records either way."""
    n = CHUNK_BYTES + 2**20
    shape = [n // 1024, 1024]
    t = torch.arange(251, dtype=torch.uint8).repeat(n // 251 + 1)[:n].reshape(shape)
    digest = hashlib.sha256(_raw(t)).hexdigest()
    ours, theirs = tmp_path / "ours.ckpt", tmp_path / "theirs.ckpt"
    write(ours, {"embed": t}, crc=True)
    del t
    r = mindspore_peer([
        {"op": "load", "path": str(ours), "crc_check": True, "hash_only": True},
        {"op": "save", "path": str(theirs), "crc_check": True,
         "params": [{"name": "embed", "fill": {"shape": shape, "np_dtype": "uint8", "mod": 251}}]},
    ], tmp_path)
    assert "error" not in r[0] and "error" not in r[1], r
    assert r[0]["params"] == [{"name": "embed", "kind": "tensor", "param_name": "embed", "shape": shape,
                               "dtype": "UInt8", "sha256": digest}]
    f = MsCkptFile(theirs, check_crc=True)
    try:
        assert f.entries == {"embed": (tuple(shape), torch.uint8)}
        assert [n for _, n in f._ranges["embed"]] == [CHUNK_BYTES, 2**20]
        h = hashlib.sha256()
        for piece in f.iter_chunks("embed", 64 * 2**20):
            h.update(piece.numpy().tobytes())
        assert h.hexdigest() == digest
    finally:
        f.close()
    try:
        assert _file_sha(ours) == _file_sha(theirs)
    finally:  # a GiB that pytest would otherwise keep for its last three runs
        ours.unlink()
        theirs.unlink()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            h.update(block)
    return h.hexdigest()
