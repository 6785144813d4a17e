"""`weightport mindformers`: MindFormers' documented `convert_weight.py` command line, on our engine.

    python convert_weight.py --model llama [--reversed] --input_path IN --output_path OUT [--dtype bf16]

means the same here, with no MindSpore installed and streaming; each family's own flags mean what
its converter makes of them, in the release RELEASES names (docs/mindspore.md has the table).
Differences, on purpose: the reverse direction writes a Hugging Face directory (config,
safetensors, tokenizer) where MindFormers writes a bare torch pickle, and the forward direction
also leaves the config.json and MindFormers yaml next to the .ckpt so it converts back exactly.
"""

from __future__ import annotations

import argparse
import os
import shutil

from pathlib import Path

from ... import api
from ...errors import WeightportError
from ...hf_config import load_yaml
from .ckpt import MsCkptFile
from ...paths import check_not_input, check_regular
from .families import BY_ARCH, NAME_SETS
from .families import from_yaml as mindformers_yaml

# MindFormers --model keys we convert, and the Hugging Face architectures each accepts
MODELS = {key: ns.key_archs.get(key, ns.archs) for ns in NAME_SETS for key in ns.keys}
# keys of MindFormers' conversion table that weightport does not convert yet
NOT_YET = tuple(k for k in ("glm", "glm-n", "glm4", "baichuan2", "qwen", "qwenvl", "internlm", "internlm2", "cogvlm2",
                            "deepseek2", "deepseekv3", "gpt", "whisper", "telechat", "llava", "internvl2")
                if k not in MODELS)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LLAMA_KEYS = tuple(k for ns in NAME_SETS if "llama" in ns.archs for k in ns.keys)

# Where MindFormers' command line differs between releases, the one followed, per family: the last
# release that has the family's converter (research/baichuan2, internlm and qwen were removed after
# v1.3.2; research/internlm2, research/qwenvl and models/cogvlm2 after v1.5.0).
RELEASES = {"baichuan2": "v1.3.2", "internlm": "v1.3.2", "qwen": "v1.3.2",
            "internlm2": "v1.5.0", "qwenvl": "v1.5.0", "cogvlm2": "v1.5.0"}

# MindFormers' root convert_weight.py hands every flag beyond --model/--reversed/--input_path/
# --output_path/--dtype to the family's converter as a keyword argument, and each converter reads
# only its own. These are the families whose forward converter reads each flag; the others ignore
# it, and so does weightport (it says so): the layout never changes for a flag MindFormers ignores.
READS = {
    "qkv_concat": ("internlm2",) + LLAMA_KEYS,  # the Llama family: weightport's own meaning, see --help
    "use_qkv_concat": ("qwenvl",),
    "vit_num_head": ("qwenvl",),
    "enable_emb_opt": ("qwenvl",),
    "emb_strategy": ("qwenvl",),
    "modal": ("cogvlm2",),
    "sft": ("cogvlm2",),
}

