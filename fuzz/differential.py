#!/usr/bin/env python3
"""Differential fuzzing: weightport's readers against the libraries that define each format.

    python fuzz/differential.py [--safetensors N] [--torch N] [--ckpt N] [--seed S] [--keep DIR]

Each input is a random mutation of a small valid file. It is given to the reference reader
(`safetensors.safe_open(framework="pt")`, `torch.load(weights_only=True)`, and, where it is
installed, `mindspore.load_checkpoint` in a subprocess, fuzz/ms_reference.py) and to ours
(SafetensorsFile, TorchFile, MsCkptFile). The rules:

- the reference refuses => we refuse (one-line WeightportError), except the training-bookkeeping
  globals our torch reader binds to inert stand-ins (TORCH_LENIENT);
- the reference reads => we read the same names, shapes, dtypes and bytes, or refuse with one of
  the deliberate stricter checks listed in STRICTER (each says why).

Anything else is a disagreement; the runner prints the counts and exits 1 if there was one.
tests/test_fuzz_differential.py runs the same targets under hypothesis (FUZZ_EXAMPLES each).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import torch

from weightport.errors import WeightportError
from weightport.formats.mindspore.ckpt import MS_DTYPES, MsCkptFile, MsCkptWriter
from weightport.io.pickle_scan import globals_in_torch_zip
from weightport.io.safetensors_file import SafetensorsFile
from weightport.io.torch_file import INERT_GLOBALS, INERT_PACKAGES, TorchFile, _torch_allowed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Where we refuse a file the reference reads, on purpose. Matched against our one-line message.
STRICTER: dict[str, list[tuple[str, str]]] = {
    "safetensors": [
        # the library keeps the last of two same-named tensors or metadata keys; JSON parsers differ
        # in which one they keep, so the header is ambiguous
        ("duplicate tensor name or metadata key", r"appears twice in the header|__metadata__ key .* appears twice"),
        # serde also takes a struct written as an array ["F32", [2], [0, 8]]; the format says object
        ("entry written as an array", r"header entry is a list, not an object"),
        # serde also takes a unit variant written as {"F32": null}
        ("dtype written as an object", r"dtype is an object, not a string"),
        # U16, U32, U64, C64, F8_E8M0, F8_*FNUZ, F4, F6_*: dtypes weightport does not convert
        ("dtype weightport does not convert", r"dtype \w+ is not supported"),
        # an empty tensor whose other dims multiply past 2^63: torch cannot make it (the library
        # fails with MemoryError on some of these and reads others)
        ("empty tensor with dims past 2^63", r"is too large for a torch tensor"),
    ],
    "torch": [
        # torch.load returns any object; a conversion needs a dict of tensors
        ("not a state dict of tensors", r"holds no tensors|not a state dict of tensors"),
        ("legacy (non-zip) torch file", r"not a zip-format torch checkpoint"),
        ("a tensor under a key that is not a string", r"a tensor is stored under the key .*, not a string"),
        ("a name twice once _orig_mod. is dropped", r"appears twice \(with and without _orig_mod\.\)"),
        # which of two same-named members a zip reader takes differs between readers
        ("zip member twice", r"zip member .* appears twice"),
        # torch.save stores every member; mapped (mmap=True, as weightport loads), torch would read a
        # deflated record's compressed bytes as the tensor
        ("compressed zip member", r"zip member .* is compressed"),
        # torch.load returned uninitialized memory for such a member (a garbage tensor, a random id)
        ("zip local header disagrees with the directory", r"local header .* disagrees with the zip directory"),
        ("zip member marked as a directory", r"zip member .* is marked as a directory"),
        # torch's zip reader (miniz) reads on past some corruption of the zip directory that Python's
        # zipfile, which weightport checks the records with, refuses
        ("zip directory Python's zipfile finds corrupt", r"cannot read the zip directory"),
    ],
    "ckpt": [
        # protobuf skips a known field sent with another wire type, and unknown groups; no writer
        # produces them
        ("field with an unexpected wire type", r"has wire type \d"),
        ("top-level field other than Checkpoint.value", r"where a Checkpoint\.value record \(0x0a\) must start"),
        # proto2 marks these required; protobuf's Python parser does not check
        ("record without tag", r"record has no tag"),
        ("record without tensor or maptensor", r"record holds neither a tensor nor a maptensor"),
        ("tensor without tensor_content", r"tensor has no tensor_content"),
        # MindSpore keeps the later copy, or joins differing records by the last one's dims
        ("a tensor's records not adjacent", r"appears again at byte \d+ after other records"),
        ("a tensor's records disagree", r"record at byte \d+ has dims .* its first record dims"),
        ("tensor and maptensor records under one tag", r"mixes tensor and maptensor records"),
        ("Int4 (no torch dtype)", r"tensor_type Int4"),
        # lengths a real checkpoint never has (a corrupt length, not a name)
        ("tag or tensor_type over 1 MiB", r"of \d+ bytes is not a (parameter name|type name)"),
        ("packed dims over 4 KiB", r"packed dims of \d+ bytes"),
    ],
}


def stricter_label(target: str, message: str) -> str | None:
    for label, pattern in STRICTER[target]:
        if re.search(pattern, message):
            return label
    return None


# the globals torch.load(weights_only=True) refuses and our torch reader binds to inert stand-ins
TORCH_LENIENT = (INERT_PACKAGES, INERT_GLOBALS)


def _inert(name: str) -> bool:
    return name.split(".")[0] in INERT_PACKAGES or name in INERT_GLOBALS


# --- outcomes -------------------------------------------------------------------------------

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes in C order, bit for bit (copied as integers of its width, so a
    bool byte 0x02 or a NaN payload is not normalized on the way)."""
    if not t.numel():
        return hashlib.sha256(b"").hexdigest()
    t = t.detach()
    t = t.unsqueeze(0) if not t.dim() else t
    bits = t.view(_BITS[t.element_size()]) if t.element_size() in _BITS else t
    flat = torch.empty(t.numel(), dtype=bits.dtype)
    flat.copy_(bits.reshape(-1))
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def tensor_info(t: torch.Tensor) -> tuple:
    return tuple(t.shape), str(t.dtype).removeprefix("torch."), digest(t)


class Outcome:
    """A reader's verdict: read (tensors: name -> (shape, dtype, sha256)) or refused (message)."""

    def __init__(self, tensors: dict | None = None, refused: str | None = None, extra: dict | None = None,
                 crashed: str | None = None):
        self.tensors, self.refused, self.extra, self.crashed = tensors, refused, extra or {}, crashed

    @property
    def read(self) -> bool:
        return self.refused is None

    def __repr__(self) -> str:
        return f"refused({self.refused[:300]!r})" if self.refused is not None else f"read({self.tensors}, {self.extra})"


def _ours(fn, path: Path) -> Outcome:
    """Our reader; WeightportError is a refusal and must be one line. Anything else propagates."""
    try:
        return fn(path)
    except WeightportError as e:
        msg = str(e)
        if not msg.strip() or "\n" in msg.strip():
            return Outcome(refused=msg, crashed=f"a multi-line or empty error: {msg!r}")
        if str(path) not in msg:
            return Outcome(refused=msg, crashed=f"an error that does not name the file: {msg!r}")
        return Outcome(refused=msg)
    except Exception as e:  # noqa: BLE001 - a finding: our reader must only ever raise WeightportError
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome(refused=f"{type(e).__name__}: {e}",
                       crashed=f"our reader raised {type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})")


