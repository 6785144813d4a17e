#!/usr/bin/env python
"""MindSpore reference peer for weightport tests.

Run with a Python that has the real `mindspore` package (imports only stdlib, numpy, mindspore):

    python tests/peers/mindspore_peer.py JOB_JSON RESULT_JSON

The tests run it as a subprocess, not in-process: importing mindspore changes the process for
everything after it (it sets LD_LIBRARY_PATH and PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python,
which later subprocesses inherit, raises the recursion limit, and loads ~2,700 modules).

JOB_JSON is {"ops": [op, ...]}; RESULT_JSON gets one result per op, in order. An op that raises
gives {"error": "<Type>: <message>"} instead of stopping the job. Ops:

load {"path", "crc_check": bool, "out_dir", "hash_only": bool}
    `mindspore.load_checkpoint(path, crc_check=..., format=...)`, format "safetensors" for a path
    ending in .safetensors (save likewise). Result {"params": [...]} in the dict's order,
    one {"name", "kind": "tensor", "shape", "dtype": str(p.dtype), "npy": file} per Parameter
    (BFloat16 values cast to float32 by MindSpore; with hash_only, "sha256" of the raw bytes
    instead of "npy"), {"name", "kind": "str", "value"} per string, {"name", "kind": "map"}
    per map tensor.
save {"path", "params": [{"name", "npy" | "fill", "dtype"}], "append": {..} | null,
      "crc_check": bool, "slice_kb": int | null, "enc_key": str | null}
    `mindspore.save_checkpoint([{"name", "data": Tensor(array, dtype)}], path, ...)`. "dtype" is a
    MindSpore dtype name (e.g. "bfloat16") or null to keep the array's; "fill" is
    {"shape", "np_dtype", "mod"}: 0, 1, ..., mod-1 repeated, so a large array needs no file.
    slice_kb patches MindSpore's SLICE_SIZE (KB per record) for this save.
serialize {"path", "records": [{"tag", "dims", "tensor_type", "content_hex"}]}
    Writes each record as `checkpoint_pb2.Checkpoint(value=[...]).SerializeToString()` with
    MindSpore's own compiled schema, concatenated.
"""

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np


def _format(path: str) -> str:
    return "safetensors" if path.endswith(".safetensors") else "ckpt"


def _load(op):
    import mindspore as ms

    d = ms.load_checkpoint(op["path"], crc_check=op.get("crc_check", False), format=_format(op["path"]))
    out_dir = Path(op["out_dir"]) if op.get("out_dir") else None
    params = []
    for i, (name, v) in enumerate(d.items()):
        if isinstance(v, str):
            params.append({"name": name, "kind": "str", "value": v})
            continue
        if isinstance(v, list):
            params.append({"name": name, "kind": "map"})
            continue
        entry = {"name": name, "kind": "tensor", "param_name": v.name, "shape": list(v.shape), "dtype": str(v.dtype)}
        if op.get("hash_only"):
            entry["sha256"] = hashlib.sha256(v.asnumpy().tobytes()).hexdigest()
        else:
            if str(v.dtype) == "BFloat16":
                arr = ms.ops.Cast()(v, ms.float32).asnumpy()
            else:
                arr = v.asnumpy()
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{i}.npy"
            np.save(path, arr)
            entry["npy"] = str(path)
        params.append(entry)
    return {"params": params}


def _save(op):
    import mindspore as ms
    from mindspore.train import serialization

    items = []
    for p in op["params"]:
        if "fill" in p:
            fill = p["fill"]
            n = 1
            for d in fill["shape"]:
                n *= d
            arr = np.resize(np.arange(fill["mod"]).astype(fill["np_dtype"]), n).reshape(fill["shape"])
        else:
            arr = np.load(p["npy"])
        dtype = getattr(ms, p["dtype"]) if p.get("dtype") else None
        items.append({"name": p["name"], "data": ms.Tensor(arr, dtype=dtype)})
    path = op["path"]
    if os.path.exists(path):  # MindSpore leaves its files read-only
        os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
    kwargs = {"crc_check": op.get("crc_check", False)}
    if op.get("append"):
        kwargs["append_dict"] = op["append"]
    if op.get("enc_key"):
        kwargs["enc_key"] = op["enc_key"].encode()
    if _format(path) == "safetensors":
        kwargs["format"] = "safetensors"
    saved = serialization.SLICE_SIZE
    if op.get("slice_kb"):
        serialization.SLICE_SIZE = op["slice_kb"]
    try:
        ms.save_checkpoint(items, path, **kwargs)
    finally:
        serialization.SLICE_SIZE = saved
    return {"ok": True}


def _serialize(op):
    from mindspore.train.checkpoint_pb2 import Checkpoint

    with open(op["path"], "wb") as f:
        for r in op["records"]:
            ck = Checkpoint()
            v = ck.value.add()
            v.tag = r["tag"]
            v.tensor.dims.extend(r["dims"])
            v.tensor.tensor_type = r["tensor_type"]
            v.tensor.tensor_content = bytes.fromhex(r["content_hex"])
            f.write(ck.SerializeToString())
    return {"ok": True}


OPS = {"load": _load, "save": _save, "serialize": _serialize}


def main():
    job_path, result_path = sys.argv[1:3]
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    import mindspore

    results = []
    for op in job["ops"]:
        try:
            results.append(OPS[op["op"]](op))
        except Exception as e:  # reported per op: a test may expect MindSpore to refuse a file
            results.append({"error": f"{type(e).__name__}: {e}"})
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"mindspore": mindspore.__version__, "results": results}, f)


if __name__ == "__main__":
    main()
