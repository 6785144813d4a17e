#!/usr/bin/env python
"""MindFormers reference peer for weightport tests: MindFormers' own Llama HF -> .ckpt converter.

    python tests/peers/mindformers_peer.py convert-llama HF_DIR OUT_CKPT [--dtype fp32|fp16|bf16]
    python tests/peers/mindformers_peer.py batch JOB_JSON RESULT_JSON
    python tests/peers/mindformers_peer.py version

What it runs: `mindformers.models.llama.convert_weight.convert_pt_to_ms(input_path=HF_DIR,
output_path=OUT_CKPT, dtype=...)`, the function MindFormers' root `convert_weight.py --model llama`
calls, unmodified, from the installed `mindformers` wheel (written against 2.0.0, the release
paired with mindspore 2.10; the function and its helper `mindformers.utils.convert_utils.pt2ms`
are the same in 1.7.0 ... 2.1.0). It loads `LlamaForCausalLM.from_pretrained(HF_DIR)`, renames
every `state_dict()` entry by `name_replace` (str.replace), turns each tensor into a MindSpore
Tensor with `pt2ms(value, dtype)` and writes them all with `mindspore.save_checkpoint`.

Adaptations, none of which touch the conversion itself:

- Loading. The wheel's `mindformers/__init__.py` imports the whole framework (~450 modules and a
  dozen packages that `pip install --no-deps` leaves out: jieba, nltk, tensorboardX, mindpet,
  tiktoken, ...), and its sub-packages import each other in an order only that `__init__`
  gets right. The converter needs just two files, so this script loads
  `mindformers/utils/convert_utils.py` and `mindformers/models/llama/convert_weight.py` straight
  from the installed package directory under their own module names, beneath empty stand-in
  parent packages. `convert_weight.py` also does `from mindformers.tools import MindFormerConfig,
  MindFormerRegister, MindFormerModuleType` at module level; only `convert_to_qkv_concat` (not
  run here) uses them, so the stand-in `mindformers.tools` holds placeholders that raise if called.
- Path semantics. In these versions `input_path` is the HF directory itself (v1.3.x wanted a
  file inside it and took its dirname); OUT_CKPT is the `.ckpt` file name.
- dtype. `--dtype` maps to `mindspore.float32/float16/bfloat16` as the root script's `--dtype`
  does; without it, `dtype=None`. Note that transformers 5 loads with dtype "auto" (4.x, which
  MindFormers 2.0 pins, loaded float32), so with no --dtype a bf16 source stays BFloat16 here.
- Llama only. A Qwen2 directory loads as `LlamaForCausalLM` (attention_bias=False), so
  transformers drops its q/k/v biases as unexpected keys and they are missing from the .ckpt.
- The converter catches a failed `from_pretrained`, prints, and goes on to a NameError; it
  returns None. Any exception exits non-zero with the traceback on stderr.

Run it as a subprocess with the test venv's Python: importing mindspore changes the process
(LD_LIBRARY_PATH, the protobuf implementation later subprocesses inherit, the recursion limit).
`convert-llama` and `version` print one JSON line: {"mindformers": version, "mindspore": version,
"transformers": version[, "output": OUT_CKPT]}. `batch` runs many conversions in one process
(importing transformers and mindspore costs most of a run): JOB_JSON is {"jobs": [{"hf_dir",
"out_ckpt", "dtype": "fp32" | "fp16" | "bf16" | null}]} (a glm-n job adds "model": "glm-n",
"config": yaml, "order": [state_dict names]; a cogvlm2 job adds "model": "cogvlm2", "wheel": the
mindformers 1.3.2 wheel, "modal"; any job may add "compare_with": weightport's .ckpt), RESULT_JSON
gets the versions and one {"output"[, "compare"]} or {"error": traceback} per job, in order.

CogVLM2 (`cogvlm2` jobs): MindFormers removed mindformers/models/cogvlm2 in June 2025, so the
installed 2.0.0 has no such converter; the test downloads the 1.3.2 wheel from PyPI with pip (no
code of it is kept in this repository) and this script reads the converter and its convert_utils
from that zip, unmodified, under the same stand-in packages. "compare" loads weightport's and
MindFormers' files with `mindspore.load_checkpoint` here and reports names, shapes, dtypes and
which values differ, so that big files (the 4096-wide case) need no .npy dumps.
"""

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path


