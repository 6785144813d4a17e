#!/usr/bin/env python
"""LitGPT reference peer for weightport tests.

Run with the LitGPT virtualenv (imports only stdlib, torch, yaml, litgpt). LitGPT's logits come
from weightport's own runner, src/weightport/formats/litgpt/runner/litgpt_runner.py.

    .venv-litgpt/bin/python tests/peers/litgpt_peer.py convert-hf HF_DIR OUT_DIR MODEL_CONFIG_YAML
    .venv-litgpt/bin/python tests/peers/litgpt_peer.py convert-lit LIT_DIR OUT_DIR

convert-hf
    Runs litgpt's own ``litgpt.scripts.convert_hf_checkpoint.convert_hf_checkpoint`` on a HF
    checkpoint whose architecture is not in litgpt's built-in config table. The Config given in
    MODEL_CONFIG_YAML is registered in ``litgpt.config.name_to_config`` under its ``name`` (the
    table that ``Config.from_name`` consults first), then the unmodified converter is called
    with ``model_name=<that name>``. The converter reads the weights from, and writes
    ``lit_model.pth`` + ``model_config.yaml`` into, its ``checkpoint_dir``; so the HF weight
    files (and index) are symlinked into OUT_DIR, the converter runs on OUT_DIR, and the
    symlinks are removed again. OUT_DIR/lit_model.pth is litgpt's own output, byte for byte.
    NOTE: the copy function is chosen by litgpt from the *name* (see the dispatch in
    convert_hf_checkpoint), so the name in the yaml matters.

make-lora BASE_LIT_DIR OUT_DIR R ALPHA ENABLED SEED
    A LoRA checkpoint as ``litgpt finetune_lora`` leaves it, from LitGPT's own LoRA GPT, with random
    lora_A/lora_B (ENABLED: comma list of query,key,value,projection,mlp,head).

merge-lora LORA_DIR
    Runs litgpt's own ``merge_lora`` (``litgpt merge_lora``): writes LORA_DIR/lit_model.pth.

convert-lit
    Runs litgpt's own ``convert_lit_checkpoint(LIT_DIR, OUT_DIR)``: writes OUT_DIR/model.pth
    (a torch pickle of a flat HF-named state dict; no config.json, no safetensors).
"""

import argparse
import os
import sys
from pathlib import Path

import yaml


def _load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fp:
        d = yaml.safe_load(fp)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(d).__name__}")
    return d


def _weight_files(hf_dir: Path) -> list:
    names = []
    for p in sorted(hf_dir.iterdir()):
        if p.is_file() and (
            p.suffix in (".safetensors", ".bin") or p.name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
        ):
            names.append(p)
    return names


def cmd_convert_hf(hf_dir: Path, out_dir: Path, model_config_yaml: Path) -> None:
    import litgpt.config as litgpt_config
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    conf_dict = _load_yaml(model_config_yaml)
    name = conf_dict.get("name") or (conf_dict.get("hf_config") or {}).get("name")
    if not name:
        raise ValueError(f"{model_config_yaml}: 'name' is required (litgpt dispatches on it)")
    # Validate the yaml against the installed Config (unknown keys raise TypeError here).
    litgpt_config.Config(**conf_dict)
    # Register it in the table Config.from_name looks at first; convert_hf_checkpoint is unchanged.
    litgpt_config.name_to_config[name] = conf_dict

    hf_dir = hf_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    linked = []
    if out_dir != hf_dir:
        for src in _weight_files(hf_dir):
            dst = out_dir / src.name
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            os.symlink(src, dst)
            linked.append(dst)
    try:
        convert_hf_checkpoint(out_dir, model_name=name)
    finally:
        for dst in linked:
            dst.unlink()

    # Sanity: litgpt's own model_config.yaml must describe the same Config we asked for.
    written = _load_yaml(out_dir / "model_config.yaml")
    wanted = _asdict_config(litgpt_config.Config(**conf_dict))
    if written != wanted:
        diff = {k: (wanted.get(k), written.get(k)) for k in set(wanted) | set(written) if wanted.get(k) != written.get(k)}
        raise RuntimeError(f"litgpt wrote a different model_config.yaml: {diff}")


def _asdict_config(config) -> dict:
    import dataclasses

    return yaml.safe_load(yaml.dump(dataclasses.asdict(config)))


def cmd_convert_lit(lit_dir: Path, out_dir: Path) -> None:
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    convert_lit_checkpoint(lit_dir, out_dir)


LORA_FLAGS = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")


def cmd_make_lora(base_dir: Path, out_dir: Path, r: int, alpha: int, enabled: str, seed: int) -> None:
    """A LoRA checkpoint as `litgpt finetune_lora` leaves it (lit_model.pth.lora holding only the
    lora_ params under "model", hyperparameters.yaml, model_config.yaml), built with LitGPT's own
    LoRA GPT on the base at base_dir, its lora_A/lora_B drawn at random (B is zero when fresh)."""
    import shutil

    import torch
    from litgpt.lora import GPT, Config, lora_filter

    flags = {k: k.removeprefix("lora_") in enabled.split(",") for k in LORA_FLAGS}
    config = Config.from_file(base_dir / "model_config.yaml", lora_r=r, lora_alpha=alpha, **flags)
    model = GPT(config)
    model.load_state_dict(torch.load(base_dir / "lit_model.pth", weights_only=True), strict=False)
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, p in model.named_parameters():
        if lora_filter(name, p):
            lora[name] = 0.1 * torch.randn(p.shape, generator=g)
    out_dir.mkdir(parents=True)
    torch.save({"model": lora}, out_dir / "lit_model.pth.lora")
    for f in ["model_config.yaml", *(p.name for p in base_dir.glob("tokenizer*"))]:
        shutil.copy(base_dir / f, out_dir / f)
    hparams = {"checkpoint_dir": str(base_dir), "precision": "32-true", "lora_r": r, "lora_alpha": alpha,
               "lora_dropout": 0.0, **flags}
    with open(out_dir / "hyperparameters.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(hparams, f)


def cmd_merge_lora(lora_dir: Path) -> None:
    """LitGPT's own `merge_lora`: writes lora_dir/lit_model.pth."""
    from litgpt.scripts.merge_lora import merge_lora

    merge_lora(lora_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert-hf")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("model_config_yaml", type=Path)
    p = sub.add_parser("convert-lit")
    p.add_argument("lit_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p = sub.add_parser("make-lora")
    p.add_argument("base_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("r", type=int)
    p.add_argument("alpha", type=int)
    p.add_argument("enabled", help="comma list of query,key,value,projection,mlp,head")
    p.add_argument("seed", type=int)
    p = sub.add_parser("merge-lora")
    p.add_argument("lora_dir", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "convert-hf":
        cmd_convert_hf(args.hf_dir, args.out_dir, args.model_config_yaml)
    elif args.cmd == "convert-lit":
        cmd_convert_lit(args.lit_dir, args.out_dir)
    elif args.cmd == "make-lora":
        cmd_make_lora(args.base_dir, args.out_dir, args.r, args.alpha, args.enabled, args.seed)
    elif args.cmd == "merge-lora":
        cmd_merge_lora(args.lora_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