def judge(target: str, path: Path, ref: Outcome, ours: Outcome) -> tuple[str, str | None]:
    """(category, what went wrong or None). Categories: refused by both, read equal by both,
    stricter: LABEL, lenient: LABEL, disagreement."""
    if ours.crashed:
        return "disagreement", ours.crashed
    if not ref.read and not ours.read:
        if ref.refused.startswith(("UNSAFE", "CRASHED")):  # MindSpore would read past its buffer, or died
            return "refused by both (" + ref.refused.split(":")[0].lower() + ")", None
        return "refused by both", None
    if ref.read and ours.read:
        if ref.tensors == ours.tensors and ref.extra == ours.extra:
            return "read equal by both", None
        keys = sorted(set(ref.tensors) | set(ours.tensors), key=str)
        diff = {k: (ref.tensors.get(k), ours.tensors.get(k)) for k in keys if ref.tensors.get(k) != ours.tensors.get(k)}
        return "disagreement", (f"both read, differently: (reference, ours) {diff}"
                                + (f"; extra {ref.extra} vs {ours.extra}" if ref.extra != ours.extra else ""))
    if ref.read:
        label = stricter_label(target, ours.refused)
        if label:
            return f"stricter: {label}", None
        return "disagreement", f"reference reads {ref}\n  we refuse: {ours.refused}"
    if target == "torch" and ref.refused.startswith("UnpicklingError"):
        named = re.search(r"Unsupported global: GLOBAL (.+?) was not an allowed global", ref.refused)
        refused = [n for n in globals_in_torch_zip(path) if n not in _torch_allowed()]
        name = named and (named.group(1) if "." in named.group(1) else "builtins." + named.group(1))
        if named and _inert(name) and all(_inert(n) for n in refused):
            refused.append(name)
            return "lenient: inert stand-in for " + ", ".join(sorted({n.split(".")[0] for n in refused})), None
    return "disagreement", f"reference refuses ({ref.refused[:400]})\n  we read {ours}"


# --- safetensors ----------------------------------------------------------------------------

def ref_safetensors(path: Path) -> Outcome:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: tensor_info(f.get_tensor(k)) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any refusal (SafetensorError, TypeError, MemoryError, ...)
        return Outcome(refused=f"{type(e).__name__}: {e}")
    return Outcome(tensors, extra={"metadata": dict(meta)})


def ours_safetensors(path: Path) -> Outcome:
    def read(p):
        f = SafetensorsFile(p)
        try:
            tensors = {}
            for name in f.entries:
                t = f.load(name)
                info = tensor_info(t)
                if digest(f.mapped(name)) != info[2]:
                    raise AssertionError(f"tensor {name}: mapped() and load() differ")
                tensors[name] = info
            return Outcome(tensors, extra={"metadata": f.metadata})
        finally:
            f.close()
    return _ours(read, path)


def seeds_safetensors() -> list[bytes]:
    from safetensors.torch import save

    from weightport.io.safetensors_file import header_bytes

    g = torch.Generator().manual_seed(0)
    a = {"model.embed_tokens.weight": torch.randn(4, 3, generator=g),
         "lm_head.weight": torch.randn(4, 3, generator=g),
         "norm.bias": torch.arange(5, dtype=torch.float16),
         "c": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16)}
    b = {"i": torch.arange(3, dtype=torch.int64), "flag": torch.tensor([True, False]), "u": torch.arange(4, dtype=torch.uint8),
         "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "f8": torch.ones(2).to(torch.float8_e4m3fn),
         "i16": torch.arange(2, dtype=torch.int16), "d": torch.ones(1, dtype=torch.float64)}
    ours = [(n, tuple(t.shape), t.dtype) for n, t in a.items()]
    written = header_bytes(ours, {"format": "pt", "note": "x"}) + b"".join(
        t.contiguous().view(torch.uint8).numpy().tobytes() for t in a.values())
    return [save(a, metadata={"format": "pt"}), save(b), written]


class _Pairs(list):
    """A JSON object as a list of (key, value): may hold a key twice."""


class _Raw(str):
    """JSON text put in as is (-0, 8.0, NaN, ...)."""


def _dumps(v) -> str:
    if isinstance(v, _Raw):
        return str(v)
    if isinstance(v, _Pairs):
        return "{" + ",".join(json.dumps(k) + ":" + _dumps(x) for k, x in v) + "}"
    if isinstance(v, dict):
        return _dumps(_Pairs(v.items()))
    if isinstance(v, list):
        return "[" + ",".join(_dumps(x) for x in v) + "]"
    return json.dumps(v)


_ODD_NUMBERS = ["8.0", "-0", "1e1", "-1", "true", "null", '"8"', "18446744073709551615", "18446744073709551616",
                "1" + "0" * 400, "NaN", "Infinity", "[]", "{}", "0.5", "9223372036854775808", "1E400", "-9223372036854775809"]
_LIB_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
               "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
_ODD_VALUES = [None, 1, 1.5, "x", [], {}, [1, 2], {"a": "b"}, True, _Raw("NaN"), _Raw("-0"), _Raw('"\\ud800"'),
               _Raw('"\\udc00x"'), _Raw('"\\ud83d\\ude00"'), _Raw("1" + "0" * 300), _Raw("1" + "0" * 320),
               _Raw("[" * 130 + "]" * 130), _Raw("[" * 120 + "]" * 120), _Raw("1e-400"), "\x00", ""]


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n], object_pairs_hook=_Pairs)
    return n, header, data[8 + n:]


def _entry_index(rng: random.Random, header: _Pairs) -> int | None:
    idx = [i for i, (k, _) in enumerate(header) if k != "__metadata__" and isinstance(_, _Pairs)]
    return rng.choice(idx) if idx else None


def _set_field(entry: _Pairs, key: str, value) -> None:
    for i, (k, _) in enumerate(entry):
        if k == key:
            entry[i] = (k, value)
            return
    entry.append((key, value))


def _get_field(entry: _Pairs, key: str, default=None):
    return next((v for k, v in entry if k == key), default)


