"""MindFormers model configs (the `model:` block of its yaml) <-> Hugging Face config.json.

MindFormers runs Llama, Qwen2 (q/k/v biases) and Mixtral (moe_config) on one LlamaForCausalLM;
field names follow its `LlamaConfig`. The config.json written next to a checkpoint is what
weightport reads back; the yaml is for MindFormers users and is read when config.json is absent.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....errors import WeightportError
from ....hf_config import rope_scaling, rope_theta, set_rope
from .base import MS_DTYPE_NAMES

# non-weight records of MindFormers training checkpoints (CheckpointMonitor's append_dict)
TRAINING_STATE = frozenset({"global_step", "epoch_num", "step_num", "loss_scale", "scale_sense",
                            "global_batch_size", "current_iterator_step", "last_overflow_iterator_step"})


def to_mindformers(model: Model, dtype: torch.dtype, layout: str) -> dict:
    d, cfg = model.dims, model.config
    mc = {
        "type": "LlamaConfig",
        "batch_size": 1,
        "seq_length": cfg.get("max_position_embeddings", 4096),
        "hidden_size": d.hidden,
        "num_layers": d.n_layer,
        "num_heads": d.n_head,
        "n_kv_heads": d.n_kv if d.n_kv != d.n_head else None,
        "intermediate_size": d.intermediate,
        "vocab_size": d.vocab,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "theta": rope_theta(cfg),
        "max_position_embedding": cfg.get("max_position_embeddings", 4096),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "tie_word_embeddings": d.tied,
        "qkv_has_bias": model.arch.name == "qwen2",
        "qkv_concat": layout.startswith("fused"),
        "compute_dtype": MS_DTYPE_NAMES.get(dtype, "float32"),
        "param_init_type": MS_DTYPE_NAMES.get(dtype, "float32"),
    }
    scaling = rope_scaling(cfg)
    if scaling:
        if scaling.get("rope_type") != "llama3":
            raise WeightportError(f"MindFormers' Llama has no rope scaling of type {scaling.get('rope_type')!r}")
        mc["extend_method"] = "LLAMA3"
        mc["scaling_factor"] = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings") if k in scaling}
    model_block = {"model_config": mc, "arch": {"type": "LlamaForCausalLM"}}
    out = {"model": model_block, "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}
    if d.n_expert:
        mc["moe_config"] = {"expert_num": d.n_expert, "num_experts_chosen": cfg.get("num_experts_per_tok", 2),
                            "use_gmm": layout == "gmm"}
    return out


def from_mindformers(data: dict, where: str) -> dict:
    """A Hugging Face config dict from a MindFormers yaml's model.model_config."""
    try:
        mc = data["model"]["model_config"]
        heads = mc["num_heads"]
        cfg = {
            "hidden_size": mc["hidden_size"],
            "num_hidden_layers": mc["num_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": mc.get("n_kv_heads") or heads,
            "intermediate_size": mc["intermediate_size"],
            "vocab_size": mc["vocab_size"],
            "rms_norm_eps": mc.get("rms_norm_eps", 1e-6),
            "max_position_embeddings": mc.get("max_position_embedding") or mc.get("seq_length", 4096),
            "tie_word_embeddings": bool(mc.get("tie_word_embeddings", False)),
            "bos_token_id": mc.get("bos_token_id"),
            "eos_token_id": mc.get("eos_token_id"),
            "pad_token_id": mc.get("pad_token_id"),
        }
    except (KeyError, TypeError) as e:
        raise WeightportError(f"{where}: missing MindFormers model_config field {e}") from None
    if not cfg["intermediate_size"]:
        raise WeightportError(f"{where}: intermediate_size is not set (derived from multiple_of); "
                              "put the model's config.json beside the checkpoint")
    moe = mc.get("moe_config") or {}
    if moe.get("expert_num", 1) > 1:
        cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=moe["expert_num"],
                   num_experts_per_tok=moe.get("num_experts_chosen", 2))
    elif mc.get("qkv_has_bias"):
        cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    else:
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    scaling = None
    if mc.get("extend_method") == "LLAMA3":
        scaling = {"rope_type": "llama3", **(mc.get("scaling_factor") or {})}
    set_rope(cfg, float(mc.get("theta", 10000.0)), scaling)
    return cfg


def from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    """The config and, where the yaml settles it, the layout: fused files of MindFormers <= 1.3 and
    >= 1.5 share names and shapes and their yamls share `qkv_concat: true`, so that stays open."""
    cfg = from_mindformers(data, where)
    mc = data["model"]["model_config"]
    if (mc.get("moe_config") or {}).get("use_gmm"):
        return cfg, "gmm"
    return cfg, None if mc.get("qkv_concat") else "separate"
