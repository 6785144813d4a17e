"""MindFormers' Whisper names (mindformers/models/whisper, `--model whisper`; removed from MindFormers in
June 2025, last in r1.5.0).

Its convert_weight.py keeps every Hugging Face name but three kinds: embeddings (embed_tokens,
both embed_positions) become `.embedding_weight`, LayerNorms (every name with "layer_norm")
`.gamma` / `.beta`, and the two Conv1d kernels gain an axis, (out, in, k) -> (out, in, 1, k),
because MindFormers runs them as Conv2d. Linear weights stay (out, in). Its model has no proj_out
weight: logits come from the decoder's embedding table, so only tied checkpoints fit.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....errors import WeightportError
from ....ops import AddAxis, Identity
from ....rules import Rule
from .base import MS_DTYPE_NAMES, NameSet

# "separate" is the layout name MindFormers' default converter output goes by for every family
LAYOUTS = {"separate": "Hugging Face names, embeddings as embedding_weight, LayerNorms as gamma/beta, Conv1d "
                       "kernels as (out, in, 1, k) (MindFormers' whisper convert_weight)"}


def mf_name(hub: str) -> str:
    if hub.endswith(("embed_tokens.weight", "embed_positions.weight")):
        return hub.removesuffix("weight") + "embedding_weight"
    if "layer_norm" in hub:
        return hub.removesuffix("weight").removesuffix("bias") + ("gamma" if hub.endswith("weight") else "beta")
    return hub


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    return [Rule(h, mf_name(h), AddAxis(2) if h.endswith(("conv1.weight", "conv2.weight")) else Identity())
            for h in model.hub_tensors()]


def _attention(a):
    return [f"{a}.{p}.{w}" for p in ("k_proj", "v_proj", "q_proj", "out_proj") for w in ("weight", "bias")] + [
        f"{a}_layer_norm.{w}" for w in ("weight", "bias")]


# module order: top-level tensors, then each layer's, then the final norm
_ORDER = [mf_name(h) for h in (
    "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "embed_tokens.weight", "embed_positions.weight",
    *_attention("self_attn"), *_attention("encoder_attn"), "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    "final_layer_norm.weight", "final_layer_norm.bias", "layer_norm.weight", "layer_norm.bias")]


def write_order(name: str, layout: str = "separate") -> tuple:
    """The converter walks the torch state dict: the encoder, the decoder, each in module order."""
    stack, _, rest = name.removeprefix("model.").partition(".")
    part = ("encoder", "decoder").index(stack) if stack in ("encoder", "decoder") else 2
    if rest.startswith("layers."):
        layer, rest = rest.removeprefix("layers.").split(".", 1)
        where = (1, int(layer))
    else:
        where = (2 if rest.startswith("layer_norm.") else 0, 0)
    return (part, *where, _ORDER.index(rest) if rest in _ORDER else len(_ORDER), name)


# Hugging Face activations MindFormers' get_activation knows under the same name (its "gelu" is the
# tanh approximation; MindFormers' Whisper runs with it all the same)
_ACT = ("gelu", "relu", "silu", "tanh")


def check(model: Model) -> None:
    cfg = model.config
    problems = []
    if not model.dims.tied:
        problems.append("has no proj_out of its own (it scores with embed_tokens; tie_word_embeddings is false)")
    if cfg.get("scale_embedding"):
        problems.append("never scales the token embedding (scale_embedding is true)")
    if cfg.get("activation_function", "gelu") not in _ACT:
        problems.append(f"has no activation {cfg['activation_function']!r} (supported: {', '.join(_ACT)})")
    if problems:
        raise WeightportError("MindFormers' Whisper " + "; it ".join(problems))


# MindFormers' WhisperConfig defaults, which a yaml without the key gets
_MF_DEFAULTS = dict(vocab_size=51865, num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
                    encoder_ffn_dim=1536, decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536,
                    activation_function="gelu", max_source_positions=1500, max_target_positions=448,
                    pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, decoder_start_token_id=50257)
_CONFIG_KEYS = tuple(_MF_DEFAULTS)


def to_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    """The model block of MindFormers' configs/whisper/finetune_whisper_large_v3.yaml, filled in."""
    ms_dtype = MS_DTYPE_NAMES.get(dtype, "float32")
    mc = {"type": "WhisperConfig", "batch_size": 1}
    mc.update({k: model.config[k] for k in _CONFIG_KEYS if k in model.config})
    mc.update(is_encoder_decoder=True, compute_dtype=ms_dtype, param_init_type=ms_dtype, embedding_init_type=ms_dtype,
              layernorm_compute_dtype="float32", softmax_compute_type="float32")
    return {"model": {"model_config": mc, "arch": {"type": "WhisperForConditionalGeneration"}},
            "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}


def from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    mc = data["model"]["model_config"]
    cfg = {**_MF_DEFAULTS, **{k: mc[k] for k in _CONFIG_KEYS if k in mc}}
    cfg.update(model_type="whisper", architectures=["WhisperForConditionalGeneration"], tie_word_embeddings=True,
               scale_embedding=False, is_encoder_decoder=True)
    return cfg, "separate"


NAMES = NameSet(
    title="Whisper",
    archs=("whisper",), keys=("whisper",),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_yaml,
    yaml_types=("WhisperConfig",), from_yaml=from_yaml,
)