def mutate_safetensors_header(rng: random.Random, header: _Pairs, data: bytearray) -> str:
    """One edit of the header (or of its data section); returns what it did."""
    i = _entry_index(rng, header)
    kind = rng.choice(["shift", "overlap", "offset-type", "dup-name", "dup-field", "dup-metadata", "dup-meta-key",
                       "metadata-value", "metadata-type", "extra-field", "dtype", "shape", "shape-type", "array-entry",
                       "drop", "rename", "swap", "add-zero", "add", "data-extra", "data-cut", "offsets-len",
                       "relayout", "relayout", "same-width"])
    if i is None and kind not in ("dup-metadata", "dup-meta-key", "metadata-value", "metadata-type", "add-zero",
                                  "data-extra", "add"):
        kind = "add-zero"
    if i is not None:
        name, entry = header[i]
        offs = list(_get_field(entry, "data_offsets", [0, 0])) if isinstance(_get_field(entry, "data_offsets"), list) else [0, 0]
    if kind == "relayout":  # a valid file again: the tensors' data in another order, offsets to match
        ents = [(j, e) for j, (k, e) in enumerate(header) if isinstance(e, _Pairs) and k != "__metadata__"]
        spans = [_get_field(e, "data_offsets") for _, e in ents]
        if not all(isinstance(o, list) and len(o) == 2 and all(type(x) is int for x in o) for o in spans):
            return "relayout: offsets not plain"
        order = list(range(len(ents)))
        rng.shuffle(order)
        new_data, at = bytearray(), 0
        for k in order:
            b, e = spans[k]
            new_data += data[b:e]
            _set_field(ents[k][1], "data_offsets", [at, at + e - b])
            at += e - b
        data[:] = new_data + data[max([e for _, e in spans] or [0]):]
        if rng.random() < 0.5:
            header[:] = header[::-1]
        return f"relayout {order}"
    if kind == "same-width":
        width = {"F32": ["I32", "U32", "F32"], "F16": ["BF16", "I16", "U16"], "BF16": ["F16", "I16"], "I64": ["F64", "U64", "C64"],
                 "U8": ["I8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0"], "BOOL": ["U8", "I8"], "I8": ["U8", "F8_E5M2"],
                 "F8_E4M3": ["U8", "F8_E5M2"], "I16": ["F16"], "F64": ["I64"]}
        dt = _get_field(entry, "dtype")
        new = rng.choice(width.get(dt, ["F32"]))
        _set_field(entry, "dtype", new)
        return f"{name} dtype {dt} -> {new}"
    if kind == "shift":
        which = rng.choice([0, 1, 2])
        d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 16])
        new = [x + d if which in (j, 2) and isinstance(x, int) else x for j, x in enumerate(offs)]
        _set_field(entry, "data_offsets", new)
        return f"shift {name} offsets {which} by {d}"
    if kind == "overlap":
        others = [e for k, e in header if k != name and k != "__metadata__" and isinstance(e, _Pairs)]
        if others:
            other = rng.choice(others)
            o = _get_field(other, "data_offsets")
            if rng.random() < 0.5:
                _set_field(entry, "data_offsets", o)
                _set_field(entry, "shape", _get_field(other, "shape"))
                _set_field(entry, "dtype", _get_field(other, "dtype"))
                return f"{name} takes another tensor's offsets, shape and dtype"
            _set_field(entry, "data_offsets", o)
            return f"{name} takes another tensor's offsets"
        return "overlap: no other tensor"
    if kind == "offset-type":
        j = rng.choice([0, 1])
        if rng.random() < 0.5 and isinstance(offs[j], int):
            raw = rng.choice([f"{offs[j]}.0", f'"{offs[j]}"', f"{offs[j]}e0", f"{offs[j] * 10}e-1", "-0" if offs[j] == 0 else f"{offs[j]}.00"])
        else:
            raw = rng.choice(_ODD_NUMBERS)
        offs = list(offs)
        offs[j] = _Raw(raw)
        _set_field(entry, "data_offsets", offs)
        return f"{name} offset {j} = {raw[:20]}"
    if kind == "offsets-len":
        new = rng.choice([offs[:1], offs + [offs[-1]], [], {"0": offs[0], "1": offs[1]}, f"{offs}", None])
        _set_field(entry, "data_offsets", new)
        return f"{name} offsets = {str(new)[:30]}"
    if kind == "dup-name":
        j = rng.randrange(len(header) + 1)
        e2 = _Pairs(entry) if rng.random() < 0.5 else _Pairs((k, v) for k, v in rng.choice(
            [e for k, e in header if isinstance(e, _Pairs) and k != "__metadata__"]))
        header.insert(j, (name, e2))
        return f"tensor {name} twice"
    if kind == "dup-field":
        f = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        entry.insert(rng.randrange(len(entry) + 1), (f, _get_field(entry, f, 1)))
        if f == "extra":
            entry.append((f, 2))
        return f"{name} field {f} twice"
    if kind == "dup-metadata":
        meta = next((v for k, v in header if k == "__metadata__"), _Pairs())
        header.insert(rng.randrange(len(header) + 1), ("__metadata__", rng.choice([meta, _Pairs([("x", "y")]), None])))
        if sum(1 for k, _ in header if k == "__metadata__") < 2:
            header.append(("__metadata__", None))
        return "__metadata__ twice"
    if kind in ("dup-meta-key", "metadata-value", "metadata-type"):
        at = next((j for j, (k, _) in enumerate(header) if k == "__metadata__"), None)
        if at is None:
            header.insert(0, ("__metadata__", _Pairs([("format", "pt")])))
            at = 0
        meta = header[at][1]
        if kind == "metadata-type" or not isinstance(meta, _Pairs):
            new = rng.choice(["pt", 1, [], ["a", "b"], None, _Raw("NaN"), _Pairs(), True])
            header[at] = ("__metadata__", new)
            return f"__metadata__ = {str(new)[:20]}"
        if kind == "dup-meta-key":
            key = meta[0][0] if meta else "k"
            meta.append((key, "again"))
            if len(meta) < 2:
                meta.append((key, "again"))
            return "metadata key twice"
        key = rng.choice([k for k, _ in meta] + ["new"])
        value = rng.choice([1, 1.5, [], ["a"], None, {}, True, "s", "", _Raw('"\\ud800"'), _Raw("-0")])
        meta.append((key, value)) if key == "new" else meta.__setitem__([k for k, _ in meta].index(key), (key, value))
        return f"metadata {key} = {str(value)[:20]}"
    if kind == "extra-field":
        key = rng.choice(["q", "extra", "", "dtype_", "__metadata__"])
        value = rng.choice(_ODD_VALUES)
        if rng.random() < 0.3:
            value = _Pairs([("k", 1), ("k", 2)])
        if rng.random() < 0.2:  # at the top level instead (a non-object tensor entry)
            header.insert(rng.randrange(len(header) + 1), (key or "zz", value))
            return f"top-level {key!r} = {str(value)[:20]}"
        entry.append((key, value))
        return f"{name} extra {key!r} = {str(value)[:20]}"
    if kind == "dtype":
        new = rng.choice(_LIB_DTYPES + ["f32", "F32 ", "XX", "", "FLOAT", _Raw('{"F32":null}'), _Raw('{"F32":1}'),
                                        _Raw("null"), _Raw("1"), _Raw('["F32"]')])
        _set_field(entry, "dtype", new)
        return f"{name} dtype = {new}"
    if kind == "shape":
        shape = _get_field(entry, "shape", [])
        shape = list(shape) if isinstance(shape, list) else []
        op = rng.choice(["inc", "dec", "drop", "add1", "add0", "zero", "swap", "huge", "reshape"])
        if op == "inc" and shape:
            shape[rng.randrange(len(shape))] += 1
        elif op == "dec" and shape:
            shape[rng.randrange(len(shape))] -= 1
        elif op == "drop" and shape:
            shape.pop(rng.randrange(len(shape)))
        elif op == "add1":
            shape.insert(rng.randrange(len(shape) + 1), 1)
        elif op == "add0":
            shape.insert(rng.randrange(len(shape) + 1), 0)
        elif op == "zero" and shape:
            shape[rng.randrange(len(shape))] = 0
        elif op == "swap" and len(shape) > 1:
            shape.reverse()
        elif op == "huge":
            shape = rng.choice([[0, 2**62, 4], [2**62, 4, 0], [0, 2**63 - 1], [2**63 - 1, 0], [0, 2**63 - 1, 2],
                                [0, 2**64 - 1], [2**32, 2**32], [0, 2**64], [2**63, 0]])
        elif op == "reshape":
            n = 1
            for d in shape:
                n *= d
            shape = [n]
        _set_field(entry, "shape", shape)
        return f"{name} shape {op} -> {shape}"
    if kind == "shape-type":
        shape = _get_field(entry, "shape", [])
        new = rng.choice([_Raw("[2.0]"), _Raw('["2"]'), _Raw("[true]"), _Raw("[-1]"), _Raw("[-0]"), _Raw('"23"'),
                          _Raw("null"), _Raw('{"0":2}'), _Raw("2"), _Raw("[null]"), _Raw("[[2]]")])
        if isinstance(shape, list) and shape and rng.random() < 0.5:
            new = _Raw("[" + ",".join([str(d) for d in shape[:-1]] + [f"{shape[-1]}.0"]) + "]")
        _set_field(entry, "shape", new)
        return f"{name} shape = {new}"
    if kind == "array-entry":
        header[i] = (name, [_get_field(entry, "dtype"), _get_field(entry, "shape"), _get_field(entry, "data_offsets")][
            :rng.choice([3, 3, 2, 4])] + ([1] if rng.random() < 0.2 else []))
        return f"{name} as an array"
    if kind == "drop":
        del header[i]
        return f"drop {name}"
    if kind == "rename":
        new = rng.choice(["", "__metadata__", "a\nb", "x" * 300, name + ".x", "\u00e9"])
        header[i] = (new, entry)
        return f"rename {name} -> {new[:20]!r}"
    if kind == "swap":
        others = [j for j, (k, e) in enumerate(header) if j != i and isinstance(e, _Pairs) and k != "__metadata__"]
        if others:
            j = rng.choice(others)
            o1, o2 = _get_field(entry, "data_offsets"), _get_field(header[j][1], "data_offsets")
            _set_field(entry, "data_offsets", o2)
            _set_field(header[j][1], "data_offsets", o1)
            return f"swap offsets of {name} and {header[j][0]}"
        return "swap: none"
    end = max([x[1] for x in (_get_field(e, "data_offsets") for k, e in header if isinstance(e, _Pairs) and k != "__metadata__")
               if isinstance(x, list) and len(x) == 2 and all(type(v) is int for v in x)] or [0])
    if kind == "add-zero":
        at = rng.choice([0, end, end // 2 if end else 0])
        header.append((f"z{rng.randrange(100)}", _Pairs([("dtype", "F32"), ("shape", rng.choice([[0], [0, 3], [2, 0]])),
                                                        ("data_offsets", [at, at])])))
        return f"zero-size tensor at {at}"
    if kind == "add":
        n = rng.choice([1, 2, 4])
        at = rng.choice([end, end + 4, max(0, end - 4), 0])
        header.append((f"n{rng.randrange(100)}", _Pairs([("dtype", "U8"), ("shape", [n]), ("data_offsets", [at, at + n])])))
        if rng.random() < 0.7:
            data += bytes(range(n))
        return f"new {n}-byte tensor at {at}"
    if kind == "data-extra":
        extra = rng.choice([b"\0", b"x" * 3, b"\0" * 8, rng.randbytes(5)])
        data += extra
        return f"{len(extra)} bytes after the data"
    if kind == "data-cut":
        k = rng.choice([1, 2, 4, 8])
        del data[max(0, len(data) - k):]
        return f"data cut by {k}"
    return kind


def mutate_safetensors(rng: random.Random, seed: bytes) -> tuple[bytes, str]:
    """Header edits (1-3, then re-serialized with optional padding quirks) or raw byte edits."""
    n, header, data = _split(seed)
    data = bytearray(data)
    done = []
    if rng.random() < 0.75:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            try:
                done.append(mutate_safetensors_header(rng, header, data))
            except (IndexError, TypeError, KeyError, ValueError, AttributeError):  # an earlier edit broke the shape
                done.append("(an edit that no longer applied)")
        text = _dumps(header).encode()
        style = rng.random()
        if style < 0.1:
            text = rng.choice([b" ", b"\t\n\r ", b"\xef\xbb\xbf", b"\x00", b"\n"]) + text
            done.append("before the header")
        elif style < 0.25:
            text += rng.choice([b" " * rng.randrange(1, 9), b"\x00", b"\n\t", b"x", b"}", b" \x00 "])
            done.append("after the header")
        elif style < 0.3:
            text = text.replace(b",", b" , ", 1)
        elif style < 0.45:
            text += b" " * (-len(text) % 8)
        out = struct.pack("<Q", len(text)) + text + bytes(data)
        if rng.random() < 0.05:
            out = struct.pack("<Q", len(text) + rng.choice([-2, -1, 1, 2, 8])) + out[8:]
            done.append("header length off")
        return out, "; ".join(done)
    b = bytearray(seed)
    kind = rng.choice(["flip", "flip-header", "overwrite", "truncate", "append", "insert", "delete", "length"])
    header_end = 8 + n
    if kind in ("flip", "flip-header"):
        for _ in range(rng.randrange(1, 5)):
            at = rng.randrange(8, header_end) if kind == "flip-header" else rng.randrange(len(b))
            b[at] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        at = rng.randrange(8, header_end)
        chunk = bytes(rng.choice(b'{}[]",:0123456789.-e ') for _ in range(rng.randrange(1, 4)))
        b[at:at + len(chunk)] = chunk
    elif kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "append":
        b += rng.randbytes(rng.randrange(1, 17))
    elif kind in ("insert", "delete"):
        at = rng.randrange(8, header_end)
        if kind == "insert":
            b[at:at] = bytes([rng.choice(b' ,{}"0')])
        else:
            del b[at]
        b[:8] = struct.pack("<Q", n + (1 if kind == "insert" else -1))
    elif kind == "length":
        b[:8] = struct.pack("<Q", rng.choice([n - 1, n + 1, 0, 2**63, 100_000_001, 100_000_000, len(b)]))
    return bytes(b), f"bytes: {kind}"


# --- torch ----------------------------------------------------------------------------------

def ref_torch(path: Path) -> Outcome:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
        tensors = expected_state(obj)
    except Exception as e:  # noqa: BLE001
        return Outcome(refused=f"{type(e).__name__}: {e}")
    if tensors is None:
        return Outcome({}, extra={"not a state dict": type(obj).__name__})
    return Outcome(tensors)


WRAPPER_KEYS = ("model", "state_dict", "module")


def expected_state(obj) -> dict | None:
    """What weightport promises to read from a loaded object (docs: the first wrapper key whose value
    is a dict holding a tensor is unwrapped; tensor values are kept, "_orig_mod." dropped from
    their names): name -> (shape, dtype, sha256); None when that leaves no tensors."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        return None
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            name = k.removeprefix("_orig_mod.") if isinstance(k, str) else k
            if name in out:
                return {"<names collide>": name}
            out[name] = tensor_info(v)
    return out or None


def ours_torch(path: Path) -> Outcome:
    def read(p):
        f = TorchFile(p)
        try:
            return Outcome({name: tensor_info(f.load(name)) for name in f.entries})
        finally:
            f.close()
    return _ours(read, path)


def _torch_seed_dicts() -> list[object]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    tied = torch.randn(3, 2, generator=g)
    plain = {"model.embed_tokens.weight": tied, "lm_head.weight": tied, "norm.weight": torch.ones(2, dtype=torch.float16),
             "c": torch.randn(2, 2, generator=g).to(torch.bfloat16)}
    views = {"t": base.t(), "row": base[1], "slice": base[:, 2:4], "whole": base, "scalar": torch.tensor(3, dtype=torch.int64),
             "empty": torch.empty(0, 2), "flag": torch.tensor([True, False, True]), "i8": torch.arange(-2, 2, dtype=torch.int8),
             "u16": torch.arange(3).to(torch.uint16), "f8": torch.ones(2).to(torch.float8_e5m2), "d": torch.ones(2, dtype=torch.float64)}
    wrapped = {"model": {"_orig_mod.a": torch.arange(4.0), "_orig_mod.b": torch.ones(1)}, "step": 7, "lr": 0.1,
               "names": ["a", "b"], "meta": {"x": (1, 2)}}
    import collections
    od = collections.OrderedDict([("w", torch.randn(2, 3, generator=g)), ("b", torch.zeros(3))])
    od._metadata = {"": {"version": 1}}
    param = {"p": torch.nn.Parameter(torch.ones(2, 2)), "n": 5}
    return [plain, views, wrapped, od, param]


def seeds_torch() -> list[bytes]:
    from weightport.io.torch_file import TorchZipWriter

    out = []
    for sd in _torch_seed_dicts():
        buf = io.BytesIO()
        torch.save(sd, buf)
        out.append(buf.getvalue())
    with tempfile.TemporaryDirectory(prefix="wp-diff-seed-") as tmp:  # what weightport itself writes
        path = Path(tmp) / "w.bin"
        w = TorchZipWriter(path)
        g = torch.Generator().manual_seed(3)
        for n, t in {"a": torch.randn(3, 2, generator=g), "b": torch.arange(4, dtype=torch.int32)}.items():
            w.write(n, t)
        w.alias("tied", "a")
        w.close()
        out.append(path.read_bytes())
    return out


def _members(data: bytes) -> list[tuple[str, bytes, int]]:
    """(name, bytes, local-header offset) of each member of a stored zip."""
    z = zipfile.ZipFile(io.BytesIO(data))
    return [(i.filename, z.read(i), i.header_offset) for i in z.infolist()]


def rezip(members: list[tuple[str, bytes]]) -> bytes:
    """A stored zip with each member's data 64-byte aligned (as torch.save writes), in this order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            start = buf.tell() + 30 + len(name.encode())
            pad = -(start + 4) % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(info, data)
    return buf.getvalue()


def _pickle_mutation(rng: random.Random, pkl: bytes) -> tuple[bytes, str]:
    """Change one opcode's argument, or drop / repeat one opcode, re-encoding the stream."""
    ops = list(pickletools.genops(pkl))
    idx = rng.randrange(len(ops))
    op, arg, pos = ops[idx]
    nxt = ops[idx + 1][2] if idx + 1 < len(ops) else len(pkl)
    body = pkl[pos:nxt]
    kind = rng.choice(["arg", "arg", "arg", "drop", "repeat", "global"])
    if kind == "global":
        target = rng.choice([i for i, o in enumerate(ops) if o[0].name in ("GLOBAL", "STACK_GLOBAL")] or [idx])
        op, arg, pos = ops[target]
        nxt = ops[target + 1][2] if target + 1 < len(ops) else len(pkl)
        if op.name == "GLOBAL":
            new = rng.choice(["torch._utils\n_rebuild_tensor\n", "torch\nHalfStorage\n", "torch\nBFloat16Storage\n",
                              "torch\nBoolStorage\n", "torch\nLongStorage\n", "collections\nOrderedDict\n",
                              "builtins\nset\n", "numpy.core.multiarray\nscalar\n", "torch._utils\n_rebuild_parameter\n",
                              "torch\nFloatStorage\n", "torch._utils\n_rebuild_sparse_tensor\n", "torch\nSize\n",
                              "torch._tensor\n_rebuild_from_type_v2\n", "torch\nTensor\n", "mmengine\nHistoryBuffer\n",
                              "torch._utils\n_rebuild_qtensor\n", "torch\nComplexFloatStorage\n",
                              "builtins\ngetattr\n", "argparse\nNamespace\n", "torch\nload\n"])
            return pkl[:pos] + b"c" + new.encode() + pkl[nxt:], f"GLOBAL -> {new.strip()!r}"
    if kind == "drop":
        return pkl[:pos] + pkl[nxt:], f"drop {op.name}"
    if kind == "repeat":
        return pkl[:nxt] + body + pkl[nxt:], f"repeat {op.name}"
    name = op.name
    if name in ("BININT1", "BININT2", "BININT") or name in ("BININT1",):
        value = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 255, 2**16 - 1, -1, 2**31 - 1, 24, 12, 100])
        if arg is not None and rng.random() < 0.5:
            value = arg + rng.choice([-1, 1, 2])
        new = pickle.dumps(value, protocol=2)[2:-1]
        return pkl[:pos] + new + pkl[nxt:], f"{name} {arg} -> {value}"
    if name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"):
        value = rng.choice(["0", "1", "2", "3", "storage", "cpu", "cuda", "meta", "", "lm_head.weight", "_orig_mod.x",
                            "model", "state_dict", "module", str(arg) + "x"])
        new = b"X" + struct.pack("<I", len(value.encode())) + value.encode()
        return pkl[:pos] + new + pkl[nxt:], f"string {str(arg)[:20]!r} -> {value!r}"
    if name in ("NEWTRUE", "NEWFALSE"):
        return pkl[:pos] + (b"\x89" if name == "NEWTRUE" else b"\x88") + pkl[nxt:], f"flip {name}"
    if name in ("BINGET", "BINPUT") and arg is not None:
        value = max(0, min(255, arg + rng.choice([-2, -1, 1, 2])))
        return pkl[:pos] + body[:1] + bytes([value]) + pkl[nxt:], f"{name} {arg} -> {value}"
    return pkl[:pos] + pkl[nxt:], f"drop {name}"


