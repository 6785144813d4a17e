"""MindFormers' DeepSeek-V2 names (research/deepseek2: DeepseekV2ForCausalLM, DeepseekV2Config).

Names follow MindFormers' research/deepseek2/convert_weight.py. It only renames and stacks: its
rotary embedding de-interleaves q_pe / k_pe inside the model as DeepSeek's own code does, so the
MLA weights keep the Hugging Face row order. Without q_lora_rank (V2-Lite) the converter maps
q_proj to attention.q_proj. Routed experts of a layer are stacked (experts, out, in).
Later research/deepseek2 models split l2q_proj, kv2l and lkv2kv into nope / pe parts and rotate
without de-interleaving; files for those are a different layout, not written here.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....errors import WeightportError
from ....hf_config import rope_scaling, rope_theta, set_rope
from ....ops import Stack
from ....rules import Rule, expand, renames
from .base import MS_DTYPE_NAMES, NameSet

LAYOUTS = {"separate": "every projection under its own name, routed experts stacked (experts, out, in) "
                       "(MindFormers' research/deepseek2 convert_weight)"}

L = "model.layers.{l}"
_ATTENTION = {"q_proj": "q_proj", "q_a_proj": "q2l_proj", "q_a_layernorm": "lq_norm", "q_b_proj": "l2q_proj",
              "kv_a_proj_with_mqa": "kv2l", "kv_a_layernorm": "lkv_norm", "kv_b_proj": "lkv2kv", "o_proj": "wo"}
_MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    d = model.dims
    out = renames({
        "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
        "lm_head.weight": "lm_head.weight",
        "model.norm.weight": "model.norm_out.weight",
        f"{L}.input_layernorm.weight": f"{L}.attention_norm.weight",
        f"{L}.post_attention_layernorm.weight": f"{L}.ffn_norm.weight",
        f"{L}.mlp.gate.weight": f"{L}.feed_forward.routed_experts.router.dense.weight",
        **{f"{L}.self_attn.{h}.weight": f"{L}.attention.{m}.weight" for h, m in _ATTENTION.items()},
        **{f"{L}.mlp.{h}.weight": f"{L}.feed_forward.{m}.weight" for h, m in _MLP.items()},
        **{f"{L}.mlp.shared_experts.{h}.weight": f"{L}.feed_forward.shared_experts.{m}.weight"
           for h, m in _MLP.items()},
    })
    for h, m in _MLP.items():
        experts = [f"{L}.mlp.experts.{e}.{h}.weight" for e in range(d.n_expert)]
        if experts:
            out.append(Rule(experts, f"{L}.feed_forward.routed_experts.ffn.{m}.weight", Stack(d.n_expert)))
    return expand(out, d.n_layer, 0, set(model.hub_tensors()))


# DeepSeek's named_parameters() order, the converter's stacked experts landing after the last expert
_LAYER_ORDER = [f"attention.{m}.weight" for m in _ATTENTION.values()] + [
    f"feed_forward.{m}.weight" for m in ("w1", "w3", "w2", "routed_experts.ffn.w1", "routed_experts.ffn.w2",
                                         "routed_experts.ffn.w3", "routed_experts.router.dense", "shared_experts.w1",
                                         "shared_experts.w3", "shared_experts.w2")] + [
    "attention_norm.weight", "ffn_norm.weight"]


def write_order(name: str, layout: str = "") -> tuple:
    """The order MindFormers' converter writes, so files can match byte for byte."""
    if name.startswith("model.layers."):
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        return (1, int(layer), _LAYER_ORDER.index(rest))
    return {"model.tok_embeddings.embedding_weight": (0,), "model.norm_out.weight": (2,)}.get(name, (3,))


def check(model: Model) -> None:
    cfg = model.config
    # MindFormers' MLA puts one qkv_has_bias on q2l/l2q/kv2l/lkv2kv and none on wo, which matches
    # no Hugging Face attention_bias setting; its feed-forward layers have no bias at all
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise WeightportError("MindFormers' DeepSeek-V2 has no attention / MLP biases matching "
                              "attention_bias / mlp_bias")
    if model.dims.tied:
        raise WeightportError("MindFormers' DeepSeek-V2 has no tied embeddings (tie_word_embeddings)")


