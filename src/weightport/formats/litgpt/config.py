"""LitGPT `model_config.yaml` <-> Hugging Face `config.json`, for the Llama family.

LitGPT builds a model from every field of its Config dataclass and falls back to Pythia-style
defaults for missing ones, so the yaml we write spells out every field (as LitGPT's own
`save_config` does). LitGPT also branches on `name` ("Gemma" in the name turns on the RMSNorm
unit offset; its converters dispatch on name prefixes), so the name we write carries the
prefix LitGPT expects for the architecture.
"""

from __future__ import annotations

from ...archs import ARCHS, Model
from ...archs.llama_family import NAMES as LLAMA_FAMILY
from ...errors import WeightportError
from ...hf_config import partial_rotary_factor, rope_scaling, rope_theta, set_rope

# every field of litgpt.Config (v0.5.13), with its default
LITGPT_DEFAULTS: dict = {
    "name": "", "hf_config": {}, "block_size": 4096, "n_layer": 16, "n_embd": 4096, "vocab_size": 50254,
    "padding_multiple": 512, "padded_vocab_size": None, "norm_class_name": "LayerNorm", "norm_eps": 1e-5,
    "norm_qk": False, "norm_qk_type": "default", "post_attention_norm": False, "post_mlp_norm": False,
    "parallel_residual": True, "shared_attention_norm": False, "n_head": 32, "head_size": None,
    "n_query_groups": None, "attn_bias": False, "attention_scores_scalar": None, "sliding_window_size": None,
    "sliding_window_indices": None, "attention_logit_softcapping": None, "rope_base": 10000,
    "rotary_percentage": 0.25, "rope_condense_ratio": 1, "rope_adjustments": None, "rope_interleave": False,
    "intermediate_size": None, "moe_intermediate_size": None, "bias": True, "mlp_class_name": "GptNeoxMLP",
    "gelu_approximate": "none", "n_expert": 0, "n_shared_expert": None, "n_expert_groups": None,
    "n_topk_groups": None, "n_topk_scores_per_group": None, "n_expert_per_token": 0,
    "first_k_dense_replace": None, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "scale_embeddings": False, "lm_head_bias": False, "final_logit_softcapping": None, "norm_1": True,
    "norm_2": True, "latent_attention": None, "rope_local_base_freq": None, "rope_indices": None,
}

# the name prefix LitGPT's own code keys on for each architecture
NAME_PREFIX = {"llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral", "qwen2": "Qwen2.5",
               "phi3": "Phi-3", "gemma": "Gemma"}
# name prefixes (lower case) that send LitGPT's converters down another model's path
_OTHER_PATHS = ("gemma-2", "gemma-3", "phi", "qwen2.5", "qwq", "olmo-2-", "qwen3")


def _name_fits(arch: str, name: str) -> bool:
    """Whether LitGPT, keying on `name`, treats the model as `arch` (see litgpt.md §4)."""
    low = name.lower()
    if arch == "qwen2":
        return low.startswith(("qwen2.5", "qwq"))
    if arch == "phi3":
        return name.startswith("Phi-3")
    if arch == "gemma":  # "Gemma" turns on the (1 + w) RMSNorm; Gemma-2/3 prefixes pick other copiers
        return "Gemma" in name and not low.startswith(("gemma-2", "gemma-3"))
    return not (low.startswith(_OTHER_PATHS) or "falcon" in low or "Gemma" in name or "OLMo" in name)

# pre-0.3 lit-gpt spellings, read from lit_config.json
LEGACY_KEYS = {"_norm_class": "norm_class_name", "_mlp_class": "mlp_class_name", "condense_ratio": "rope_condense_ratio"}


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def to_litgpt(model: Model) -> dict:
    """The LitGPT config that computes the same function as this Hugging Face model."""
    cfg, d, arch = model.config, model.dims, model.arch.name
    where = f"config for {arch}"
    out = dict(LITGPT_DEFAULTS)
    repo = str(cfg.get("_name_or_path") or "").rstrip("/")
    base = repo.rsplit("/", 1)[-1]
    out["name"] = base if base and _name_fits(arch, base) else f"{NAME_PREFIX[arch]}-{base or 'weightport'}"
    if "/" in repo and not repo.startswith(("/", ".")):
        out["hf_config"] = {"org": repo.split("/")[0], "name": base}
    out.update(
        block_size=cfg.get("max_position_embeddings", 4096), n_layer=d.n_layer, n_embd=d.hidden,
        vocab_size=d.vocab, padded_vocab_size=d.vocab, norm_class_name="RMSNorm",
        norm_eps=cfg.get("rms_norm_eps", 1e-6), parallel_residual=False, n_head=d.n_head,
        head_size=d.head_dim, n_query_groups=d.n_kv, intermediate_size=d.intermediate, bias=False,
        rope_base=_number(rope_theta(cfg)), rotary_percentage=partial_rotary_factor(cfg),
        mlp_class_name="LLaMAMLP",
    )
    if arch == "llama":
        attn_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
        if attn_bias != mlp_bias:
            raise WeightportError(
                f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} has no LitGPT equivalent "
                "(LitGPT's `bias` covers the attention output and the MLP together)")
        out.update(attn_bias=attn_bias, bias=attn_bias)
    if arch == "qwen2":
        out["attn_bias"] = True
    if arch == "mixtral":
        out.update(mlp_class_name="LLaMAMoE", n_expert=d.n_expert, n_expert_per_token=cfg["num_experts_per_tok"])
    if arch == "gemma":
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "gelu_pytorch_tanh")
        out.update(mlp_class_name="GemmaMLP", scale_embeddings=True,
                   gelu_approximate="tanh" if act in ("gelu_pytorch_tanh", "gelu_tanh") else "none")
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True):
        kinds = cfg.get("layer_types")
        if kinds is None and arch == "qwen2":  # transformers derives Qwen2's per-layer kinds like this
            kinds = ["sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
                     for i in range(d.n_layer)]
        indices = [int(k == "sliding_attention") for k in kinds] if kinds else [1] * d.n_layer
        out.update(sliding_window_size=window, sliding_window_indices=indices)
    scaling = rope_scaling(cfg)
    if scaling:
        kind = scaling.get("rope_type")
        if kind == "llama3":
            out["rope_adjustments"] = {
                "factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
                "high_freq_factor": scaling["high_freq_factor"],
                "original_max_seq_len": scaling["original_max_position_embeddings"]}
        elif kind == "linear":
            out["rope_condense_ratio"] = _number(scaling["factor"])
        else:
            raise WeightportError(f"{where}: rope scaling type {kind!r} has no LitGPT equivalent")
    return out