def mutate_torch(rng: random.Random, seed: bytes) -> tuple[bytes, str]:
    members = _members(seed)
    kind = rng.choice(["pickle", "pickle", "pickle", "pickle-bytes", "record", "record-size", "member", "flip",
                       "truncate", "append", "zip-field"])
    if kind in ("pickle", "pickle-bytes", "record", "record-size", "member"):
        names = [m[0] for m in members]
        pkl_at = next(i for i, n in enumerate(names) if n.endswith("/data.pkl"))
        out = [(n, d) for n, d, _ in members]
        desc = kind
        if kind == "pickle":
            pkl = out[pkl_at][1]
            descs = []
            for _ in range(rng.choice([1, 1, 2])):
                try:
                    pkl, d = _pickle_mutation(rng, pkl)
                except Exception:  # noqa: BLE001 - the stream no longer parses: stop editing it
                    break
                descs.append(d)
            out[pkl_at] = (out[pkl_at][0], pkl)
            desc = "pickle: " + "; ".join(descs)
        elif kind == "pickle-bytes":
            pkl = bytearray(out[pkl_at][1])
            for _ in range(rng.randrange(1, 3)):
                pkl[rng.randrange(len(pkl))] ^= 1 << rng.randrange(8)
            out[pkl_at] = (out[pkl_at][0], bytes(pkl))
        elif kind in ("record", "record-size"):
            data_at = [i for i, n in enumerate(names) if "/data/" in n]
            i = rng.choice(data_at)
            d = bytearray(out[i][1])
            if kind == "record" and d:
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
            else:
                d = d[:len(d) - rng.choice([1, 2, 4])] if rng.random() < 0.5 and d else d + bytes(rng.choice([1, 2, 4, 8]))
            out[i] = (out[i][0], bytes(d))
            desc = f"{kind} {out[i][0]}"
        else:
            i = rng.randrange(len(out))
            op = rng.choice(["drop", "rename", "dup", "byteorder"])
            if op == "drop":
                desc = f"drop member {out[i][0]}"
                del out[i]
            elif op == "byteorder":
                at = next((k for k, (n, _) in enumerate(out) if n.endswith("/byteorder")), None)
                value = rng.choice([b"big", b"big", b"little", b"bogus", b""])
                if at is None:
                    out.append((out[0][0].split("/")[0] + "/byteorder", value))
                else:
                    out[at] = (out[at][0], value)
                desc = f"byteorder {value!r}"
            elif op == "rename":
                prefix = out[i][0].split("/")[0]
                new = rng.choice([f"{prefix}/data/9", f"{prefix}/data/0", f"{prefix}/byteorder", "other/data.pkl",
                                  f"{prefix}/data.pkl", f"{prefix}/x.pkl"])
                desc = f"rename member {out[i][0]} -> {new}"
                out[i] = (new, out[i][1])
            else:
                out.insert(rng.randrange(len(out) + 1), out[i])
                desc = f"member {out[i][0]} twice"
            if out and rng.random() < 0.2:
                out[0], out[-1] = out[-1], out[0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # duplicate names
                return rezip(out), desc
        except Exception:  # noqa: BLE001
            return seed, desc + " (not rezipped)"
    b = bytearray(seed)
    if kind == "flip":
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "append":
        b += rng.randbytes(rng.randrange(1, 32))
    else:  # a size or offset field of a local header or of the central directory
        m = rng.choice(members)
        at = m[2] + rng.choice([0, 6, 8, 18, 22, 26, 28])
        cds = [k for k in range(len(seed)) if seed.startswith(b"PK\x01\x02", k)]
        if rng.random() < 0.5 and cds:
            at = rng.choice(cds) + rng.choice([8, 10, 20, 24, 28, 30, 42])
        b[at:at + 2] = struct.pack("<H", rng.choice([0, 1, 8, 12, 24, 64, 0xFFFF]))
    return bytes(b), f"bytes: {kind}"


# --- MindSpore .ckpt ------------------------------------------------------------------------

def mindspore_python() -> str | None:
    exe = os.environ.get("WEIGHTPORT_MINDSPORE_PYTHON")
    if exe:
        return exe if Path(exe).exists() else None
    import importlib.util

    return sys.executable if importlib.util.find_spec("mindspore") is not None else None


def _ms_run(paths: list[Path], exe: str, workdir: Path) -> tuple[list[dict], int]:
    job, result = workdir / "ms_job.json", workdir / "ms_result.jsonl"
    job.write_text(json.dumps({"paths": [str(p) for p in paths]}))
    result.write_text("")
    proc = subprocess.run([exe, str(HERE / "ms_reference.py"), str(job), str(result)], capture_output=True, text=True,
                          timeout=1800)
    done = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    if proc.returncode > 0 and not done:
        raise RuntimeError(f"fuzz/ms_reference.py failed:\n{proc.stderr[-4000:]}")
    return done, proc.returncode


def ref_ckpt_batch(paths: list[Path], exe: str, workdir: Path) -> list[Outcome]:
    """mindspore.load_checkpoint on every path, in as few subprocesses as it takes (fuzz/ms_reference.py).
    Where the process dies, the file it died on is loaded again alone: a file that kills it alone
    counts as refused by MindSpore; the rest go on in a new process."""
    results: list[dict] = []
    while len(results) < len(paths):
        done, rc = _ms_run(paths[len(results):], exe, workdir)
        results += done
        if rc != 0 and len(results) < len(paths):
            alone, rc_alone = _ms_run([paths[len(results)]], exe, workdir)
            results.append(alone[0] if rc_alone == 0 and alone else
                           {"error": f"CRASHED: MindSpore's process died (exit {rc_alone}) on this file"})
    out = []
    for r in results:
        if "error" in r:
            out.append(Outcome(refused=r["error"]))
            continue
        tensors, strs, maps = {}, [], []
        for p in r["params"]:
            if p["kind"] == "str":
                strs.append(p["name"])
            elif p["kind"] == "map":
                maps.append(p["name"])
            else:
                dtype = MS_DTYPES.get(p["dtype"])
                tensors[p["name"]] = (tuple(p["shape"]), str(dtype).removeprefix("torch.") if dtype else p["dtype"],
                                      p["sha256"])
        out.append(Outcome(tensors, extra={"str": sorted(strs), "map": sorted(maps)}))
    return out


def ours_ckpt(path: Path) -> Outcome:
    def read(p):
        f = MsCkptFile(p)
        try:
            tensors = {}
            for name in f.entries:
                t = f.load(name)
                # fuzz/ms_reference.py hashes BFloat16 as float32 (MindSpore's asnumpy has no bfloat16 here)
                shape, dtype, _ = tensor_info(t)
                tensors[name] = (shape, dtype, digest(t.float() if t.dtype == torch.bfloat16 else t))
            strs = sorted(n for n, why in f.skipped.items() if why.startswith("str"))
            maps = sorted(n for n, why in f.skipped.items() if why.startswith("maptensor"))
            return Outcome(tensors, extra={"str": strs, "map": maps})
        finally:
            f.close()
    return _ours(read, path)


def _varint(n: int, pad: int = 0) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n or pad:
            out.append(b | 0x80)
            if not n:
                pad -= 1
                while pad > 0:
                    out.append(0x80)
                    pad -= 1
                out.append(0)
                return bytes(out)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int, value, pad_key: int = 0, pad_len: int = 0) -> bytes:
    key = _varint(num << 3 | wire, pad_key)
    if wire == 0:
        return key + _varint(value & (2**64 - 1), pad_len)
    if wire == 2:
        return key + _varint(len(value), pad_len) + value
    if wire == 1:
        return key + struct.pack("<Q", value & (2**64 - 1))
    if wire == 5:
        return key + struct.pack("<I", value & (2**32 - 1))
    raise ValueError(wire)


