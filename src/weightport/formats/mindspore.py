"""MindSpore Transformers (MindFormers) checkpoints: a `.ckpt` with MindFormers parameter names.

Read and written without MindSpore (`io/ms_ckpt.py`). The names are those of MindFormers'
`LlamaForCausalLM`, which also runs Qwen2 (q/k/v biases) and Mixtral (stacked experts). Three
layouts of attention and MLP weights exist, and the fused two have identical shapes, so a wrong
guess loads and computes garbage: the layout is a documented option, recorded on write and
detected on read (see LAYOUTS).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..archs import Model, model_from_hf_config
from ..errors import WeightportError
from ..hf_config import load_json
from ..io import open_files
from ..io.ms_ckpt import MsCkptWriter
from ..ops import Chain, Concat, GroupInterleave, Stack, Tie
from ..rules import Rule, expand, rename
from .base import Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions, find_side_files, write_hf_sidecar
from .mindformers_config import TRAINING_STATE, from_mindformers, to_mindformers

WEIGHTS = "model.ckpt"
YAML = "mindformers.yaml"

# name -> what it means; the first is the default on write
LAYOUTS = {
    "separate": "wq/wk/wv and w1/w3 stored separately (MindFormers' convert_weight default)",
    "fused": "w_qkv = cat(wq, wk, wv), w_gate_hidden = cat(w1, w3) (qkv_concat, MindFormers <= 1.3)",
    "fused-interleaved": "w_qkv grouped per kv head [q.., k, v], w_gate_hidden rows alternating gate/up "
                         "(qkv_concat, MindFormers >= 1.5)",
}

L = "model.layers.{l}"


def mindspore_rules(model: Model, layout: str, tied_head_stored: bool = True) -> list[Rule]:
    """hub -> MindFormers rules. MindFormers' converter saves lm_head even when tied (from
    state_dict()), so we write it too; a tied checkpoint without it reads as well."""
    d = model.dims
    qkv = (d.q_rows, d.kv_rows, d.kv_rows)
    gate_up = (d.intermediate, d.intermediate)
    rules = [
        Rule("model.embed_tokens.weight", ("model.tok_embeddings.embedding_weight", "lm_head.weight"), Tie())
        if d.tied and tied_head_stored else rename("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
        rename("lm_head.weight", "lm_head.weight"),
        rename("model.norm.weight", "model.norm_out.weight"),
        rename(f"{L}.input_layernorm.weight", f"{L}.attention_norm.weight"),
        rename(f"{L}.post_attention_layernorm.weight", f"{L}.ffn_norm.weight"),
        rename(f"{L}.self_attn.o_proj.weight", f"{L}.attention.wo.weight"),
        rename(f"{L}.block_sparse_moe.gate.weight", f"{L}.feed_forward.router.dense.weight"),
    ]
    if layout == "separate":
        for p in "qkv":
            rules += [rename(f"{L}.self_attn.{p}_proj.{w}", f"{L}.attention.w{p}.{w}") for w in ("weight", "bias")]
        rules += [rename(f"{L}.mlp.gate_proj.weight", f"{L}.feed_forward.w1.weight"),
                  rename(f"{L}.mlp.up_proj.weight", f"{L}.feed_forward.w3.weight")]
    else:
        interleaved = layout == "fused-interleaved"
        fuse_qkv = Chain((Concat(qkv), GroupInterleave(qkv, d.n_kv))) if interleaved else Concat(qkv)
        fuse_mlp = Chain((Concat(gate_up), GroupInterleave(gate_up, d.intermediate))) if interleaved else Concat(gate_up)
        rules += [Rule([f"{L}.self_attn.{p}_proj.{w}" for p in "qkv"], f"{L}.attention.w_qkv.{w}", fuse_qkv)
                  for w in ("weight", "bias")]
        rules.append(Rule([f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"],
                          f"{L}.feed_forward.w_gate_hidden.weight", fuse_mlp))
    rules.append(rename(f"{L}.mlp.down_proj.weight", f"{L}.feed_forward.w2.weight"))
    # MindFormers stacks the experts of a layer into one (experts, out, in) tensor per matrix
    for hf, ms in (("w1", "w1"), ("w2", "w2"), ("w3", "w3")):
        experts = [f"{L}.block_sparse_moe.experts.{e}.{hf}.weight" for e in range(d.n_expert)]
        if experts:
            rules.append(Rule(experts, f"{L}.feed_forward.ffn.{ms}.weight", Stack(d.n_expert)))
    return expand(rules, d.n_layer, 0, set(model.hub_tensors()))


_LAYER_ORDER = [f"{p}.{w}" for p in ("attention.wq", "attention.wk", "attention.wv", "attention.w_qkv")
                for w in ("weight", "bias")] + [
    "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w_gate_hidden.weight",
    "feed_forward.w2.weight", "feed_forward.router.dense.weight", "feed_forward.ffn.w1.weight",
    "feed_forward.ffn.w2.weight", "feed_forward.ffn.w3.weight", "attention_norm.weight", "ffn_norm.weight"]


def _write_order(name: str) -> tuple:
    if name.startswith("model.layers."):
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        return (1, int(layer), _LAYER_ORDER.index(rest))
    return {"model.tok_embeddings.embedding_weight": (0,), "model.norm_out.weight": (2,)}.get(name, (3,))


def _fused_names(names) -> bool:
    return any(n.endswith((".attention.w_qkv.weight", ".feed_forward.w_gate_hidden.weight")) for n in names)


def _find(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.ckpt"))
    if len(found) != 1:
        raise WeightportError(f"{path}: expected one .ckpt file, found {len(found)}")
    return found[0]


def _check_representable(model: Model) -> None:
    d, cfg = model.dims, model.config
    if d.head_dim * d.n_head != d.hidden:
        raise WeightportError(f"MindFormers' Llama derives head_dim as hidden_size / num_heads = "
                              f"{d.hidden // d.n_head}, but this model's head_dim is {d.head_dim}")
    if model.arch.name not in ("llama", "qwen2", "mixtral"):
        raise WeightportError(f"format mindspore does not support {model.arch.name}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise WeightportError("MindFormers' Llama has no o_proj / MLP biases (attention_bias / mlp_bias)")


class MindSporeFormat(Format):
    name = "mindspore"
    title = "MindSpore Transformers / MindFormers (.ckpt, MindFormers names; layouts: " + ", ".join(LAYOUTS) + ")"
    archs = ("llama", "qwen2", "mixtral")
    layouts = tuple(LAYOUTS)

    def detect(self, path: Path) -> bool:
        return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and any(path.glob("*.ckpt")))

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        weights = _find(path)
        directory = weights.parent
        source = open_files([weights])
        try:
            model, recorded, notes = _read_config(directory)
            names = source.tensors
            if _fused_names(names):
                chosen = layout or recorded or "fused-interleaved"
                if chosen == "separate":
                    raise WeightportError(f"{weights}: holds fused w_qkv / w_gate_hidden, so its layout is "
                                          "fused or fused-interleaved, not separate")
                if not layout and not recorded:
                    notes.append("fused layout not recorded; read as fused-interleaved (MindFormers >= 1.5); "
                                 "pass --from-layout fused for checkpoints of MindFormers <= 1.3")
            else:
                if layout and layout != "separate":
                    raise WeightportError(f"{weights}: has no fused w_qkv / w_gate_hidden, so its layout is separate")
                chosen = "separate"
            rules = mindspore_rules(model, chosen, tied_head_stored="lm_head.weight" in names)
            claimed = {n for r in rules for n in r.fmt}
            dropped = {n: "training state, not a weight" for n in names
                       if n not in claimed and (n in TRAINING_STATE or n.startswith(("adam_m.", "adam_v.", "accu_grads.")))}
            notes += [f"not a tensor, skipped: {n} ({why})" for n, why in source.skipped.items()]
            return Checkpoint(path=path, format=self, variant=f".ckpt, {chosen} layout", model=model, source=source,
                              rules=rules, side_files=find_side_files(directory),
                              generation_config=_generation(directory), notes=notes, dropped=dropped)
        except BaseException:
            source.close()
            raise

    def target_rules(self, model: Model, layout: str | None = None) -> list[Rule]:
        _check_representable(model)
        # in the order MindFormers' converter writes (the HF state_dict's), so files can match byte for byte
        return sorted(mindspore_rules(model, layout or "separate"), key=lambda r: _write_order(r.fmt[0]))

    def layout(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        return [OutputFile(WEIGHTS, tensors)]

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        return _CkptWriter(directory / WEIGHTS)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       layout: str | None = None) -> list[str]:
        layout = layout or "separate"
        with open(directory / YAML, "w", encoding="utf-8") as f:
            yaml.safe_dump(to_mindformers(model, dtype, layout), f, sort_keys=False)
        return [YAML] + write_hf_sidecar(directory, source, model)


def _generation(directory: Path) -> dict | None:
    path = directory / "generation_config.json"
    return load_json(path) if path.is_file() else None


def _read_config(directory: Path) -> tuple[Model, str | None, list[str]]:
    """The model from config.json (exact) or a MindFormers yaml, and the layout either records."""
    recorded = None
    yaml_path = directory / YAML
    if not yaml_path.is_file():
        candidates = sorted(directory.glob("*.yaml"))
        yaml_path = candidates[0] if len(candidates) == 1 else None
    mf = None
    if yaml_path is not None:
        try:
            with open(yaml_path, encoding="utf-8") as f:
                mf = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise WeightportError(f"{yaml_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(mf, dict):
            raise WeightportError(f"{yaml_path}: expected a MindFormers config mapping")
        recorded = (mf.get("weightport") or {}).get("layout")
    config_path = directory / "config.json"
    if config_path.is_file():
        return model_from_hf_config(load_json(config_path), str(config_path)), recorded, []
    if mf is None:
        raise WeightportError(f"{directory}: no config.json or MindFormers yaml next to the checkpoint; "
                              "put the model's Hugging Face config.json beside it")
    hf = from_mindformers(mf, str(yaml_path))
    return model_from_hf_config(hf, str(yaml_path)), recorded, [f"config from {yaml_path.name}"]


class _CkptWriter(Writer):
    def __init__(self, path: Path):
        self._ckpt = MsCkptWriter(path)

    def write_group(self, names, tensors):
        for name, t in zip(names, tensors):
            self._ckpt.write(name, t)

    def write_chunks(self, name, shape, dtype, chunks):
        self._ckpt.write_chunks(name, shape, dtype, chunks)

    def close(self):
        self._ckpt.close()

    def abort(self):
        self._ckpt.abort()


FORMAT = MindSporeFormat()
