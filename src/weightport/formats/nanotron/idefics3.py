"""Nanotron Idefics3 (the kisate fork's final module tree; upstream Nanotron has no Idefics3): rules,
TP sharding table and config translation (`Idefics3Config` <-> HF Idefics3 config.json).
See ../../../../shared/formats/nanotron.md §3 and §4.2.

Vocabulary padding. Nanotron keeps the text vocabulary in a TensorParallelEmbedding and a column
lm_head, both split over TP ranks, so the stored vocabulary V' is the HF vocabulary V rounded up to
a multiple of lcm(4, TP): 128259 -> 128260, as Nanotron's own tools write it; a V already a
multiple stays as it is. The padding rows are zeros in the embedding and the lm_head (the fork's
tools leave them at unseeded random init, which then takes part in Nanotron's softmax). V' goes
into text_config.vocab_size and the top-level vocab_size; V is known on the way back only from
the HF config.json kept beside the weights, and without it the padded vocabulary is kept.

Tied embeddings. The fork's Idefics3 cannot tie its lm_head to the embedding, so a tied HF model
is written with the lm_head as an explicit copy (tie_word_embeddings false); config.json restores
the tie on the way back, which refuses an lm_head that training has made differ.

Pipeline parallelism is not written: the fork's pipeline split of Idefics3 is not known to us,
and Nanotron reshards a PP=1 checkpoint onto any PP size when it loads it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ...archs import Model
from ...archs.idefics3 import text_config, vision_config, vision_sizes
from ...archs.llama_family import LLAMA
from ...errors import WeightportError
from .shards import Sharding
from ...ops import Chain, Concat, Identity, PadRows, Tie
from ...rules import Rule, expand, rename
from ...format import OutputTensor, WriteOptions
from . import llama

NAME = "idefics3"
CE = "model.combined_embeddings.pp_block"
NV = f"{CE}.vision_model"
EMBED = f"{CE}.text_embeddings.token_embedding.weight"
CONNECTOR = f"{CE}.connector.modality_projector.proj.weight"
LM_HEAD = "model.lm_head.pp_block.weight"
TEXT = "model.llama"
HV = "model.vision_model"

# the fork's Idefics3Config and Idefics3VisionConfig fields, in dataclass order
FIELDS = ("vision_config", "text_config", "image_token_id", "pad_token_id", "scale_factor", "vocab_size")
VISION_FIELDS = ("hidden_size", "image_size", "patch_size", "num_channels", "num_attention_heads",
                 "num_key_value_heads", "is_using_mup", "intermediate_size", "hidden_act", "layer_norm_eps",
                 "attention_dropout", "num_hidden_layers")
VISION_REQUIRED = ("hidden_size", "image_size", "patch_size", "num_attention_heads", "intermediate_size",
                   "num_hidden_layers")
# VisionMLP hard-codes gelu(approximate="tanh"), which is transformers' gelu_pytorch_tanh
VISION_ACT = "gelu_pytorch_tanh"
# transformers' Idefics3Config defaults, and the fork's build tool's pad id when the text model has none
# (the fork's strict parser refuses a null one)
IMAGE_TOKEN_ID, SCALE_FACTOR, PAD_TOKEN_ID = 128257, 2, 128002
VOCAB_MULTIPLE = 4


def text_model(model: Model) -> Model:
    """Idefics3's text model as a Llama, for what the Llama side checks and writes."""
    return Model(LLAMA, text_config(model.config), model.dims)


# --- tensors -------------------------------------------------------------------------------------