class Rec:
    """One record, as fields that mutations may change before it is encoded."""

    def __init__(self, tag, dims, ttype, content, kind="tensor", maps=None):
        self.tag, self.dims, self.ttype, self.content, self.kind, self.maps = tag, list(dims), ttype, content, kind, maps
        self.tensor_extra: list[bytes] = []  # fields appended inside the TensorProto
        self.value_extra: list[bytes] = []  # fields appended inside the Value
        self.packed = False
        self.pads: dict[str, int] = {}

    def tensor_bytes(self) -> bytes:
        if self.packed:
            body = _field(1, 2, b"".join(_varint(d & (2**64 - 1)) for d in self.dims))
        else:
            body = b"".join(_field(1, 0, d, pad_len=self.pads.get("dims", 0)) for d in self.dims)
        if self.ttype is not None:
            body += _field(2, 2, self.ttype.encode("utf-8", "surrogateescape") if isinstance(self.ttype, str) else self.ttype)
        if self.content is not None:
            body += _field(3, 2, self.content, pad_len=self.pads.get("content", 0))
        return body + b"".join(self.tensor_extra)

    def encode(self) -> bytes:
        value = b""
        if self.tag is not None:
            value += _field(1, 2, self.tag.encode("utf-8", "surrogateescape") if isinstance(self.tag, str) else self.tag,
                            pad_key=self.pads.get("tag_key", 0))
        if self.kind == "tensor":
            value += _field(2, 2, self.tensor_bytes(), pad_len=self.pads.get("tensor", 0))
        elif self.kind == "maptensor":
            value += _field(3, 2, b"".join(_field(1, 2, m.tensor_bytes()) for m in self.maps))
        value += b"".join(self.value_extra)
        return _field(1, 2, value, pad_len=self.pads.get("value", 0))


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _ms_str(s: str) -> bytes:
    import numpy as np

    return np.array(s).tobytes()


