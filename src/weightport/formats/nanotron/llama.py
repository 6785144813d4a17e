"""Nanotron Llama: rules, TP sharding table, pipeline split and config translation
(`LlamaConfig` in model_config.json / config.yaml <-> Hugging Face Llama config.json).

Nanotron parses its configs with dacite strict=True, so we write exactly the fields of its
LlamaConfig (those of the kisate fork, which upstream also accepts) and refuse keys we do not
know on reading rather than guess what they change. Idefics3's text model is this Llama, so
its decoder rules and config translation are shared from here.
"""

from __future__ import annotations

from ...archs import Model
from ...errors import WeightportError
from ...hf_config import rope_scaling, rope_theta, set_rope
from .shards import Sharding
from ...ops import Chain, Concat, Identity, Parallel, RotaryPermute
from ...rules import Rule, expand, rename
from ...format import OutputTensor, WriteOptions

NAME = "llama"
EMBED = "model.token_position_embeddings.pp_block.token_embedding.weight"
LM_HEAD = "model.lm_head.pp_block.weight"

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


# --- tensors -------------------------------------------------------------------------------------

def decoder_rules(model: Model, interleaved: bool, hub: str, nt: str) -> list[Rule]:
    """Unexpanded rules of the decoder layers, HF `hub`.{l} <-> Nanotron `nt`.{l}.pp_block."""
    d = model.dims
    L, D = f"{hub}.{{l}}", f"{nt}.{{l}}.pp_block"
    fuse = bias_fuse = Concat((d.q_rows, d.kv_rows, d.kv_rows))
    if interleaved:
        permute = Parallel((RotaryPermute(d.n_head, d.head_dim), RotaryPermute(d.n_kv, d.head_dim), Identity()))
        fuse, bias_fuse = Chain((permute, fuse)), Chain((permute, bias_fuse))
    return [
        rename(f"{L}.input_layernorm.weight", f"{D}.input_layernorm.weight"),
        Rule([f"{L}.self_attn.{p}_proj.weight" for p in "qkv"], f"{D}.attn.qkv_proj.weight", fuse),
        rename(f"{L}.self_attn.o_proj.weight", f"{D}.attn.o_proj.weight"),
        rename(f"{L}.post_attention_layernorm.weight", f"{D}.post_attention_layernorm.weight"),
        Rule([f"{L}.mlp.{p}_proj.weight" for p in ("gate", "up")], f"{D}.mlp.gate_up_proj.weight",
             Concat((d.intermediate, d.intermediate))),
        rename(f"{L}.mlp.down_proj.weight", f"{D}.mlp.down_proj.weight"),
        # biases are refused on writing (check_representable); the rules keep every tensor reversible
        Rule([f"{L}.self_attn.{p}_proj.bias" for p in "qkv"], f"{D}.attn.qkv_proj.bias", bias_fuse),
        rename(f"{L}.self_attn.o_proj.bias", f"{D}.attn.o_proj.bias"),
        Rule([f"{L}.mlp.{p}_proj.bias" for p in ("gate", "up")], f"{D}.mlp.gate_up_proj.bias",
             Concat((d.intermediate, d.intermediate))),
        rename(f"{L}.mlp.down_proj.bias", f"{D}.mlp.down_proj.bias"),
    ]


def vocab_rows(model: Model, tp: int) -> int:
    """Nanotron's Llama tools store the vocabulary as it is (the trainer pads only at run time)."""
    return model.dims.vocab


def rules(model: Model, interleaved: bool, rows: int) -> list[Rule]:
    d = model.dims
    out = [rename("model.embed_tokens.weight", EMBED),
           *decoder_rules(model, interleaved, "model.layers", "model.decoder"),
           rename("model.norm.weight", "model.final_layer_norm.pp_block.weight"),
           # tied: Nanotron stores the embedding once and has no lm_head files, as the hub has no lm_head
           rename("lm_head.weight", LM_HEAD)]
    return expand(out, d.n_layer, 0, set(model.hub_tensors()))


