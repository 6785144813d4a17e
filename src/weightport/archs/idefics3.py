"""Idefics3 (transformers' Idefics3ForConditionalGeneration; HuggingFaceM4/Idefics3-8B-Llama3): a
SigLIP-style vision tower, a pixel-shuffle connector and a Llama text model.

Names are those save_pretrained writes, the same in transformers 4.x and 5.x: `model.vision_model.*`,
`model.connector.modality_projection.proj.weight`, `model.text_model.*` and `lm_head.weight`; the
lm_head is absent when the top-level `tie_word_embeddings` is set (the text_config's own flag is not
what transformers ties by).

Dims describe the text model (the part that scores tokens); the vision tower's sizes come from
`vision_config` through `vision_sizes`. transformers 4.x left sub-config keys equal to their class
defaults out of config.json (Idefics3-8B's text_config has no hidden_size: Llama's 4096), so
missing keys take those defaults here.
"""

from __future__ import annotations

from .base import Arch, Dims, standard_dims
from .llama_family import _llama_tensors
from .vision_towers import vit_tensors

# LlamaConfig's defaults for the keys that shape tensors
TEXT_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "vocab_size": 32000}
# Idefics3VisionConfig's defaults (4.x and 5.x)
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "attention_dropout": 0.0}
TEXT, VISION = "model.text_model.", "model.vision_model"
CONNECTOR = "model.connector.modality_projection.proj.weight"


def text_config(cfg: dict) -> dict:
    return {**TEXT_DEFAULTS, **(cfg.get("text_config") or {})}


def vision_config(cfg: dict) -> dict:
    return {**VISION_DEFAULTS, **(cfg.get("vision_config") or {})}


def vision_sizes(cfg: dict) -> dict:
    """The vision tower's sizes: hidden, intermediate, layers, heads, channels, patch, positions."""
    v = vision_config(cfg)
    side = v["image_size"] // v["patch_size"]
    return dict(hidden=v["hidden_size"], intermediate=v["intermediate_size"], layers=v["num_hidden_layers"],
                heads=v["num_attention_heads"], channels=v["num_channels"], patch=v["patch_size"],
                positions=side * side)


def _dims(cfg: dict) -> Dims:
    return standard_dims(text_config(cfg), tied=bool(cfg.get("tie_word_embeddings", False)))


def _vision(cfg: dict) -> list:
    return vit_tensors(VISION, vision_sizes(cfg), clip=False)


def _tensors(d: Dims, cfg: dict) -> list:
    """In state_dict() order: vision tower, connector, text model, lm_head."""
    scale = cfg.get("scale_factor", 2)
    vision_hidden = vision_sizes(cfg)["hidden"]
    text = [(n if n == "lm_head.weight" else TEXT + n.removeprefix("model."), shape)
            for n, shape in _llama_tensors(d, text_config(cfg))]
    return _vision(cfg) + [(CONNECTOR, (d.hidden, vision_hidden * scale * scale))] + text


IDEFICS3 = Arch("idefics3", "Idefics3ForConditionalGeneration", "idefics3",
                "Idefics3 (SigLIP vision tower, pixel-shuffle connector, Llama text model)",
                _dims, _tensors, causal_lm=False)