def seed_ckpt_records() -> list[list[Rec]]:
    from weightport.formats.mindspore.ckpt import TORCH_TO_MS

    g = torch.Generator().manual_seed(2)
    ts = {"model.embed.weight": torch.randn(3, 4, generator=g), "norm": torch.arange(5, dtype=torch.float16),
          "c": torch.randn(2, 2, generator=g).to(torch.bfloat16), "step": torch.tensor(7, dtype=torch.int64),
          "flag": torch.tensor([True, False]), "u": torch.arange(3, dtype=torch.uint8)}
    plain = [Rec(n, list(t.shape), TORCH_TO_MS[t.dtype], _raw(t)) for n, t in ts.items()]
    plain[3].dims = [0]  # MindSpore writes a scalar as dims [0]
    chunked = [Rec("big", [4, 2], "Float32", _raw(torch.arange(8.0))[:16]), Rec("big", [4, 2], "Float32", _raw(torch.arange(8.0))[16:]),
               Rec("note", [0], "str", _ms_str("h\u00e9llo")), Rec("i32", [2], "Int32", _raw(torch.tensor([1, -1], dtype=torch.int32)))]
    m1 = [Rec(None, [3], "int32", _raw(torch.arange(3, dtype=torch.int32))),
          Rec(None, [3, 2], "float32", _raw(torch.ones(3, 2))), Rec(None, [3], "int32", bytes(12))]
    m2 = [Rec(None, [1], "int32", _raw(torch.tensor([9], dtype=torch.int32))),
          Rec(None, [1, 2], "float32", _raw(torch.zeros(1, 2))), Rec(None, [1], "int32", bytes(4))]
    maps = [Rec("w", [2], "Float32", _raw(torch.ones(2))), Rec("map", [], None, None, kind="maptensor", maps=m1),
            Rec("map", [], None, None, kind="maptensor", maps=m2), Rec("tail", [1], "Float64", _raw(torch.ones(1, dtype=torch.float64)))]
    return [plain, chunked, maps]