EPILOG = """\
Each family's own flags, as its MindFormers converter takes them; where MindFormers' releases
differ, the one followed (the last that has the family's converter):

  family     release  flags (default)
  baichuan2  v1.3.2   none: W_pack always split into wq/wk/wv
  internlm   v1.3.2   none: wq/wk/wv/wo kept separate
  qwen       v1.3.2   none: c_attn always split into wq/wk/wv
  internlm2  v1.5.0   --qkv_concat BOOL (True): True keeps wqkv fused as attention.w,
                      False splits it into wq/wk/wv. Default fused, as research/internlm2's
                      converter itself, MindFormers v1.3.2's command line and every shipped
                      InternLM2 yaml (qkv_concat: True); v1.5.0's command line passes
                      qkv_concat=False when the flag is absent, so give --qkv_concat False for
                      the file it writes by default (v1.3.2 reads any given value as true)
  qwenvl     v1.5.0   --use_qkv_concat BOOL (False): True keeps c_attn whole as attention.w
                      (the meaning of research/qwenvl/convert_weight.py's own flag; through
                      MindFormers' root script the value arrives as a string, so there even
                      False gives the fused file); --vit_num_head N (16 in MindFormers; here
                      the config's, checked if given); --enable_emb_opt True (vocabulary
                      padding) and --emb_strategy are refused / ignored; --qkv_concat is
                      ignored, as MindFormers' qwenvl converter ignores it
  cogvlm2    v1.5.0   --modal image|video (MindFormers: video; here: the checkpoint's, checked
                      if given); --sft full (lora is refused)

A flag the chosen family's converter does not read is accepted and ignored, as MindFormers'
command line does, and the summary says so. Llama family (llama ... mixtral): --qkv_concat True
writes MindFormers >= 1.5's fused w_qkv / w_gate_hidden in one step; that is weightport's own
(MindFormers' llama convert_pt_to_ms ignores the flag; its qwen2_5 / llama scripts use it to
re-fuse an existing .ckpt). glm-n / glm4 take the layout from --config. The same layouts are the
defaults of `weightport convert --to mindspore` (InternLM2: fused there too)."""


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_parser(sub) -> None:
    m = sub.add_parser(
        "mindformers", help="MindFormers' convert_weight.py command line (HF <-> MindSpore .ckpt)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
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
    m.add_argument("--qkv_concat", type=_bool, default=None, metavar="BOOL",
                   help="internlm2: True (default) keeps wqkv fused, False splits it (v1.5.0's meaning); "
                        "Llama family: True writes MindFormers >= 1.5's fused interleaved w_qkv / w_gate_hidden "
                        "(reversed: the .ckpt is that); other families: ignored, as their converters ignore it")
    m.add_argument("--use_qkv_concat", type=_bool, default=None, metavar="BOOL",
                   help="qwenvl: True keeps c_attn whole as attention.w (default False: wq/wk/wv)")
    m.add_argument("--vit_num_head", type=int, metavar="N",
                   help="qwenvl: the ViT's heads, checked against the config (MindFormers' default: 16)")
    m.add_argument("--enable_emb_opt", type=_bool, default=None, metavar="BOOL",
                   help="qwenvl: True (pad the vocabulary for embedding parallelism) is refused")
    m.add_argument("--emb_strategy", type=int, metavar="N", help="qwenvl: only with --enable_emb_opt True")
    m.add_argument("--config", metavar="YAML",
                   help="a MindFormers model yaml whose qkv_concat / mlp_concat / use_rearrange_rope (glm-n) or "
                        "qkv_concat / use_gmm (llama family) say which layout to write (forward) or read (reversed), "
                        "as MindFormers' glm converter takes it; glm-n without it: fused, as ChatGLM2Config defaults")
    m.add_argument("--modal", choices=["image", "video"],
                   help="cogvlm2: checked against the checkpoint (CogVLM2 image or video model)")
    m.add_argument("--sft", choices=["full", "lora"], help="cogvlm2: full (lora is refused)")
    m.add_argument("--n_head", type=int, metavar="N", help="checked against the config: attention heads")
    m.add_argument("--hidden_size", type=int, metavar="N", help="checked against the config: hidden size")
    m.add_argument("--layers", type=int, metavar="N", help="checked against the config: number of layers")
    m.add_argument("--force", action="store_true",
                   help="replace an existing --output_path that weightport could have written: forward, a "
                        "MindSpore .ckpt; reversed, a directory its weightport-manifest.json accounts for")
    m.add_argument("--delete-existing", action="store_true",
                   help="replace --output_path whatever it holds (a file that is not a checkpoint, a directory of "
                        "other files). --input_path and --config are never replaced, with any flag")


def run(args) -> str:
    """Runs the conversion; returns a one-line summary (and a line per note)."""
    if args.model in NOT_YET:
        raise WeightportError(f"--model {args.model}: in MindFormers' table, but weightport does not convert it yet "
                              f"(supported: {', '.join(MODELS)})")
    if args.model not in MODELS:
        raise WeightportError(f"--model {args.model}: unknown MindFormers model key (supported: {', '.join(MODELS)})")
    src, out = Path(args.input_path), Path(args.output_path)
    if not args.reversed and src.is_file():
        src = src.parent  # MindFormers <= 1.3 took a file inside the HF directory
    inputs = {"--input_path": src, "--config": args.config}
    api.check_inputs(inputs)
    check_not_input(out, inputs, alone=("--config",))  # a yaml is read alone
    dtype = DTYPES[args.dtype] if args.dtype else "auto"
    notes = _ignored(args)
    layout = _layout(args, notes)
    if args.reversed:
        plan = _plan(args, src, out, "hf", dtype=dtype, source_format="mindspore", source_layout=layout)
        _check(args, plan, notes)
        plan.source.close()
        api.convert(src, out, "hf", source_format="mindspore", dtype=dtype, force=args.force,
                    delete_existing=args.delete_existing, source_layout=layout)
        return _summary(f"wrote {out}", notes)
    work = out.parent / f".{out.name}.weightport-dir-{os.getpid()}"
    plan = _plan(args, src, work, "mindspore", dtype=dtype, source_format="hf", layout=layout)
    _check(args, plan, notes)
    plan.source.close()
    _check_ckpt_replaceable(out, args.force, args.delete_existing)
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
    return _summary(f"wrote {out}" + (f" (and {', '.join(kept)} beside it)" if kept else ""), notes)


def _check_ckpt_replaceable(out: Path, force: bool, delete_existing: bool) -> None:
    """The forward --output_path is one file: --force replaces it only when it is a MindSpore
    checkpoint (what this command writes), --delete-existing whatever file it is; a directory, never."""
    if out.is_dir() and not out.is_symlink():
        raise WeightportError(f"{out}: is a directory; --output_path names the .ckpt file to write")
    if not (out.exists() or out.is_symlink()) or delete_existing:
        return
    if not force:
        raise WeightportError(f"{out}: already exists; pass --force to replace it")
    why = None
    if out.is_symlink():
        why = "is a symlink"
    else:
        check_regular(out)
        try:
            MsCkptFile(out).close()
        except WeightportError:
            why = "is not a MindSpore checkpoint"
    if why:
        raise WeightportError(f"{out}: {why}; not replaced (pass --delete-existing to replace it anyway)")


def _plan(args, src: Path, out: Path, to: str, **kw):
    """The plan, with the --model key's layout; where that fails, a model of another family is the
    likelier cause, and _check says so first."""
    try:
        return api.plan_conversion(src, out, to, **kw)
    except WeightportError:
        if kw.get("layout") is None and kw.get("source_layout") is None:
            raise
        plan = api.plan_conversion(src, out, to, **{**kw, "layout": None, "source_layout": None})
        try:
            _check(args, plan, [])
        finally:
            plan.source.close()
        raise


def _summary(line: str, notes: list[str]) -> str:
    return "\n".join([line] + [f"note: {n}" for n in notes])


def _ignored(args) -> list[str]:
    """Notes for the given flags the family's converter does not read (MindFormers ignores them)."""
    notes = []
    for flag, readers in READS.items():
        value = getattr(args, flag, None)
        if value is None or args.model in readers:
            continue
        if flag == "qkv_concat" and args.model in ("glm-n", "glm4"):
            notes.append(f"--qkv_concat ignored, as MindFormers' {args.model} converter ignores it; "
                         "its layout comes from --config")
            continue
        hint = " (--use_qkv_concat True writes its fused layout)" if flag == "qkv_concat" and args.model == "qwenvl" else ""
        notes.append(f"--{flag} ignored, as MindFormers' {args.model} converter ignores it{hint}")
    if args.model == "qwenvl":
        if args.enable_emb_opt:
            raise WeightportError("--enable_emb_opt True: MindFormers pads the embedding and lm_head rows to a "
                                  "multiple of 512 x --emb_strategy; weightport writes no padded vocabulary")
        if args.emb_strategy is not None:
            notes.append("--emb_strategy ignored without --enable_emb_opt True, as MindFormers' qwenvl converter "
                         "ignores it")
    if args.model == "cogvlm2" and args.sft == "lora":
        raise WeightportError("--sft lora: weightport does not write the names of MindFormers' CogVLM2 LoRA model "
                              "(pet_model.lora_model.)")
    return notes


def _layout(args, notes: list[str]) -> str | None:
    """The layout to write (forward) or read (reversed); None: the family's default, or on read
    whatever the file and its yaml say. MindFormers' glm converter takes it from the model yaml
    (--config); InternLM2's from --qkv_concat, Qwen-VL's from --use_qkv_concat; the Llama family
    from --qkv_concat as weightport's own shortcut (the >= 1.5 interleaved fusion)."""
    if args.config:
        data = load_yaml(Path(args.config))
        _, layout = mindformers_yaml(data if isinstance(data, dict) else {}, args.config)
        if layout is not None:
            return layout
        concat = bool(data["model"]["model_config"].get("qkv_concat"))
        if args.model in LLAMA_KEYS and concat:
            return "fused-interleaved"
        return None if args.reversed else _default(args)
    if args.model == "internlm2":
        if args.reversed:
            if args.qkv_concat is not None:
                notes.append("--qkv_concat ignored with --reversed: the .ckpt's names say whether wqkv is fused")
            return None
        return "fused-interleaved" if args.qkv_concat in (None, True) else "separate"
    if args.model == "qwenvl":
        if args.reversed:
            if args.use_qkv_concat is not None:
                notes.append("--use_qkv_concat ignored with --reversed: the .ckpt's names say whether c_attn is whole")
            return None
        return "fused" if args.use_qkv_concat else "separate"
    if args.model in LLAMA_KEYS and args.qkv_concat:
        layouts = BY_ARCH[MODELS[args.model][0]].layouts
        return next(l for l in ("fused-interleaved", "fused") if l in layouts)
    return None if args.reversed else _default(args)


def _default(args) -> str | None:
    """What the family's converter writes with no layout flag: its split layout where it has one
    (the root script's --qkv_concat defaults to False), glm-n's fused (ChatGLM2Config's)."""
    if args.model in ("glm-n", "glm4"):
        return None
    layouts = BY_ARCH[MODELS[args.model][0]].layouts
    return "separate" if "separate" in layouts else None


def _check(args, plan, notes: list[str]) -> None:
    model = plan.source.model

    def refuse(message: str) -> None:
        plan.source.close()
        raise WeightportError(message)

    if model.arch.name not in MODELS[args.model]:
        refuse(f"--model {args.model}: {args.input_path} is a {model.arch.name} model ({model.arch.hf_class})")
    visual = model.config.get("visual") if model.arch.name == "qwen" else None
    if args.model == "qwenvl" and not visual:
        refuse(f"--model qwenvl: {args.input_path} is a Qwen (1) model without a vision encoder (use --model qwen)")
    if args.model == "qwen" and visual:
        refuse(f"--model qwen: {args.input_path} is a Qwen-VL model (use --model qwenvl)")
    if visual and not args.reversed:
        heads = visual["heads"]
        if args.vit_num_head is not None and args.vit_num_head != heads:
            refuse(f"--vit_num_head {args.vit_num_head}: the config's vision encoder has {heads} heads")
        if args.vit_num_head is None and heads != 16:
            notes.append(f"the ViT's in_proj is split per the config's {heads} heads (MindFormers' qwenvl "
                         "converter assumes 16 unless --vit_num_head says otherwise)")
    if model.arch.name.startswith("cogvlm2"):
        modal = "video" if model.arch.name.endswith("video") else "image"
        if args.modal and args.modal != modal:
            refuse(f"--modal {args.modal}: {args.input_path} is a CogVLM2 {modal} model")
        if not args.modal and modal == "image" and not args.reversed:
            notes.append("converted as --modal image, the checkpoint's (MindFormers' default --modal video "
                         "would rename an image model's weights as its video model's)")
    for flag, value in (("n_head", model.dims.n_head), ("hidden_size", model.dims.hidden),
                        ("layers", model.dims.n_layer)):
        given = getattr(args, flag)
        if given is not None and given != value:
            plan.source.close()
            raise WeightportError(f"--{flag} {given}: the model's config says {value}")
