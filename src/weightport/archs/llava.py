"""LLaVA-1.5 style models (transformers' LlavaForConditionalGeneration): a CLIP vision tower, a
two-layer GELU projector and a decoder-only text model of architecture of the Llama family
(Llama, Phi-3, Mistral, Qwen2, Gemma), named by text_config.model_type.

Hub names are what llava-hf checkpoints on the Hub hold and what transformers 4.x saves:
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
`language_model.lm_head.weight`. transformers >= 5 saves the vision tower without `vision_model.`
(ALIASES); it loads both.

Sub-configs written by transformers 4.x are diffs against their class defaults, so missing keys
take those defaults (a vision_config without hidden_size is CLIP ViT-B/32's 768, not 1024).
"""

from __future__ import annotations

from ..errors import WeightportError
from .base import Arch, Dims
from .llama_family import ARCHS as LLAMA_FAMILY
from .vision_towers import vit_tensors

TEXT_ARCHS = {a.model_type: a for a in LLAMA_FAMILY}

VISION, PROJECTOR, TEXT = "vision_tower.vision_model", "multi_modal_projector", "language_model."
# transformers >= 5 writes these stored prefixes for the hub's
ALIASES = (("vision_tower.vision_model.", "vision_tower."),)

# class defaults of the sub-configs (transformers 4.x and 5.x); LlavaConfig() with no
# vision_config at all means CLIP ViT-L/14-336 instead, handled in vision_config()
TEXT_DEFAULTS = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "vocab_size": 32000}
CLIP_DEFAULTS = {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                 "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
                 "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0}
CLIP_L_336 = {**CLIP_DEFAULTS, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768}


def text_config(cfg: dict) -> dict:
    return {**TEXT_DEFAULTS, **(cfg.get("text_config") or {})}


def vision_config(cfg: dict) -> dict:
    vc = cfg.get("vision_config")
    return dict(CLIP_L_336) if vc is None else {**CLIP_DEFAULTS, **vc}


def text_arch(cfg: dict) -> Arch | None:
    return TEXT_ARCHS.get(text_config(cfg)["model_type"])


def vision_sizes(cfg: dict) -> dict:
    v = vision_config(cfg)
    side = v["image_size"] // v["patch_size"]
    return dict(hidden=v["hidden_size"], intermediate=v["intermediate_size"], layers=v["num_hidden_layers"],
                heads=v["num_attention_heads"], channels=v["num_channels"], patch=v["patch_size"],
                image=v["image_size"], positions=side * side + 1)


def projector_bias(cfg: dict) -> bool:
    return bool(cfg.get("multimodal_projector_bias", True))


def _dims(cfg: dict) -> Dims:
    arch = text_arch(cfg)
    if arch is None:
        raise WeightportError(f"text_config.model_type {text_config(cfg)['model_type']!r}: LLaVA's text model must "
                              f"be one of {', '.join(TEXT_ARCHS)}")
    return arch.dims(text_config(cfg))


def vision_tensors(cfg: dict, prefix: str = VISION) -> list:
    """CLIPVisionModel's vision_model tensors in state_dict() order, under `prefix`."""
    return vit_tensors(prefix, vision_sizes(cfg), clip=True)


def projector_tensors(cfg: dict, text_hidden: int) -> list:
    vision_hidden, bias = vision_sizes(cfg)["hidden"], projector_bias(cfg)
    out = []
    for i, inp in ((1, vision_hidden), (2, text_hidden)):
        out.append((f"{PROJECTOR}.linear_{i}.weight", (text_hidden, inp)))
        if bias:
            out.append((f"{PROJECTOR}.linear_{i}.bias", (text_hidden,)))
    return out


def _tensors(d: Dims, cfg: dict) -> list:
    text = [(TEXT + n, s) for n, s in text_arch(cfg).tensors(d, text_config(cfg))]
    return vision_tensors(cfg) + projector_tensors(cfg, d.hidden) + text


LLAVA = Arch("llava", "LlavaForConditionalGeneration", "llava",
             "LLaVA-1.5 style (CLIP vision tower, 2-layer GELU projector, any known text model)",
             _dims, _tensors, (f"{TEXT}model.layers.{{l}}.self_attn.rotary_emb.inv_freq",), causal_lm=False,
             aliases=ALIASES)