def encode_ckpt(recs: list[Rec], crc: bool) -> bytes:
    import zlib

    body = b"".join(r.encode() for r in recs)
    return body + (b"crc_num" + zlib.crc32(body).to_bytes(10, "big") if crc else b"")


def seeds_ckpt() -> list[bytes]:
    out = [encode_ckpt(recs, crc=i % 2 == 0) for i, recs in enumerate(seed_ckpt_records())]
    with tempfile.TemporaryDirectory(prefix="wp-diff-seed-") as tmp:
        buf = Path(tmp) / "w.ckpt"
        with MsCkptWriter(buf, crc=True) as w:  # what weightport itself writes
            for n, t in {"a": torch.ones(2, 3), "b": torch.arange(4, dtype=torch.int32)}.items():
                w.write(n, t)
        out.append(buf.read_bytes())
    return out


_MS_TYPES = ["Float32", "Float16", "BFloat16", "Float64", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64",
             "UInt64", "Bool", "Int4", "str", "", "float32", "Float8", "Complex64"]


def _unknown_field(rng: random.Random) -> bytes:
    num = rng.choice([4, 5, 9, 15, 16, 100, 2**20, 0])
    wire = rng.choice([0, 0, 1, 2, 2, 5, 3, 4, 6, 7])
    if wire in (0, 1, 2, 5):
        value = rng.choice([0, 1, 300, 2**63]) if wire != 2 else rng.randbytes(rng.randrange(0, 6))
        return _field(num, wire, value)
    if wire == 3:  # a group, closed or not
        inner = _field(1, 0, 5) if rng.random() < 0.5 else b""
        return _varint(num << 3 | 3) + inner + (_varint(num << 3 | 4) if rng.random() < 0.8 else b"")
    return _varint(num << 3 | wire)


def mutate_ckpt_records(rng: random.Random, recs: list[Rec]) -> str:
    if not recs:
        recs.append(Rec("x", [1], "Float32", bytes(4)))
    i = rng.randrange(len(recs))
    r = recs[i]
    kind = rng.choice(["content-len", "dims", "dims-huge", "ttype", "tag", "dup-tag", "split", "str", "map", "unknown",
                       "unknown", "wire", "field0", "noncanonical", "masked", "merge", "oneof", "missing", "packed",
                       "drop", "swap", "bad-utf8", "type-twice"])
    if kind == "content-len" and r.content is not None:
        d = rng.choice([-4, -2, -1, 1, 2, 4, 8])
        r.content = r.content[:d] if d < 0 else r.content + bytes(d)
        return f"{r.tag}: content {d:+d}"
    if kind == "dims":
        op = rng.choice(["zero", "inc", "neg", "drop", "add1", "[0]", "[]", "-1"])
        if op == "zero" and r.dims:
            r.dims[rng.randrange(len(r.dims))] = 0
        elif op == "inc" and r.dims:
            r.dims[rng.randrange(len(r.dims))] += 1
        elif op == "neg" and r.dims:
            r.dims[rng.randrange(len(r.dims))] *= -1
        elif op == "drop" and r.dims:
            r.dims.pop()
        elif op == "add1":
            r.dims.append(1)
        elif op == "[0]":
            r.dims = [0]
        elif op == "[]":
            r.dims = []
        elif op == "-1":
            r.dims = [-1]
        return f"{r.tag}: dims {op} -> {r.dims}"
    if kind == "dims-huge":
        r.dims = rng.choice([[2**62, 4], [0, 2**62], [2**63 - 1], [-(2**63)], [2**31, 2**31, 0]])
        return f"{r.tag}: dims {r.dims}"
    if kind == "ttype":
        r.ttype = rng.choice(_MS_TYPES)
        return f"{r.tag}: type {r.ttype}"
    if kind == "tag":
        r.tag = rng.choice(["", "a", "model.embed.weight", "norm", "x" * 50, "\u00e9", b"\xff\xfe", None])
        return f"tag -> {r.tag!r}"
    if kind == "dup-tag":
        other = rng.choice(recs)
        copy = Rec(other.tag, other.dims, other.ttype, other.content, other.kind, other.maps)
        recs.insert(rng.randrange(len(recs) + 1), copy)
        return f"record {other.tag} again"
    if kind == "split" and r.content and r.kind == "tensor":
        cut = rng.randrange(len(r.content) + 1)
        recs[i:i + 1] = [Rec(r.tag, r.dims, r.ttype, r.content[:cut]), Rec(r.tag, r.dims, r.ttype, r.content[cut:])]
        return f"{r.tag}: split at {cut}"
    if kind == "str":
        content = rng.choice([b"", b"abc", b"a\0\0\0b", b"\xff\xff\xff\xff", b"\x00\xd8\x00\x00", b"a\0\0\0b\0\0\0",
                              _ms_str("x"), _ms_str(""), b"\x00\x00\x11\x00", b"\xff\xff\x10\x00" + b"a\0\0\0"])
        recs.insert(rng.randrange(len(recs) + 1), Rec("s", [0], "str", content))
        if rng.random() < 0.3:
            recs.insert(recs.index(next(x for x in recs if x.tag == "s")) + 1, Rec("s", [0], "str", rng.choice([b"b\0\0\0", b"", b"xy"])))
        return f"str record {content!r}"
    if kind == "map":
        ms = [Rec(None, [rng.choice([0, 1, 2, 3])] + ([2] if rng.random() < 0.3 else []), rng.choice(["int32", "float32", "float16", "float64", "Int8", "", "int64"]),
                  bytes(rng.choice([0, 2, 4, 8, 12, 16, 24]))) for _ in range(rng.choice([0, 1, 3, 4]))]
        if ms and rng.random() < 0.2:
            ms[0].dims = rng.choice([[], [-1], [-1, 2], [2, -1], [1] * 65])
        if ms and rng.random() < 0.2:
            ms[0].ttype = None
        recs.insert(rng.randrange(len(recs) + 1), Rec("m", [], None, None, kind="maptensor", maps=ms))
        if rng.random() < 0.4:
            recs.insert(recs.index(next(x for x in recs if x.tag == "m")) + 1,
                        Rec("m", [], None, None, kind="maptensor", maps=[Rec(None, m.dims, m.ttype, m.content) for m in ms[:rng.choice([0, 1, 3, 4])]]))
        return f"maptensor {[(m.dims, m.ttype, len(m.content)) for m in ms]}"
    if kind == "unknown":
        where = rng.choice(["tensor", "value", "top"])
        f = _unknown_field(rng)
        if where == "tensor":
            r.tensor_extra.append(f)
        elif where == "value":
            r.value_extra.append(f)
        else:
            recs.insert(rng.randrange(len(recs) + 1), _RawRec(f))
        return f"unknown field in {where}: {f[:8].hex()}"
    if kind == "wire":
        which = rng.choice(["tag", "tensor_type", "dims", "content"])
        num = {"tag": 1, "tensor_type": 2, "dims": 1, "content": 3}[which]
        f = _field(num, rng.choice([0, 1, 5]), 1) if which != "dims" else _field(1, rng.choice([1, 5]), 1)
        (r.value_extra if which == "tag" else r.tensor_extra).append(f)
        return f"{r.tag}: {which} with another wire type"
    if kind == "field0":
        (r.tensor_extra if rng.random() < 0.5 else r.value_extra).append(bytes([rng.choice([0, 2, 5])]) + b"\x00")
        return f"{r.tag}: field number 0"
    if kind == "noncanonical":
        which = rng.choice(["tag_key", "value", "tensor", "content", "dims"])
        r.pads[which] = rng.choice([1, 2, 9])
        return f"{r.tag}: non-canonical varint for {which}"
    if kind == "masked":  # a 10-byte varint whose 10th byte carries bits past 64
        r.tensor_extra.append(b"\x08" + b"\x82" + b"\x80" * 8 + bytes([rng.choice([0x02, 0x7E, 0x01])]))
        return f"{r.tag}: 10-byte dims varint with bits past 64"
    if kind == "merge":  # a second tensor field: protobuf merges it into the first
        part = rng.choice([_field(1, 0, 2), _field(2, 2, b"Float32"), _field(3, 2, bytes(8)), b""])
        r.value_extra.append(_field(2, 2, part))
        return f"{r.tag}: a second tensor field {part.hex()}"
    if kind == "oneof":
        if r.kind == "tensor":
            r.value_extra.append(_field(3, 2, b""))
            if rng.random() < 0.5:
                r.value_extra.append(_field(2, 2, r.tensor_bytes()))
            return f"{r.tag}: maptensor after tensor"
        r.value_extra.append(_field(2, 2, _field(2, 2, b"Float32") + _field(3, 2, b"")))
        return f"{r.tag}: tensor after maptensor"
    if kind == "missing":
        which = rng.choice(["tag", "ttype", "content", "kind"])
        if which == "tag":
            r.tag = None
        elif which == "ttype":
            r.ttype = None
        elif which == "content":
            r.content = None
        else:
            r.kind = "none"
        return f"{r.tag}: no {which}"
    if kind == "packed":
        r.packed = True
        return f"{r.tag}: packed dims"
    if kind == "drop" and len(recs) > 1:
        del recs[i]
        return "drop a record"
    if kind == "swap" and len(recs) > 1:
        j = rng.randrange(len(recs))
        recs[i], recs[j] = recs[j], recs[i]
        return "swap records"
    if kind == "bad-utf8":
        r.tensor_extra.append(_field(2, 2, b"\xff\xfe"))
        if rng.random() < 0.5:
            r.tensor_extra.append(_field(2, 2, (r.ttype or "Float32").encode()))
        return f"{r.tag}: tensor_type not UTF-8"
    if kind == "type-twice":
        r.tensor_extra.append(_field(2, 2, rng.choice(_MS_TYPES).encode()))
        return f"{r.tag}: tensor_type twice"
    return kind