def vocab_rows(model: Model, tp: int) -> int:
    m = math.lcm(VOCAB_MULTIPLE, tp)
    return -(-model.dims.vocab // m) * m


def rules(model: Model, interleaved: bool, rows: int) -> list[Rule]:
    """HF -> Nanotron; `rows` is the stored (padded) vocabulary."""
    d, v = model.dims, vision_sizes(model.config)
    L, N = f"{HV}.encoder.layers.{{l}}", f"{NV}.encoder.{{l}}"

    def both(hub_module: str, nt_module: str) -> list[Rule]:
        return [rename(f"{hub_module}.{w}", f"{nt_module}.{w}") for w in ("weight", "bias")]

    vision = both(f"{HV}.embeddings.patch_embedding", f"{NV}.embeddings.patch_embedding")
    vision.append(rename(f"{HV}.embeddings.position_embedding.weight", f"{NV}.embeddings.position_embedding.weight"))
    vision += both(f"{L}.layer_norm1", f"{N}.layer_norm1")
    vision += [Rule([f"{L}.self_attn.{p}_proj.{w}" for p in "qkv"], f"{N}.self_attn.qkv_proj.{w}",
                    Concat((v["hidden"],) * 3)) for w in ("weight", "bias")]
    for hub_module, nt_module in (("self_attn.out_proj", "self_attn.o_proj"), ("layer_norm2", "layer_norm2"),
                                  ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        vision += both(f"{L}.{hub_module}", f"{N}.{nt_module}")
    vision += both(f"{HV}.post_layernorm", f"{NV}.post_layernorm")
    text = llama.decoder_rules(model, interleaved, "model.text_model.layers", f"{TEXT}.decoder")
    text += [rename("model.connector.modality_projection.proj.weight", CONNECTOR),
             rename("model.text_model.norm.weight", f"{TEXT}.final_layer_norm.pp_block.weight")]
    pad = Identity() if rows == d.vocab else PadRows(d.vocab, rows)
    if d.tied:
        text.append(Rule("model.text_model.embed_tokens.weight", (EMBED, LM_HEAD), Chain((pad, Tie()))))
    else:
        text += [Rule("model.text_model.embed_tokens.weight", EMBED, pad), Rule("lm_head.weight", LM_HEAD, pad)]
    hub = set(model.hub_tensors())
    return expand(vision, v["layers"], 0, hub) + expand(text, d.n_layer, 0, hub)


def sharding(name: str, shape: tuple[int, ...]) -> Sharding | None:
    """Nanotron Idefics3's TP split of a parameter (None: replicated, or a row-linear bias that
    only TP rank 0 holds: one unsuffixed file either way)."""
    if name in (EMBED, LM_HEAD, f"{NV}.embeddings.position_embedding.weight"):
        return Sharding(0)
    if name.startswith(f"{NV}.encoder."):
        if name.endswith((".qkv_proj.weight", ".qkv_proj.bias")):
            return Sharding(0, (shape[0] // 3,) * 3)
        if name.endswith((".fc1.weight", ".fc1.bias")):
            # a column linear with one contiguous chunk: the shard metadata says so
            return Sharding(0, (shape[0],))
        if name.endswith((".o_proj.weight", ".fc2.weight")):
            return Sharding(1)
        return None
    if name.startswith(f"{TEXT}.decoder."):
        return llama.decoder_sharding(name, shape)
    return None


WHAT = {**llama.WHAT, "position_embedding": ("the number of vision positions",),
        "fc1": ("the vision intermediate_size",), "fc2": ("the vision intermediate_size",)}


def pp_ranks(tensors: list[OutputTensor], pp: int) -> dict[str, int]:
    # check_write refuses PP > 1
    return {t.name: 0 for t in tensors}


# --- config ----------------------------------------------------------------------------------------

def check_write(model: Model, options: WriteOptions) -> list[str]:
    warnings = llama.check_representable(text_model(model), options.allow_approximate)
    d, v, tp = model.dims, vision_sizes(model.config), options.tp
    act = vision_config(model.config)["hidden_act"]
    if act != VISION_ACT:
        raise WeightportError(f"vision_config hidden_act {act!r}: Nanotron's Idefics3 vision MLP always uses "
                              f"gelu(approximate='tanh') ({VISION_ACT}), so the vision tower would change")
    llama.check_heads(d.n_head, d.n_kv, tp, "text_config ")
    if v["heads"] % tp:
        raise WeightportError(f"--tp {tp} does not divide vision_config num_attention_heads ({v['heads']}): Nanotron "
                              "gives each TP rank whole heads; choose a TP size that divides it")
    if v["positions"] % tp:
        raise WeightportError(f"--tp {tp} does not divide the {v['positions']} vision positions of "
                              f"{HV}.embeddings.position_embedding.weight ((image_size / patch_size)^2): Nanotron "
                              "splits position_embedding over TP ranks; choose a TP size that divides it")
    if options.pp > 1:
        raise WeightportError(f"--pp {options.pp}: weightport writes Nanotron's Idefics3 at PP=1 only (Nanotron "
                              "reshards it onto any pipeline size when it loads it)")
    return warnings


def write_notes(model: Model, options: WriteOptions) -> list[str]:
    d, rows = model.dims, vocab_rows(model, options.tp)
    notes = []
    if rows != d.vocab:
        notes.append(f"vocabulary padded from {d.vocab} to {rows} rows (a multiple of lcm(4, TP={options.tp})) with "
                     "zero rows in the embedding and the lm_head; config.json keeps the true size, so reading "
                     "back drops them")
    if d.tied:
        notes.append("lm_head written as a copy of the embedding (Nanotron's Idefics3 cannot tie them); "
                     "config.json restores the tie on reading")
    return notes


def to_nanotron(model: Model, options: WriteOptions) -> dict:
    check_write(model, options)
    cfg, v = model.config, vision_config(model.config)
    rows = vocab_rows(model, options.tp)
    vision = {k: v.get(k) for k in VISION_FIELDS}
    vision.update(num_key_value_heads=v["num_attention_heads"], is_using_mup=False)
    pad = cfg.get("pad_token_id", cfg.get("_pad_token_id"))  # transformers 5 saves it as _pad_token_id
    return {"vision_config": vision,
            "text_config": llama.llama_config(text_model(model), options.layout == "interleaved", rows, tied=False),
            "image_token_id": cfg.get("image_token_id", IMAGE_TOKEN_ID),
            "pad_token_id": PAD_TOKEN_ID if pad is None else pad,
            "scale_factor": cfg.get("scale_factor", SCALE_FACTOR), "vocab_size": rows}


def detects(nt: dict) -> bool:
    return isinstance(nt, dict) and any(k in nt for k in ("vision_config", "text_config", "llama_config"))


def to_hf(nt: dict, where: str) -> tuple[dict, bool | None, list[str]]:
    """(HF config.json, rope_interleaved or None when not recorded, notes) for a Nanotron Idefics3Config."""
    if "llama_config" in nt:
        raise WeightportError(f"{where}: an Idefics3Config with llama_config is from a Nanotron fork before commit "
                              "d6baf07 (Dec 2024), whose module tree differs; only the final tree is supported")
    unknown = sorted(set(nt) - set(FIELDS))
    if unknown:
        raise WeightportError(f"{where}: unknown Idefics3Config key {unknown[0]!r} (Nanotron itself would refuse it)")
    vision = nt.get("vision_config")
    if not isinstance(vision, dict) or not isinstance(nt.get("text_config"), dict):
        raise WeightportError(f"{where}: Idefics3Config needs vision_config and text_config mappings")
    unknown = sorted(set(vision) - set(VISION_FIELDS))
    if unknown:
        raise WeightportError(f"{where}: unknown Idefics3VisionConfig key {unknown[0]!r} "
                              "(Nanotron itself would refuse it)")
    missing = [k for k in VISION_REQUIRED if vision.get(k) is None]
    if missing:
        raise WeightportError(f"{where}: vision_config: missing field {missing[0]!r}")
    heads = vision["num_attention_heads"]
    if vision.get("is_using_mup"):
        raise WeightportError(f"{where}: vision_config is_using_mup=true scales attention by 1/d, which "
                              "transformers' Idefics3 does not")
    if (vision.get("num_key_value_heads") or heads) != heads:
        raise WeightportError(f"{where}: vision_config has {vision['num_key_value_heads']} key/value heads for "
                              f"{heads} heads; transformers' Idefics3 vision attention has no grouped heads")
    text, interleaved, notes = llama.to_hf(nt["text_config"], f"{where}: text_config")
    del text["architectures"]
    text["tie_word_embeddings"] = False
    if vision.get("hidden_act", VISION_ACT) != VISION_ACT:
        notes.append(f"{where}: vision_config hidden_act {vision['hidden_act']!r} is not what Nanotron computes; "
                     f"written as {VISION_ACT}")
    hf_vision = {"model_type": "idefics3_vision", **{k: vision[k] for k in VISION_REQUIRED},
                 "num_channels": vision.get("num_channels", 3), "hidden_act": VISION_ACT,
                 "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
                 "attention_dropout": vision.get("attention_dropout", 0.0)}
    cfg = {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
           "image_token_id": nt.get("image_token_id", IMAGE_TOKEN_ID),
           "scale_factor": nt.get("scale_factor", SCALE_FACTOR), "pad_token_id": nt.get("pad_token_id"),
           "tie_word_embeddings": False, "text_config": text, "vision_config": hf_vision}
    return cfg, interleaved, notes


def same_network(original: Model, stored: Model) -> bool:
    """Whether the HF config.json beside the weights describes the network they hold: the same up
    to the vocabulary padding and the tie Nanotron cannot store."""
    if original.arch is not stored.arch:
        return False
    o, s = original.config, stored.config
    return replace(original.dims, vocab=0, tied=False) == replace(stored.dims, vocab=0, tied=False) \
        and original.dims.vocab <= stored.dims.vocab \
        and vision_sizes(o) == vision_sizes(s) \
        and vision_config(o)["layer_norm_eps"] == vision_config(s)["layer_norm_eps"] \
        and all(o.get(k, d) == s.get(k, d) for k, d in (("scale_factor", SCALE_FACTOR),
                                                         ("image_token_id", IMAGE_TOKEN_ID))) \
        and llama.same_llama(text_config(o), text_config(s))
