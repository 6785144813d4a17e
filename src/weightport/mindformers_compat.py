"""`weightport mindformers`: MindFormers' documented `convert_weight.py` command line, on our engine.

    python convert_weight.py --model llama [--reversed] --input_path IN --output_path OUT [--dtype bf16]

means the same here, with no MindSpore installed and streaming. Differences, on purpose: the
reverse direction writes a Hugging Face directory (config, safetensors, tokenizer) where
MindFormers writes a bare torch pickle, and the forward direction also leaves the config.json and
MindFormers yaml next to the .ckpt so it converts back exactly.
"""

from __future__ import annotations

import argparse
import os
import shutil

from pathlib import Path

from . import api
from .errors import WeightportError
from .hf_config import load_yaml
from .formats.mindformers import BY_ARCH, NAME_SETS
from .formats.mindformers import from_yaml as mindformers_yaml

# MindFormers --model keys we convert, and the Hugging Face architectures each accepts
MODELS = {key: ns.key_archs.get(key, ns.archs) for ns in NAME_SETS for key in ns.keys}
# keys of MindFormers' conversion table that weightport does not convert yet
NOT_YET = tuple(k for k in ("glm", "glm-n", "glm4", "baichuan2", "qwen", "qwenvl", "internlm", "internlm2", "cogvlm2",
                            "deepseek2", "deepseekv3", "gpt", "whisper", "telechat", "llava", "internvl2")
                if k not in MODELS)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_parser(sub) -> None:
    m = sub.add_parser(
        "mindformers", help="MindFormers' convert_weight.py command line (HF <-> MindSpore .ckpt)",
        description="Same flags and meanings as MindFormers' `convert_weight.py`. Forward: --input_path is a "
                    "Hugging Face model directory (or a file inside it, as older MindFormers took), --output_path "
                    "the .ckpt to write; config.json and mindformers.yaml are written beside it unless present. "
                    "--reversed: --input_path is a .ckpt (with its config.json or MindFormers yaml beside it), "
                    "--output_path the Hugging Face directory to create.")
    m.add_argument("--model", required=True, metavar="MODEL",
                   help=f"MindFormers model key: {', '.join(MODELS)} (not yet: {', '.join(NOT_YET)})")
    m.add_argument("--reversed", action="store_true", help="MindSpore .ckpt -> Hugging Face")
    m.add_argument("--input_path", required=True, metavar="PATH", help="what to convert")
    m.add_argument("--output_path", required=True, metavar="PATH", help="where to write it")
    m.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written weights (default: keep)")
    m.add_argument("--qkv_concat", type=_bool, default=False, metavar="BOOL",
                   help="forward: write fused w_qkv / w_gate_hidden in MindFormers >= 1.5's interleaved layout "
                        "(as its --qkv_concat True does); reversed: the .ckpt is fused")
    m.add_argument("--config", metavar="YAML",
                   help="a MindFormers model yaml whose qkv_concat / mlp_concat / use_rearrange_rope (glm-n) or "
                        "qkv_concat / use_gmm (llama family) say which layout to write (forward) or read (reversed), "
                        "as MindFormers' glm converter takes it; glm-n without it: fused, as ChatGLM2Config defaults")
    m.add_argument("--modal", choices=["image", "video"],
                   help="cogvlm2: checked against the checkpoint (CogVLM2 image or video model)")
    m.add_argument("--n_head", type=int, metavar="N", help="checked against the config: attention heads")
    m.add_argument("--hidden_size", type=int, metavar="N", help="checked against the config: hidden size")
    m.add_argument("--layers", type=int, metavar="N", help="checked against the config: number of layers")
    m.add_argument("--force", action="store_true", help="replace --output_path if it exists")


def run(args) -> str:
    """Runs the conversion; returns a one-line summary."""
    if args.model in NOT_YET:
        raise WeightportError(f"--model {args.model}: in MindFormers' table, but weightport does not convert it yet "
                              f"(supported: {', '.join(MODELS)})")
    if args.model not in MODELS:
        raise WeightportError(f"--model {args.model}: unknown MindFormers model key (supported: {', '.join(MODELS)})")
    src, out = Path(args.input_path), Path(args.output_path)
    if not args.reversed and src.is_file():
        src = src.parent  # MindFormers <= 1.3 took a file inside the HF directory
    dtype = DTYPES[args.dtype] if args.dtype else "auto"
    layout = _layout(args)
    if args.reversed:
        plan = api.plan_conversion(src, out, "hf", source_format="mindspore", dtype=dtype, source_layout=layout)
        _check(args, plan)
        plan.source.close()
        api.convert(src, out, "hf", source_format="mindspore", dtype=dtype, force=args.force, source_layout=layout)
        return f"wrote {out}"
    work = out.parent / f".{out.name}.weightport-dir-{os.getpid()}"
    plan = api.plan_conversion(src, work, "mindspore", source_format="hf", dtype=dtype, layout=layout)
    _check(args, plan)
    plan.source.close()
    if out.exists() and not args.force:
        raise WeightportError(f"{out}: already exists; pass --force to replace it")
    try:
        api.convert(src, work, "mindspore", source_format="hf", dtype=dtype, layout=layout, force=True)
        os.replace(work / "model.ckpt", out)
        kept = []
        for name in ("config.json", "mindformers.yaml"):
            if not (out.parent / name).exists():
                os.replace(work / name, out.parent / name)
                kept.append(name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return f"wrote {out}" + (f" (and {', '.join(kept)} beside it)" if kept else "")


def _layout(args) -> str | None:
    """The layout to write (forward) or read (reversed); None: the family's default, or on read
    whatever the file and its yaml say. MindFormers' glm converter takes it from the model yaml
    (--config); its Llama family from --qkv_concat (the >= 1.5 interleaved fusion)."""
    concat = args.qkv_concat
    if args.config:
        data = load_yaml(Path(args.config))
        _, layout = mindformers_yaml(data if isinstance(data, dict) else {}, args.config)
        if layout is not None:
            return layout
        concat = bool(data["model"]["model_config"].get("qkv_concat"))
    layouts = BY_ARCH[MODELS[args.model][0]].layouts
    if not concat:
        # the root script's --qkv_concat defaults to False: the split layout, where there is one
        glm = args.model in ("glm-n", "glm4")
        return None if args.reversed or glm or "separate" not in layouts else "separate"
    # the converters that take the flag: Llama family and InternLM2 (interleaved), Qwen-VL (plain)
    fused = next((l for l in ("fused-interleaved", "fused") if l in layouts), None)
    if fused is None or args.model in ("glm-n", "glm4"):
        raise WeightportError(f"--qkv_concat: MindFormers' {args.model} converter has no such option"
                              + (" (its layout comes from --config)" if args.model in ("glm-n", "glm4") else ""))
    return fused


def _check(args, plan) -> None:
    model = plan.source.model
    if model.arch.name not in MODELS[args.model]:
        plan.source.close()
        raise WeightportError(f"--model {args.model}: {args.input_path} is a {model.arch.name} model "
                              f"({model.arch.hf_class})")
    if args.modal and model.arch.name.startswith("cogvlm2"):
        modal = "video" if model.arch.name.endswith("video") else "image"
        if args.modal != modal:
            plan.source.close()
            raise WeightportError(f"--modal {args.modal}: {args.input_path} is a CogVLM2 {modal} model")
    for flag, value in (("n_head", model.dims.n_head), ("hidden_size", model.dims.hidden),
                        ("layers", model.dims.n_layer)):
        given = getattr(args, flag)
        if given is not None and given != value:
            plan.source.close()
            raise WeightportError(f"--{flag} {given}: the model's config says {value}")