def _package_dir() -> Path:
    spec = importlib.util.find_spec("mindformers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mindformers is not installed (pip install --no-deps mindformers==2.0.0)")
    return Path(list(spec.submodule_search_locations)[0])


def _stand_in(name: str, path: Path | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, but one from which nothing else gets imported
    if path is not None:
        mod.__file__ = str(path / "__init__.py")
    sys.modules[name] = mod
    return mod


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, mod)
    return mod


def _unavailable(what: str):
    class Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError(f"mindformers.tools.{what} is not loaded by mindformers_peer.py")

        def __getattr__(self, attr):
            raise RuntimeError(f"mindformers.tools.{what} is not loaded by mindformers_peer.py")

    Unavailable.__name__ = what
    return Unavailable


class _YamlConfig(dict):
    """Stands in for mindformers.tools.MindFormerConfig, which the glm converter uses only as
    `MindFormerConfig(yaml_path)['model']['model_config']`."""

    def __init__(self, path):
        import yaml

        with open(path, encoding="utf-8") as f:
            super().__init__(yaml.safe_load(f))


class _ChatGLM2Config:
    """Stands in for mindformers' ChatGLM2Config (a PretrainedConfig that drags in the framework):
    the converter only reads attributes, and every one it reads must be in the yaml."""

    READ = ("multi_query_attention", "kv_channels", "num_attention_heads", "multi_query_group_num",
            "use_rearrange_rope", "qkv_concat", "mlp_concat", "ffn_hidden_size")

    def __init__(self, **kw):
        missing = [k for k in self.READ if k not in kw]
        if missing:
            raise ValueError(f"the test yaml lacks {missing}")
        self.__dict__.update(kw)


@functools.cache
def _stand_ins(root: Path) -> None:
    if "mindformers" in sys.modules:
        return
    _stand_in("mindformers", root).__version__ = importlib.metadata.version("mindformers")
    _stand_in("mindformers.utils", root / "utils")
    tools = _stand_in("mindformers.tools", root / "tools")
    for what in ("MindFormerConfig", "MindFormerRegister", "MindFormerModuleType"):
        setattr(tools, what, _unavailable(what))
    _stand_in("mindformers.models", root / "models")
    _load_file("mindformers.utils.convert_utils", root / "utils" / "convert_utils.py")


@functools.cache
def load_converter() -> types.ModuleType:
    """MindFormers' own `mindformers.models.llama.convert_weight`, loaded from its file."""
    root = _package_dir()
    _stand_ins(root)
    _stand_in("mindformers.models.llama", root / "models" / "llama")
    return _load_file("mindformers.models.llama.convert_weight", root / "models" / "llama" / "convert_weight.py")


@functools.cache
def load_glm_converter() -> types.ModuleType:
    """MindFormers' own `mindformers.models.glm2.convert_weight` (glm-n, glm4), loaded from its file,
    with MindFormerConfig and ChatGLM2Config stood in for (see the classes above)."""
    root = _package_dir()
    _stand_ins(root)
    sys.modules["mindformers.tools"].MindFormerConfig = _YamlConfig
    _stand_in("mindformers.models.glm2", root / "models" / "glm2")
    cfg = types.ModuleType("mindformers.models.glm2.glm2_config")
    cfg.ChatGLM2Config = _ChatGLM2Config
    sys.modules[cfg.__name__] = cfg
    return _load_file("mindformers.models.glm2.convert_weight", root / "models" / "glm2" / "convert_weight.py")


