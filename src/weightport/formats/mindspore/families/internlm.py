"""MindFormers' names for InternLM (`--model internlm`, research/internlm) and InternLM2
(`--model internlm2`, research/internlm2): MindFormers' Llama names, on their own model classes.

InternLM keeps q, k, v and o separate, each with a bias when `has_bias` (Hugging Face `bias`).
InternLM2 stores wqkv as `attention.w`, rows still grouped per kv head as Hugging Face has them,
which is what InternLM2Attention slices when `qkv_concat` (its default, and every shipped yaml's);
with `qkv_concat: false` its converter splits the groups into wq, wk and wv. The two layouts
have different names, so a file says which it is.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....errors import WeightportError
from ....hf_config import rope_scaling, rope_theta
from ....ops import Chain, GroupInterleave, Invert, Split, Tie
from ....rules import Rule, expand, rename, renames
from .base import MS_DTYPE_NAMES, NameSet

L = "model.layers.{l}"
_TOP_ORDER = ["model.tok_embeddings.embedding_weight", "model.norm_out.weight", "lm_head.weight"]


def _embedding(model: Model, embed: str, stored: set[str] | None) -> Rule:
    """MindFormers' causal LMs always have an lm_head; a tied model's is the embedding, written twice
    (as MindFormers' Llama converter does) and read back from either."""
    target = "model.tok_embeddings.embedding_weight"
    if model.dims.tied and (stored is None or "lm_head.weight" in stored):
        return Rule(embed, (target, "lm_head.weight"), Tie())
    return rename(embed, target)


def _order(layer_order: list[str]):
    def write_order(name: str, layout: str) -> tuple:
        """The converter's: the state_dict() (InternLM) or named_parameters() (InternLM2) order."""
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            return (1, int(layer), layer_order.index(rest))
        return (0 if name == _TOP_ORDER[0] else 2, _TOP_ORDER.index(name))
    return write_order


def _yaml(model: Model, dtype: torch.dtype, layout: str, kind: str, extra: dict) -> dict:
    d, cfg = model.dims, model.config
    seq = cfg.get("max_position_embeddings", 2048)
    mc = {"type": f"{kind}Config", "batch_size": 1, "seq_length": seq, "hidden_size": d.hidden,
          "num_layers": d.n_layer, "num_heads": d.n_head, "n_kv_heads": d.n_kv, "vocab_size": d.vocab,
          "intermediate_size": d.intermediate, "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
          "max_position_embedding": seq, "bos_token_id": cfg.get("bos_token_id"),
          "eos_token_id": cfg.get("eos_token_id"), "pad_token_id": cfg.get("pad_token_id"), **extra,
          "compute_dtype": MS_DTYPE_NAMES.get(dtype, "float32"),
          "param_init_type": MS_DTYPE_NAMES.get(dtype, "float32")}
    return {"model": {"model_config": mc, "arch": {"type": f"{kind}ForCausalLM"}},
            "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}


def _config(mc: dict, model_type: str, arch: str) -> dict:
    heads = mc["num_heads"]
    return {"model_type": model_type, "architectures": [arch], "hidden_size": mc["hidden_size"],
            "num_hidden_layers": mc["num_layers"], "num_attention_heads": heads,
            "intermediate_size": mc["intermediate_size"],
            "vocab_size": mc["vocab_size"], "rms_norm_eps": mc.get("rms_norm_eps", 1e-6), "hidden_act": "silu",
            "max_position_embeddings": mc.get("max_position_embedding") or mc.get("seq_length", 2048),
            "bos_token_id": mc.get("bos_token_id"), "eos_token_id": mc.get("eos_token_id"),
            "pad_token_id": mc.get("pad_token_id"), "tie_word_embeddings": False}


# ---- InternLM (1)

_INTERNLM_LAYER = [f"attention.w{p}.{w}" for p in "qkvo" for w in ("weight", "bias")] + [
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight",
    "ffn_norm.weight"]


def internlm_rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    d = model.dims
    out = [_embedding(model, "model.embed_tokens.weight", stored),
           rename("lm_head.weight", "lm_head.weight"), rename("model.norm.weight", "model.norm_out.weight")]
    out += [rename(f"{L}.self_attn.{p}_proj.{w}", f"{L}.attention.w{p}.{w}")
            for p in "qkvo" for w in ("weight", "bias")]
    out += renames({f"{L}.mlp.gate_proj.weight": f"{L}.feed_forward.w1.weight",
                    f"{L}.mlp.down_proj.weight": f"{L}.feed_forward.w2.weight",
                    f"{L}.mlp.up_proj.weight": f"{L}.feed_forward.w3.weight",
                    f"{L}.input_layernorm.weight": f"{L}.attention_norm.weight",
                    f"{L}.post_attention_layernorm.weight": f"{L}.ffn_norm.weight"})
    return expand(out, d.n_layer, 0, set(model.hub_tensors()))


def _internlm_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    base = (model.config.get("rotary") or {}).get("base", 10000.0)
    return _yaml(model, dtype, layout, "InternLM",
                 {"theta": float(base), "has_bias": bool(model.config.get("bias", True))})


def _internlm_from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    mc = data["model"]["model_config"]
    cfg = _config(mc, "internlm", "InternLMForCausalLM")
    # the Hub's InternLM configs say "dynamic": NTK that starts past max_position_embeddings, where
    # MindFormers' InternLM (extend_method "None") is not run
    cfg.update(bias=bool(mc.get("has_bias", True)), rotary={"base": float(mc.get("theta", 10000.0)), "type": "dynamic"})
    return cfg, "separate"


INTERNLM = NameSet(
    title="InternLM (1)",
    archs=("internlm",), keys=("internlm",),
    layouts={"separate": "wq/wk/wv/wo with their biases, MLP w1/w2/w3 (what MindFormers' internlm converter writes)"},
    rules=internlm_rules, write_order=_order(_INTERNLM_LAYER), check=lambda model: None, to_yaml=_internlm_yaml,
    yaml_types=("InternLMConfig",), from_yaml=_internlm_from_yaml,
)


# ---- InternLM2

_INTERNLM2_LAYER = ["attention.w.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
                    "attention_norm.weight", "ffn_norm.weight"]
# named as the Llama layout whose w_qkv has the same per-kv-group rows, so `--qkv_concat True` means it
INTERNLM2_LAYOUTS = {
    "fused-interleaved": "wqkv kept as attention.w, rows grouped per kv head [q.., k, v] (qkv_concat, "
                         "InternLM2Config's default); MLP w1/w3/w2",
    "separate": "wqkv split into wq/wk/wv (qkv_concat: false); MLP w1/w3/w2",
}


def internlm2_rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    d = model.dims
    qkv = (d.q_rows, d.kv_rows, d.kv_rows)
    wqkv = f"{L}.attention.wqkv.weight"
    split = Chain((Invert(GroupInterleave(qkv, d.n_kv)), Split(qkv)))
    out = [_embedding(model, "model.tok_embeddings.weight", stored),
           rename("output.weight", "lm_head.weight"), rename("model.norm.weight", "model.norm_out.weight"),
           Rule(wqkv, f"{L}.attention.w.weight") if layout == "fused-interleaved" else
           Rule(wqkv, [f"{L}.attention.w{p}.weight" for p in "qkv"], split)]
    out += [rename(f"{L}.{m}.weight", f"{L}.{m}.weight") for m in ("attention.wo", "feed_forward.w1", "feed_forward.w3",
                                                                 "feed_forward.w2", "attention_norm", "ffn_norm")]
    return expand(out, d.n_layer, 0, set(model.hub_tensors()))


def _internlm2_check(model: Model) -> None:
    if model.config.get("bias"):
        raise WeightportError("MindFormers' InternLM2 has no wqkv / wo biases (this config has bias: true)")


def _internlm2_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    extra = {"theta": rope_theta(model.config), "qkv_concat": layout == "fused-interleaved"}
    scaling = rope_scaling(model.config) or {}
    # dynamic NTK changes nothing up to max_position_embeddings, where MindFormers' "None" stops too
    if scaling.get("rope_type") == "linear":
        extra.update(extend_method="PI", scaling_factor=float(scaling["factor"]))
    return _yaml(model, dtype, layout, "InternLM2", extra)


def _internlm2_from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    mc = data["model"]["model_config"]
    cfg = _config(mc, "internlm2", "InternLM2ForCausalLM")
    cfg.update(num_key_value_heads=mc.get("n_kv_heads") or mc["num_heads"], bias=False,
               rope_theta=float(mc.get("theta", 1000000.0)),  # InternLM2Config's default
               rope_scaling={"type": "linear", "factor": float(mc.get("scaling_factor", 1.0))}
               if mc.get("extend_method") == "PI" else None)
    return cfg, "fused-interleaved" if mc.get("qkv_concat", True) else "separate"


INTERNLM2 = NameSet(
    title="InternLM2 / 2.5",
    archs=("internlm2",), keys=("internlm2",),
    layouts=INTERNLM2_LAYOUTS, rules=internlm2_rules, write_order=_order(_INTERNLM2_LAYER), check=_internlm2_check,
    to_yaml=_internlm2_yaml, yaml_types=("InternLM2Config",), from_yaml=_internlm2_from_yaml,
)