def to_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    """The model block and moe_config of MindFormers' predict_deepseek2_236B.yaml, filled in."""
    d, cfg = model.dims, model.config
    ms_dtype = MS_DTYPE_NAMES.get(dtype, "float32")
    mc = {
        "type": "DeepseekV2Config",
        "batch_size": 1,
        "seq_length": cfg.get("max_position_embeddings", 4096),
        "hidden_size": d.hidden,
        "num_layers": d.n_layer,
        "num_heads": d.n_head,
        "n_kv_heads": d.n_kv,
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "intermediate_size": d.intermediate,
        "kv_lora_rank": cfg["kv_lora_rank"],
        "q_lora_rank": cfg.get("q_lora_rank"),
        "qk_rope_head_dim": cfg["qk_rope_head_dim"],
        "v_head_dim": cfg["v_head_dim"],
        "qk_nope_head_dim": cfg["qk_nope_head_dim"],
        "vocab_size": d.vocab,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "theta": rope_theta(cfg),
        "compute_dtype": ms_dtype,
        "param_init_type": ms_dtype,
        "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
        "rotary_dtype": "float32",
    }
    scaling = rope_scaling(cfg)
    if scaling:
        if scaling.get("rope_type") != "yarn":
            raise WeightportError(f"MindFormers' DeepSeek-V2 has no rope scaling of type {scaling.get('rope_type')!r}")
        mc["extend_method"] = "YARN"
        mc["scaling_factor"] = {k: scaling[k] for k in ("beta_fast", "beta_slow", "factor", "mscale", "mscale_all_dim",
                                                         "original_max_position_embeddings") if k in scaling}
    else:
        mc["extend_method"] = "None"
    moe = {
        "expert_num": d.n_expert,
        "num_experts_chosen": cfg.get("num_experts_per_tok"),
        "topk_method": cfg.get("topk_method", "greedy"),
        "shared_expert_num": cfg["n_shared_experts"],
        "routed_scaling_factor": cfg.get("routed_scaling_factor", 1.0),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob")),
        "first_k_dense_replace": cfg.get("first_k_dense_replace") or 0,
        "moe_intermediate_size": cfg["moe_intermediate_size"],
        "topk_group": cfg.get("topk_group"),
        "n_group": cfg.get("n_group"),
    }
    return {"model": {"model_config": mc, "arch": {"type": "DeepseekV2ForCausalLM"}}, "moe_config": moe,
            "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}


def from_yaml(data: dict, where: str) -> tuple[dict, str]:
    """A config.json dict from to_yaml's output or a MindFormers deepseek2 yaml (moe_config top level,
    as MindFormers' own yamls have it, or inside model_config)."""
    mc = data["model"]["model_config"]
    moe = data.get("moe_config") or mc.get("moe_config") or {}
    cfg = {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "hidden_act": "silu",
        "hidden_size": mc["hidden_size"], "num_hidden_layers": mc["num_layers"],
        # MLA expands keys and values per head; transformers needs them equal
        "num_attention_heads": mc["num_heads"], "num_key_value_heads": mc["num_heads"],
        "intermediate_size": mc["intermediate_size"], "vocab_size": mc["vocab_size"],
        "max_position_embeddings": mc.get("max_position_embeddings") or mc.get("seq_length", 4096),
        "rms_norm_eps": mc.get("rms_norm_eps", 1e-6), "tie_word_embeddings": False,
        "bos_token_id": mc.get("bos_token_id"), "eos_token_id": mc.get("eos_token_id"),
        "pad_token_id": mc.get("pad_token_id"),
        **{k: mc[k] for k in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim")},
        "n_routed_experts": moe["expert_num"], "num_experts_per_tok": moe.get("num_experts_chosen"),
        "n_shared_experts": moe["shared_expert_num"], "moe_intermediate_size": moe["moe_intermediate_size"],
        "first_k_dense_replace": moe.get("first_k_dense_replace", 0),
        "routed_scaling_factor": moe.get("routed_scaling_factor", 1.0), "topk_method": moe.get("topk_method", "greedy"),
        "n_group": moe.get("n_group"), "topk_group": moe.get("topk_group"),
        "norm_topk_prob": bool(moe.get("norm_topk_prob", False)),
    }
    # DeepseekV2Config's extend_method defaults to YARN
    yarn = mc.get("extend_method", "YARN") == "YARN" and mc.get("scaling_factor")
    set_rope(cfg, float(mc.get("theta", 10000.0)), {"rope_type": "yarn", **mc["scaling_factor"]} if yarn else None)
    return cfg, "separate"


NAMES = NameSet(
    title="DeepSeek-V2 / V2-Lite / V2.5",
    archs=("deepseek_v2",),
    keys=("deepseek2",),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_yaml,
    yaml_types=("DeepseekV2Config",), from_yaml=from_yaml,
)