def decoder_sharding(name: str, shape: tuple[int, ...]) -> Sharding | None:
    if name.endswith("attn.qkv_proj.weight"):
        # q has hidden_size rows: Nanotron's head_dim is always hidden / heads
        kv = (shape[0] - shape[1]) // 2
        return Sharding(0, (shape[1], kv, kv))
    if name.endswith("gate_up_proj.weight"):
        return Sharding(0, (shape[0] // 2,) * 2)
    if name.endswith(("attn.o_proj.weight", "down_proj.weight")):
        return Sharding(1)
    return None


def sharding(name: str, shape: tuple[int, ...]) -> Sharding | None:
    """Nanotron Llama's TP split of a parameter (None: replicated, one unsuffixed file)."""
    return Sharding(0) if name in (EMBED, LM_HEAD) else decoder_sharding(name, shape)


# what each split block of a parameter is, for the message when TP does not divide it
WHAT = {"qkv_proj": ("its query block", "its key block", "its value block"),
        "gate_up_proj": ("its gate block", "its up block"), "o_proj": ("the attention width",),
        "down_proj": ("intermediate_size",), "token_embedding": ("vocab_size",), "lm_head": ("vocab_size",)}


def pp_ranks(tensors: list[OutputTensor], pp: int) -> dict[str, int]:
    """Each parameter's pipeline rank, as Nanotron's build_model balances its PipelineBlocks
    (embedding, decoder layers, final norm, lm_head, ...) by cumulative compute cost."""
    shapes = {t.name: t.shape for t in tensors}
    vocab, hidden = shapes[EMBED]
    layers = sorted({int(n.split(".")[2]) for n in shapes if n.startswith("model.decoder.")})
    inter = shapes[f"model.decoder.{layers[0]}.pp_block.mlp.gate_up_proj.weight"][0] // 2 if layers else 0
    # LlamaForTraining.get_block_compute_costs, with heads x head_dim = hidden; the lm_head block
    # exists (and costs) even when tied
    layer_cost = 4 * hidden * hidden + 3 * inter * hidden
    blocks = [("model.token_position_embeddings.", 0)] + [(f"model.decoder.{l}.", layer_cost) for l in layers]
    blocks += [("model.final_layer_norm.", 0), ("model.lm_head.", vocab * hidden)]
    total = sum(c for _, c in blocks)
    thresholds = [total * ((r + 1) / pp) for r in range(pp)]
    ranks, rank, cumulative = {}, 0, 0
    for prefix, cost in blocks:
        cumulative += cost
        ranks[prefix] = rank
        if cumulative > thresholds[rank]:
            rank += 1
    return {n: next(r for p, r in ranks.items() if n.startswith(p)) for n in shapes}


# --- config ----------------------------------------------------------------------------------------

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


def check_heads(n_head: int, n_kv: int, tp: int, what: str = "") -> None:
    for key, n in (("num_attention_heads", n_head), ("num_key_value_heads", n_kv)):
        if n % tp:
            raise WeightportError(f"--tp {tp} does not divide {what}{key} ({n}): Nanotron gives each TP rank "
                                  "whole heads; choose a TP size that divides both head counts")


def check_write(model: Model, options: WriteOptions) -> list[str]:
    warnings = check_representable(model, options.allow_approximate)
    d = model.dims
    check_heads(d.n_head, d.n_kv, options.tp)
    if options.pp > d.n_layer:
        raise WeightportError(f"--pp {options.pp} is more pipeline stages than the {d.n_layer} decoder layers")
    return warnings


def write_notes(model: Model, options: WriteOptions) -> list[str]:
    return []


def llama_config(model: Model, interleaved: bool, vocab: int, tied: bool) -> dict:
    """The LlamaConfig fields of `model`'s Llama (the whole model, or Idefics3's text model)."""
    cfg, d = model.config, model.dims
    out = {k: cfg.get(k, HF_DEFAULTS.get(k)) for k in FIELDS}
    out.update(hidden_size=d.hidden, intermediate_size=d.intermediate, num_attention_heads=d.n_head,
               num_hidden_layers=d.n_layer, num_key_value_heads=d.n_kv, vocab_size=vocab, tie_word_embeddings=tied,
               is_llama_config=True, rope_scaling=None, rope_theta=rope_theta(cfg), rope_interleaved=interleaved,
               # as Nanotron's own converters do: it becomes the embedding's padding_idx
               pad_token_id=None)
    return out


def to_nanotron(model: Model, options: WriteOptions) -> dict:
    check_representable(model, options.allow_approximate)
    return llama_config(model, options.layout == "interleaved", model.dims.vocab, model.dims.tied)


def detects(nt: dict) -> bool:
    return isinstance(nt, dict) and "vision_config" not in nt and "text_config" not in nt \
        and "llama_config" not in nt


def to_hf(nt: dict, where: str) -> tuple[dict, bool | None, list[str]]:
    """(HF config.json, rope_interleaved or None when not recorded, notes) for a Nanotron LlamaConfig."""
    if not isinstance(nt, dict):
        raise WeightportError(f"{where}: expected a mapping of LlamaConfig fields")
    unknown = sorted(set(nt) - set(FIELDS) - set(UPSTREAM_ONLY))
    if unknown:
        raise WeightportError(f"{where}: unknown LlamaConfig key {unknown[0]!r} (Nanotron itself would refuse it); "
                              "only Llama and Idefics3 checkpoints are supported")
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


def same_llama(original: dict, hf: dict) -> bool:
    """Whether an HF Llama config describes what a Nanotron LlamaConfig (as `hf`) computes."""
    return all(original.get(k, hf[k]) == hf[k] for k in ("rms_norm_eps", "hidden_act")) \
        and rope_theta(original) == rope_theta(hf)


def same_network(original: Model, stored: Model) -> bool:
    """Whether the HF config.json beside the weights describes the network they hold."""
    return original.arch is stored.arch and original.dims == stored.dims \
        and same_llama(original.config, stored.config)