class _RemoteCodeModel:
    """What `AutoModel.from_pretrained(dir, trust_remote_code)` gives the converter for ChatGLM,
    whose modeling code is on the Hub, not in transformers: only state_dict() is used, so this
    returns the directory's tensors in modeling_chatglm.py's module order (given by the test)."""

    order: list = []

    def __init__(self, path):
        from safetensors.torch import load_file

        tensors = load_file(str(Path(path) / "model.safetensors"))
        self._state = {k: tensors[k] for k in self.order}
        if sorted(self._state) != sorted(tensors):
            raise ValueError("the test's state_dict order does not name every tensor")

    @classmethod
    def from_pretrained(cls, path, **kw):
        return cls(path)

    def state_dict(self):
        return dict(self._state)


def convert_glm(hf_dir: str, out_ckpt: str, config_yaml: str, order: list, dtype: str | None) -> dict:
    import mindspore as ms

    dtypes = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
    conv = load_glm_converter()
    _RemoteCodeModel.order = order
    conv.AutoModel = _RemoteCodeModel
    Path(out_ckpt).parent.mkdir(parents=True, exist_ok=True)
    # the root script passes dtype=None when --dtype is absent, but this function's own default is float32
    conv.convert_pt_to_ms(hf_dir, out_ckpt, config_yaml, dtype=dtypes[dtype or "fp32"])
    if not Path(out_ckpt).is_file():
        raise SystemExit(f"MindFormers' converter wrote no {out_ckpt}")
    return {"output": out_ckpt}


def convert_llama(hf_dir: str, out_ckpt: str, dtype: str | None) -> dict:
    import mindspore as ms

    dtypes = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}  # the root script's --dtype
    conv = load_converter()
    Path(out_ckpt).parent.mkdir(parents=True, exist_ok=True)
    conv.convert_pt_to_ms(input_path=hf_dir, output_path=out_ckpt, dtype=dtypes[dtype] if dtype else None)
    print(flush=True)  # the converter ends its progress line with \r
    if not Path(out_ckpt).is_file():
        raise SystemExit(f"MindFormers' converter wrote no {out_ckpt}")
    return {"output": out_ckpt}


@functools.cache
def load_cogvlm2_converter(wheel: str) -> types.ModuleType:
    """MindFormers' own `mindformers.models.cogvlm2.convert_weight`, as the given wheel ships it
    (1.3.2, the last on PyPI with it; its code is the same in the v1.5.0 sources), with the wheel's
    own `mindformers.utils.convert_utils` (pt2ms), both read straight from the zip, unmodified."""
    import zipfile

    root = _package_dir()
    _stand_ins(root)
    _stand_in("mindformers.models.cogvlm2", root / "models" / "cogvlm2")
    members = {"utils": "mindformers/utils/convert_utils.py", "cogvlm2": "mindformers/models/cogvlm2/convert_weight.py"}
    with zipfile.ZipFile(wheel) as z:
        code = {k: z.read(m).decode("utf-8") for k, m in members.items()}
    installed = sys.modules["mindformers.utils.convert_utils"]
    try:
        # the converter binds `pt2ms` at import: from the wheel's convert_utils, not the installed one
        utils = types.ModuleType("mindformers.utils.convert_utils")
        utils.__file__ = f"{wheel}!/{members['utils']}"
        sys.modules[utils.__name__] = utils
        exec(compile(code["utils"], utils.__file__, "exec"), utils.__dict__)
        conv = types.ModuleType("mindformers.models.cogvlm2.convert_weight")
        conv.__file__ = f"{wheel}!/{members['cogvlm2']}"
        sys.modules[conv.__name__] = conv
        exec(compile(code["cogvlm2"], conv.__file__, "exec"), conv.__dict__)
    finally:
        sys.modules["mindformers.utils.convert_utils"] = installed
    return conv


