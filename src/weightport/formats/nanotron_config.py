"""Nanotron `LlamaConfig` (model_config.json, config.yaml) <-> Hugging Face Llama config.json.

Nanotron parses its configs with dacite strict=True, so we write exactly the fields of its
LlamaConfig (those of the kisate fork, which upstream also accepts) and refuse keys we do not
know on reading rather than guess what they change.
"""

from __future__ import annotations

from ..archs import Model
from ..errors import WeightportError
from ..hf_config import rope_scaling, rope_theta, set_rope

# the fork's LlamaConfig fields (CHECKPOINT_VERSION 1.4)
FIELDS = ("bos_token_id", "eos_token_id", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
          "is_llama_config", "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
          "num_key_value_heads", "pad_token_id", "pretraining_tp", "rms_norm_eps", "rope_scaling", "rope_theta",
          "rope_interleaved", "tie_word_embeddings", "use_cache", "vocab_size")
# upstream-only fields that do not change the weights' meaning (attention_bias is checked)
UPSTREAM_ONLY = ("attention_bias", "_attn_implementation", "z_loss_enabled", "z_loss_coefficient", "use_qk_norm")
REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
HF_DEFAULTS = {"bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
               "max_position_embeddings": 2048, "pretraining_tp": 1, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": False, "use_cache": True}


def check_representable(model: Model, allow_approximate: bool = False) -> list[str]:
    """Refuse what Nanotron's Llama would compute differently, saying what would change; with
    `allow_approximate`, what can be dropped at a cost is returned as warnings instead."""
    cfg, d = model.config, model.dims
    where = "Nanotron's Llama"
    if d.head_dim * d.n_head != d.hidden:
        raise WeightportError(f"head_dim {d.head_dim} != hidden_size {d.hidden} / num_attention_heads {d.n_head}: "
                              f"{where} always uses hidden_size / num_attention_heads, so attention would change")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise WeightportError(f"{key}=true: {where} has no bias parameters, so the bias tensors would be lost")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise WeightportError(f"partial_rotary_factor {cfg['partial_rotary_factor']}: {where} rotates whole heads")
    warnings = []
    scaling = rope_scaling(cfg)
    if scaling:
        what = (f"rope scaling {scaling.get('rope_type') or scaling.get('type')!r}: {where} stores rope_scaling but "
                "never applies it, so every position's rotary frequencies would change")
        if not allow_approximate:
            raise WeightportError(what + "; pass --allow-approximate to convert without it")
        warnings.append(what + " (converted without it: --allow-approximate)")
    return warnings


def to_nanotron(model: Model, interleaved: bool, allow_approximate: bool = False) -> dict:
    check_representable(model, allow_approximate)
    cfg, d = model.config, model.dims
    out = {k: cfg.get(k, HF_DEFAULTS.get(k)) for k in FIELDS}
    out.update(hidden_size=d.hidden, intermediate_size=d.intermediate, num_attention_heads=d.n_head,
               num_hidden_layers=d.n_layer, num_key_value_heads=d.n_kv, vocab_size=d.vocab, tie_word_embeddings=d.tied,
               is_llama_config=True, rope_scaling=None, rope_theta=rope_theta(cfg), rope_interleaved=interleaved,
               # as Nanotron's own converters do: it becomes the embedding's padding_idx
               pad_token_id=None)
    return out


def to_hf(nt: dict, where: str) -> tuple[dict, bool | None, list[str]]:
    """(HF config.json, rope_interleaved or None when not recorded, notes) for a Nanotron LlamaConfig."""
    if not isinstance(nt, dict):
        raise WeightportError(f"{where}: expected a mapping of LlamaConfig fields")
    unknown = sorted(set(nt) - set(FIELDS) - set(UPSTREAM_ONLY))
    if unknown:
        raise WeightportError(f"{where}: unknown LlamaConfig key {unknown[0]!r} (Nanotron itself would refuse it); "
                              "only Llama checkpoints are supported")
    missing = [k for k in REQUIRED if nt.get(k) is None]
    if missing:
        raise WeightportError(f"{where}: missing field {missing[0]!r}")
    if nt.get("attention_bias"):
        raise WeightportError(f"{where}: attention_bias=true is not supported")
    if nt.get("is_llama_config") is False:
        raise WeightportError(f"{where}: is_llama_config is false; not a Llama config")
    notes = []
    heads = nt["num_attention_heads"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           **{k: nt.get(k, HF_DEFAULTS.get(k)) for k in HF_DEFAULTS},
           "hidden_size": nt["hidden_size"], "intermediate_size": nt["intermediate_size"],
           "num_attention_heads": heads, "num_hidden_layers": nt["num_hidden_layers"],
           "num_key_value_heads": nt.get("num_key_value_heads") or heads, "vocab_size": nt["vocab_size"],
           "head_dim": nt["hidden_size"] // heads, "pad_token_id": nt.get("pad_token_id"),
           "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
    if nt.get("rope_scaling"):
        notes.append(f"{where}: rope_scaling {nt['rope_scaling']} is stored but Nanotron never applies it; "
                     "left out of config.json so the model computes what Nanotron computed")
    set_rope(cfg, float(nt.get("rope_theta", 10000.0)), None)
    interleaved = nt.get("rope_interleaved")
    return cfg, None if interleaved is None else bool(interleaved), notes


def yaml_config(model_config: dict, tp: int, pp: int, dtype: str, init_path: str, tokenizer: str | None) -> dict:
    """The full Nanotron Config a converted checkpoint carries (as Nanotron's tools write it)."""
    return {
        "general": {"benchmark_csv_path": None, "consumed_train_samples": None, "ignore_sanity_checks": True,
                    "project": "weightport", "run": "converted", "seed": 42, "step": None},
        "parallelism": {"dp": 1, "expert_parallel_size": 1, "pp": pp, "pp_engine": "1f1b", "tp": tp,
                        "tp_linear_async_communication": False, "tp_mode": "ALL_REDUCE"},
        "model": {"ddp_bucket_cap_mb": 25, "dtype": dtype, "init_method": {"path": init_path},
                  "make_vocab_size_divisible_by": 1, "model_config": model_config},
        "tokenizer": {"tokenizer_max_length": None, "tokenizer_name_or_path": tokenizer, "tokenizer_revision": None},
        **{k: None for k in ("checkpoints", "data_stages", "lighteval", "logging", "optimizer", "profiler", "tokens")},
    }


def checkpoint_metadata(tp: int, version: str) -> dict:
    stage = {"consumed_train_samples": 0, "name": "Empty", "start_training_step": 0}
    return {"custom_metas": None, "dp": 1, "tp": tp, "version": version,
            "metas": {"consumed_train_samples": 0, "data_stages": [stage], "last_stage_idx": None,
                      "last_train_step": 0}}
