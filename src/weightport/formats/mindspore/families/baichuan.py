"""MindFormers' names for Baichuan2 7B and 13B (`--model baichuan2`, research/baichuan2): its Llama
names, with W_pack split in three equal parts into wq, wk and wv.

Both Baichuan7BV2ForCausalLM and Baichuan13BV2ForCausalLM hold exactly these parameters; the
converter writes no fused layout. Their yaml type is MindFormers' LlamaConfig, which the Llama
name set reads, so a Baichuan2 file converts back through the config.json written beside it.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....errors import WeightportError
from ....ops import Split
from ....rules import Rule, expand, rename, renames
from .base import MS_DTYPE_NAMES, NameSet

LAYOUTS = {"separate": "W_pack split into wq/wk/wv, MLP w1/w2/w3 (what MindFormers' baichuan2 converter writes)"}

L = "model.layers.{l}"
_LAYER_ORDER = ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                "attention_norm.weight", "ffn_norm.weight"]
_TOP_ORDER = ["model.tok_embeddings.embedding_weight", "model.norm_out.weight", "lm_head.weight"]


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    d = model.dims
    out = renames({
        "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
        f"{L}.self_attn.o_proj.weight": f"{L}.attention.wo.weight",
        f"{L}.mlp.gate_proj.weight": f"{L}.feed_forward.w1.weight",
        f"{L}.mlp.down_proj.weight": f"{L}.feed_forward.w2.weight",
        f"{L}.mlp.up_proj.weight": f"{L}.feed_forward.w3.weight",
        f"{L}.input_layernorm.weight": f"{L}.attention_norm.weight",
        f"{L}.post_attention_layernorm.weight": f"{L}.ffn_norm.weight",
        "model.norm.weight": "model.norm_out.weight",
    }) + [rename("lm_head.weight", "lm_head.weight"),
          Rule(f"{L}.self_attn.W_pack.weight", [f"{L}.attention.w{p}.weight" for p in "qkv"],
               Split((d.q_rows, d.kv_rows, d.kv_rows)))]
    return expand(out, d.n_layer, 0, set(model.hub_tensors()))


def write_order(name: str, layout: str) -> tuple:
    """The converter's: state_dict() order, W_pack's three parts where W_pack was."""
    if name.startswith("model.layers."):
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        return (1, int(layer), _LAYER_ORDER.index(rest))
    return (0 if name == _TOP_ORDER[0] else 2, _TOP_ORDER.index(name))


def check(model: Model) -> None:
    pass  # MindFormers' Baichuan2 models have every tensor of modeling_baichuan.py


def _multiple_of(hidden: int, intermediate: int) -> int | None:
    """The multiple_of from which 13B's LlamaFeedForward (which takes no intermediate_size) derives
    `intermediate`: it rounds int(8·hidden/3) up to a multiple of it."""
    base = 8 * hidden // 3
    if not 0 < base <= intermediate:
        return None
    return next(m for m in (128, 256, intermediate) if -(-base // m) * m == intermediate)


def to_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    d, cfg = model.dims, model.config
    # modeling_baichuan.py's 7B (rotary) has max_position_embeddings; 13B (ALiBi) only model_max_length
    rotary = "max_position_embeddings" in cfg
    seq = cfg.get("max_position_embeddings") or cfg.get("model_max_length", 4096)
    mc = {"type": "LlamaConfig", "batch_size": 1, "seq_length": seq, "hidden_size": d.hidden,
          "num_layers": d.n_layer, "num_heads": d.n_head, "vocab_size": d.vocab, "intermediate_size": d.intermediate,
          "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6), "bos_token_id": cfg.get("bos_token_id"),
          "eos_token_id": cfg.get("eos_token_id"), "pad_token_id": cfg.get("pad_token_id"), "qkv_concat": False,
          "compute_dtype": MS_DTYPE_NAMES.get(dtype, "float32"),
          "param_init_type": MS_DTYPE_NAMES.get(dtype, "float32")}
    if rotary:
        mc["max_position_embedding"] = seq
    elif _multiple_of(d.hidden, d.intermediate):
        mc["multiple_of"] = _multiple_of(d.hidden, d.intermediate)
    arch = "Baichuan7BV2ForCausalLM" if rotary else "Baichuan13BV2ForCausalLM"
    return {"model": {"model_config": mc, "arch": {"type": arch}},
            "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}


def from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    """A config.json for modeling_baichuan.py from a MindFormers Baichuan2 yaml; its model_config is
    a LlamaConfig, so the arch type is what says Baichuan, and 7B (rotary) from 13B (ALiBi)."""
    mc = data["model"]["model_config"]
    rotary = data["model"]["arch"]["type"] == "Baichuan7BV2ForCausalLM"
    cfg = {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "hidden_act": "silu",
           # as the Hub's Baichuan2 configs have it, so transformers finds the remote code
           "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
           "hidden_size": mc["hidden_size"],
           "num_hidden_layers": mc["num_layers"], "num_attention_heads": mc["num_heads"],
           "vocab_size": mc["vocab_size"], "rms_norm_eps": mc.get("rms_norm_eps", 1e-6),
           "bos_token_id": mc.get("bos_token_id"), "eos_token_id": mc.get("eos_token_id"),
           "pad_token_id": mc.get("pad_token_id"), "tie_word_embeddings": False}
    intermediate = mc.get("intermediate_size")
    if not intermediate and mc.get("multiple_of"):
        m = mc["multiple_of"]
        intermediate = -(-(8 * mc["hidden_size"] // 3) // m) * m
    if not intermediate:
        raise WeightportError(f"{where}: neither intermediate_size nor multiple_of is set")
    cfg["intermediate_size"] = intermediate
    seq = mc.get("max_position_embedding") or mc.get("seq_length", 4096)
    cfg["max_position_embeddings" if rotary else "model_max_length"] = seq
    return cfg, "separate"


NAMES = NameSet(
    title="Baichuan2 7B / 13B",
    archs=("baichuan",), keys=("baichuan2",),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_yaml,
    yaml_types=("Baichuan7BV2ForCausalLM", "Baichuan13BV2ForCausalLM"), from_yaml=from_yaml,
)
