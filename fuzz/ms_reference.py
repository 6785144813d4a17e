#!/usr/bin/env python
"""mindspore.load_checkpoint over many files, for fuzz/differential.py (imports only stdlib, numpy, mindspore).

    python fuzz/ms_reference.py JOB_JSON RESULT_JSONL

JOB_JSON is {"paths": [...]}. RESULT_JSONL gets one line per path, in order, written as each is
done (so a caller can tell which file a crash came from and go on after it):
{"error": "<Type>: <message>"} where load_checkpoint raises, else {"params": [...]} with
{"name", "kind": "tensor", "shape", "dtype", "sha256"} per Parameter (sha256 of its raw bytes;
BFloat16 is hashed after a cast to float32, which is exact, because asnumpy has no bfloat16 with
this numpy), {"name", "kind": "str"} per string and {"name", "kind": "map"} per map tensor.

MindSpore builds each tensor from its joined tensor_content without checking the content's size
against the dims: a shorter content is read past its end (garbage values), a longer one is
copied past the end of the tensor (heap corruption, and later an abort: "free(): invalid next
size"); negative dims are refused, but after the same corruption. Such files are not loaded, so that they cannot corrupt the results for the files after
them; their line is {"error": "UNSAFE: ..."}, found with MindSpore's own protobuf schema, walking
the records as load_checkpoint does. It runs apart from the tests because importing mindspore
changes the process.
"""

import hashlib
import json
import logging
import sys

_SIZES = {"Float32": 4, "Float16": 2, "BFloat16": 2, "Float64": 8, "Int8": 1, "UInt8": 1, "Int16": 2, "UInt16": 2,
          "Int32": 4, "UInt32": 4, "Int64": 8, "UInt64": 8, "Bool": 1}


def past_the_buffer(path):
    """Why load_checkpoint would read or write past a buffer (content and dims of different sizes,
    negative dims), or None."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    with open(path, "rb") as f:
        content = f.read()
    if content[-17:-10] == b"crc_num":
        content = content[:-17]
    ck = Checkpoint()
    try:
        ck.ParseFromString(content)
    except Exception:  # noqa: BLE001 - load_checkpoint refuses it the same way
        return None
    values = list(ck.value)
    pending = []
    for i, el in enumerate(values):
        if not el.HasField("tensor"):
            continue
        pending.append(el.tensor.tensor_content)
        if i == len(values) - 1 or el.tag != values[i + 1].tag:
            data = b"".join(pending)
            pending = []
            ttype = el.tensor.tensor_type
            dims = list(el.tensor.dims)
            if dims == [0]:
                dims = []
            if ttype == "str":
                continue
            if any(d < 0 for d in dims):  # MindSpore refuses these, but only after corrupting its heap
                return f"tensor {el.tag}: negative dims {dims}"
            n = 1
            for d in dims:
                n *= d
            need = (n + 1) // 2 if ttype == "Int4" else n * _SIZES.get(ttype, 0)
            if need != len(data):
                return f"tensor {el.tag}: dims {dims} of {ttype} need {need} bytes, its content has {len(data)}"
    return None


def load(ms, path):
    unsafe = past_the_buffer(path)
    if unsafe:
        return {"error": f"UNSAFE: MindSpore would read or write past a buffer ({unsafe})"}
    d = ms.load_checkpoint(path)
    params = []
    for name, v in d.items():
        if isinstance(v, str):
            params.append({"name": name, "kind": "str"})
        elif isinstance(v, list):
            params.append({"name": name, "kind": "map"})
        else:
            arr = ms.ops.Cast()(v, ms.float32).asnumpy() if str(v.dtype) == "BFloat16" else v.asnumpy()
            params.append({"name": name, "kind": "tensor", "shape": list(v.shape), "dtype": str(v.dtype),
                           "sha256": hashlib.sha256(arr.tobytes()).hexdigest()})
    return {"params": params}


def main():
    job_path, result_path = sys.argv[1:3]
    with open(job_path, encoding="utf-8") as f:
        paths = json.load(f)["paths"]
    import mindspore as ms

    logging.getLogger("mindspore").setLevel(logging.CRITICAL + 1)
    with open(result_path, "a", encoding="utf-8") as out:
        for path in paths:
            try:
                result = load(ms, path)
            except Exception as e:  # noqa: BLE001 - a refusal, reported per file
                result = {"error": f"{type(e).__name__}: {e}"}
            out.write(json.dumps(result) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