def arch_of_litgpt(lit: dict) -> str:
    name = str(lit.get("name", ""))
    mlp = lit.get("mlp_class_name")
    if mlp == "LLaMAMoE":
        return "mixtral"
    if mlp == "GemmaMLP" or "gemma" in name.lower():
        return "gemma"
    if mlp != "LLaMAMLP" or lit.get("norm_class_name") != "RMSNorm" or lit.get("parallel_residual", True):
        raise WeightportError(
            f"LitGPT config {name!r} (mlp_class_name={mlp}, norm_class_name={lit.get('norm_class_name')}) "
            "is not a Llama-family model; supported: " + ", ".join(LLAMA_FAMILY))
    if name.lower().startswith("phi-3"):
        return "phi3"
    if lit.get("attn_bias") and not lit.get("bias"):
        return "qwen2"
    if name.lower().startswith("mistral") or lit.get("sliding_window_size"):
        return "mistral"
    return "llama"


def to_hf(lit: dict, tied: bool, generation: dict | None = None) -> dict:
    """A Hugging Face config.json for the model a LitGPT config describes.

    LitGPT keeps no special token ids; they come from generation_config.json when there is
    one, and are otherwise written as null rather than left to transformers' per-model
    defaults (Phi-3's default pad id 32000 is out of range for smaller vocabularies).
    """
    lit = {LEGACY_KEYS.get(k, k): v for k, v in lit.items()}
    arch = ARCHS[arch_of_litgpt(lit)]
    n_embd, n_head = lit["n_embd"], lit["n_head"]
    head = lit.get("head_size") or n_embd // n_head
    vocab = lit.get("padded_vocab_size") or lit["vocab_size"]
    cfg = {
        "architectures": [arch.hf_class], "model_type": arch.model_type, "hidden_size": n_embd,
        "intermediate_size": lit["intermediate_size"], "num_hidden_layers": lit["n_layer"],
        "num_attention_heads": n_head, "num_key_value_heads": lit.get("n_query_groups") or n_head,
        "head_dim": head, "vocab_size": vocab, "max_position_embeddings": lit.get("block_size", 4096),
        "rms_norm_eps": lit.get("norm_eps", 1e-5), "hidden_act": "silu", "tie_word_embeddings": tied,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg[key] = (generation or {}).get(key)
    org, name = (lit.get("hf_config") or {}).get("org"), (lit.get("hf_config") or {}).get("name")
    if org and name:
        cfg["_name_or_path"] = f"{org}/{name}"
    adjust = lit.get("rope_adjustments")
    scaling = None
    if adjust:
        scaling = {"rope_type": "llama3", "factor": adjust["factor"], "low_freq_factor": adjust["low_freq_factor"],
                   "high_freq_factor": adjust["high_freq_factor"],
                   "original_max_position_embeddings": adjust["original_max_seq_len"]}
    elif lit.get("rope_condense_ratio", 1) != 1:
        scaling = {"rope_type": "linear", "factor": float(lit["rope_condense_ratio"])}
    set_rope(cfg, float(lit.get("rope_base", 10000)), scaling)
    if arch.name == "llama":
        cfg["attention_bias"] = cfg["mlp_bias"] = bool(lit.get("bias"))
    if arch.name == "mixtral":
        cfg["num_local_experts"] = lit["n_expert"]
        cfg["num_experts_per_tok"] = lit["n_expert_per_token"]
    if arch.name == "gemma":
        act = "gelu_pytorch_tanh" if lit.get("gelu_approximate") == "tanh" else "gelu"
        cfg["hidden_act"] = cfg["hidden_activation"] = act
    if arch.name in ("mistral", "mixtral", "qwen2", "phi3"):
        cfg["sliding_window"] = lit.get("sliding_window_size")
        indices = lit.get("sliding_window_indices")
        if cfg["sliding_window"] is not None and indices and not all(indices):
            if arch.name != "qwen2":
                raise WeightportError(f"LitGPT config {lit.get('name')!r}: sliding window on only some layers "
                                      f"has no {arch.hf_class} equivalent")
            cfg["layer_types"] = ["sliding_attention" if i else "full_attention" for i in indices]
        if arch.name == "qwen2":
            cfg["use_sliding_window"] = cfg["sliding_window"] is not None
    if arch.name == "phi3":
        cfg["partial_rotary_factor"] = lit.get("rotary_percentage", 1.0)
        cfg["rope_parameters"]["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    return cfg
