"""Config level: the settings that change what a model computes, compared after reading both
configs the hub's way. Equal tensors with a lost rope_theta still make a different model."""

from __future__ import annotations

from dataclasses import asdict

from ..archs import Model
from ..hf_config import partial_rotary_factor, rope_scaling, rope_theta

# what the forward pass depends on, besides the sizes in Dims
FUNCTION_KEYS = (
    "model_type", "hidden_act", "hidden_activation", "rms_norm_eps", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "num_experts_per_tok",
    "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar",
    # DeepSeek-V2: latent attention sizes and routing
    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_routed_experts",
    "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq", "routed_scaling_factor",
    "topk_method", "n_group", "topk_group", "norm_topk_prob",
    # GPT-2
    "activation_function", "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    # InternLM / InternLM2: one switch for the q, k, v, o biases; InternLM's rotary base and kind
    "bias", "rotary",
    # Qwen (first generation): its rotary and long-context settings (seq_length is where logn
    # scaling and dynamic NTK start) and Qwen-VL's vision encoder
    "rotary_emb_base", "rotary_pct", "use_dynamic_ntk", "use_logn_attn", "seq_length", "visual",
    # Whisper: Dims hold the decoder; the encoder's heads and the embedding scale change no shapes
    "encoder_attention_heads", "scale_embedding",
)


def _settings(model: Model) -> dict:
    cfg = model.config
    out = {f"dims.{k}": v for k, v in asdict(model.dims).items()}
    out["rope_theta"] = rope_theta(cfg)
    out["rope_scaling"] = rope_scaling(cfg)
    out["partial_rotary_factor"] = partial_rotary_factor(cfg)
    for key in FUNCTION_KEYS:
        out[key] = cfg.get(key)
    if not (cfg.get("use_sliding_window", True)) and model.arch.name == "qwen2":
        out["sliding_window"] = None  # Qwen2 ignores the window unless it is switched on
    return out


def _same(x, y) -> bool:
    # an absent flag and a false one mean the same to transformers
    if x in (None, False) and y in (None, False):
        return True
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1.0)
    return x == y


def compare_configs(a: Model, b: Model) -> list[dict]:
    sa, sb = _settings(a), _settings(b)
    return [{"key": k, "a": sa[k], "b": sb[k]} for k in sa if not _same(sa[k], sb[k])]