class _RawRec:
    """Bytes between records (a top-level field other than Checkpoint.value)."""

    def __init__(self, data: bytes):
        self.data, self.tag, self.kind, self.content, self.dims, self.ttype, self.maps = data, None, "raw", None, [], None, None
        self.tensor_extra, self.value_extra, self.pads, self.packed = [], [], {}, False

    def encode(self) -> bytes:
        return self.data

    def tensor_bytes(self) -> bytes:
        return b""


def mutate_ckpt(rng: random.Random, seed_index: int) -> tuple[bytes, str]:
    recs = seed_ckpt_records()[seed_index % 3]
    crc = rng.random() < 0.5
    if rng.random() < 0.8:
        done = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            try:
                done.append(mutate_ckpt_records(rng, recs))
            except (IndexError, TypeError, KeyError, ValueError, AttributeError, StopIteration):
                done.append("(an edit that no longer applied)")
        data = encode_ckpt(recs, crc)
        if rng.random() < 0.1:
            b = bytearray(data)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
            done.append("a bit flipped")
        return data, "; ".join(done)
    b = bytearray(encode_ckpt(recs, crc))
    kind = rng.choice(["flip", "flip", "truncate", "append", "overwrite", "crc"])
    if kind == "flip":
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "append":
        b += rng.choice([rng.randbytes(rng.randrange(1, 9)), b"crc_num" + bytes(10), b"\x0a\x00"])
    elif kind == "overwrite":
        at = rng.randrange(len(b))
        b[at:at + 2] = rng.choice([b"\x0a\x00", b"\x12\x00", b"\x08\xff", b"\x00\x00", b"\xff\xff", b"\x1a\x7f"])
    else:
        b[-17:-10] = b"crc_num"
    return bytes(b), f"bytes: {kind}"


# --- running --------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.counts: Counter = Counter()
        self.failures: list[str] = []

    def add(self, target: str, path: Path, desc: str, ref: Outcome, ours: Outcome, keep: Path | None) -> None:
        category, why = judge(target, path, ref, ours)
        self.counts["inputs tried"] += 1
        self.counts[category] += 1
        if why:
            note = f"{target}: {desc}\n  {why}"
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                saved = keep / f"{target}-{self.counts['disagreement']}{path.suffix}"
                saved.write_bytes(path.read_bytes())
                note += f"\n  saved as {saved}"
            self.failures.append(note)


def run_in_process(target: str, n: int, rng: random.Random, scratch: Path, keep: Path | None) -> Tally:
    seeds = seeds_safetensors() if target == "safetensors" else seeds_torch()
    mutate, ref, ours = ((mutate_safetensors, ref_safetensors, ours_safetensors) if target == "safetensors"
                         else (mutate_torch, ref_torch, ours_torch))
    suffix = ".safetensors" if target == "safetensors" else ".bin"
    tally = Tally()
    for k in range(n):
        data, desc = mutate(rng, seeds[k % len(seeds)])
        path = scratch / f"in-{k % 8}{suffix}"
        path.write_bytes(data)
        tally.add(target, path, desc, ref(path), ours(path), keep)
    return tally


def run_ckpt(n: int, rng: random.Random, scratch: Path, keep: Path | None, exe: str, batch: int = 2000) -> Tally:
    tally = Tally()
    for start in range(0, n, batch):
        items = []
        for k in range(start, min(n, start + batch)):
            data, desc = mutate_ckpt(rng, k)
            path = scratch / f"ck-{k}.ckpt"
            path.write_bytes(data)
            items.append((path, desc))
        refs = ref_ckpt_batch([p for p, _ in items], exe, scratch)
        for (path, desc), ref in zip(items, refs):
            tally.add("ckpt", path, desc, ref, ours_ckpt(path), keep)
            path.unlink()
    return tally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--safetensors", type=int, default=2000)
    ap.add_argument("--torch", type=int, default=1000)
    ap.add_argument("--ckpt", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="save every disagreeing input here")
    ap.add_argument("--show", type=int, default=5, help="disagreements to print per target")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="weightport-diff-",
                                     dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as scratch:
        return _run(args, Path(scratch))


def _run(args, scratch: Path) -> int:
    total_bad = 0
    rows = []
    for target, n in (("safetensors", args.safetensors), ("torch", args.torch), ("ckpt", args.ckpt)):
        if not n:
            continue
        rng = random.Random(f"{args.seed}-{target}")
        t0 = time.time()
        if target == "ckpt":
            exe = mindspore_python()
            if exe is None:
                print("ckpt: mindspore is not installed, skipped")
                continue
            tally = run_ckpt(n, rng, scratch, args.keep, exe)
        else:
            tally = run_in_process(target, n, rng, scratch, args.keep)
        c = tally.counts
        rows.append((target, c, time.time() - t0))
        for note in tally.failures[:args.show]:
            print(note, "\n")
        total_bad += c["disagreement"]
    for target, c, secs in rows:
        other = {k: v for k, v in sorted(c.items()) if k.startswith(("stricter", "lenient", "refused by both ("))}
        print(f"{target}: {c['inputs tried']} inputs tried, {c['refused by both']} refused by both, "
              f"{c['read equal by both']} read equal by both, {c['disagreement']} disagreements ({secs:.0f} s)")
        for k, v in other.items():
            print(f"    {k}: {v}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