def convert_cogvlm2(hf_dir: str, out_ckpt: str, wheel: str, dtype: str | None, modal: str | None) -> dict:
    """What MindFormers 1.3.2's root `convert_weight.py --model cogvlm2 --input_path HF_DIR --output_path
    OUT [--dtype D] [--modal M]` does: `convert_pt_to_ms(input_path=, output_path=, dtype=<ms dtype or
    None>, **extra)`, the extra keywords being its other flags' defaults and --modal as a string."""
    import mindspore as ms

    dtypes = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
    conv = load_cogvlm2_converter(wheel)
    extra = {"n_head": 32, "hidden_size": 4096, "layers": 12, "is_pretrain": False, "telechat_type": "telechat_12b"}
    if modal:
        extra["modal"] = modal
    Path(out_ckpt).parent.mkdir(parents=True, exist_ok=True)
    conv.convert_pt_to_ms(input_path=hf_dir, output_path=out_ckpt, dtype=dtypes[dtype] if dtype else None, **extra)
    print(flush=True)
    if not Path(out_ckpt).is_file():
        raise SystemExit(f"MindFormers' converter wrote no {out_ckpt}")
    return {"output": out_ckpt}


def compare(ours: str, theirs: str) -> dict:
    """Both files through `mindspore.load_checkpoint`: {name: [shape, dtype]} of each, and the names
    whose values differ (bf16 compared as float32, exactly). Done here, so big files need no dumps."""
    import mindspore as ms
    import numpy as np

    a, b = ms.load_checkpoint(ours), ms.load_checkpoint(theirs)

    def value(p):
        return p.float().asnumpy() if str(p.dtype) == "BFloat16" else p.asnumpy()

    differ = sorted(n for n in a.keys() & b.keys() if a[n].shape == b[n].shape and str(a[n].dtype) == str(b[n].dtype)
                    and not np.array_equal(value(a[n]), value(b[n])))
    return {"ours": {n: [list(p.shape), str(p.dtype)] for n, p in a.items()},
            "theirs": {n: [list(p.shape), str(p.dtype)] for n, p in b.items()}, "values_differ": differ}


def batch(job_path: str, result_path: str) -> None:
    import traceback

    with open(job_path, encoding="utf-8") as f:
        jobs = json.load(f)["jobs"]
    results = []
    for job in jobs:
        try:
            if job.get("model") == "glm-n":
                results.append(convert_glm(job["hf_dir"], job["out_ckpt"], job["config"], job["order"],
                                           job.get("dtype")))
            elif job.get("model") == "cogvlm2":
                results.append(convert_cogvlm2(job["hf_dir"], job["out_ckpt"], job["wheel"], job.get("dtype"),
                                               job.get("modal")))
            else:
                results.append(convert_llama(job["hf_dir"], job["out_ckpt"], job.get("dtype")))
            if job.get("compare_with") and "output" in results[-1]:
                results[-1]["compare"] = compare(job["compare_with"], job["out_ckpt"])
        except BaseException:  # SystemExit too: one bad job must not hide the others
            results.append({"error": traceback.format_exc()})
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({**versions(), "results": results}, f)


def versions() -> dict:
    return {p: importlib.metadata.version(p) for p in ("mindformers", "mindspore", "transformers")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert-llama", help="MindFormers' convert_pt_to_ms on a HF Llama directory")
    c.add_argument("hf_dir")
    c.add_argument("out_ckpt")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    b = sub.add_parser("batch", help="many convert-llama jobs in one process")
    b.add_argument("job_json")
    b.add_argument("result_json")
    sub.add_parser("version", help="print the installed versions")
    args = ap.parse_args(argv)
    if args.cmd == "batch":
        return batch(args.job_json, args.result_json)
    result = versions()
    if args.cmd == "convert-llama":
        result.update(convert_llama(args.hf_dir, args.out_ckpt, args.dtype))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
