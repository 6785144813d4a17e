"""The ONNX graph of a LLaVA-1.5 image path: CLIP vision tower up to the feature layer LLaVA reads,
CLS dropped or kept as the config selects, then the two-layer projector; pixel_values in,
image_features out (one row per image token, in the text model's width). Op for op as
transformers' CLIPVisionModel (eager attention) and LlavaMultiModalProjector compute it.
"""

from __future__ import annotations

import numpy as np
import torch

from ...archs.llava import PROJECTOR, VISION, text_config, vision_config
from ...errors import WeightportError

ACTIVATIONS = ("quick_gelu", "gelu")


def feature_layer(cfg: dict) -> int:
    """How many encoder layers run: hidden_states[k] is the output of the first k layers."""
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise WeightportError(f"ONNX export: vision_feature_layer {layer!r} (several layers) is not implemented")
    n = vision_config(cfg)["num_hidden_layers"]
    return n + 1 + layer if layer < 0 else layer


def unused(name: str, cfg: dict) -> bool:
    """A tower weight LLaVA never runs: layers past the feature layer, and the final layer norm."""
    if name.startswith(f"{VISION}.post_layernorm."):
        return True
    prefix = f"{VISION}.encoder.layers."
    return name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) >= feature_layer(cfg)


def check(cfg: dict) -> None:
    feature_layer(cfg)
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise WeightportError(f"ONNX export: vision_feature_select_strategy {strategy!r} is not implemented")
    for where, act in (("vision_config.hidden_act", vision_config(cfg).get("hidden_act", "quick_gelu")),
                       ("projector_hidden_act", cfg.get("projector_hidden_act", "gelu"))):
        if act not in ACTIVATIONS:
            raise WeightportError(f"ONNX export: {where} {act!r} is not implemented ({', '.join(ACTIVATIONS)} are)")


def image_tokens(cfg: dict) -> int:
    v = vision_config(cfg)
    patches = (v["image_size"] // v["patch_size"]) ** 2
    return patches + (cfg.get("vision_feature_select_strategy", "default") == "full")


def build(g, cfg: dict, dtype: torch.dtype) -> None:
    from onnx import TensorProto

    from .graph import ONNX_DTYPES

    v = vision_config(cfg)
    hidden, heads, patch = v["hidden_size"], v["num_attention_heads"], v["patch_size"]
    head_dim, eps = hidden // heads, float(v.get("layer_norm_eps", 1e-5))
    elem = ONNX_DTYPES[dtype]
    w = lambda name: f"{VISION}.{name}"  # noqa: E731

    def act(x: str, kind: str) -> str:
        if kind == "quick_gelu":
            return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.const(1.702, dtype))))
        erf = g.op("Erf", g.op("Mul", x, g.const(2 ** -0.5, dtype)))  # exact GELU, as torch's default
        return g.op("Mul", g.op("Mul", x, g.const(0.5, dtype)), g.op("Add", erf, g.const(1.0, dtype)))

    def layer_norm(x: str, name: str) -> str:
        return g.op("LayerNormalization", x, w(f"{name}.weight"), w(f"{name}.bias"), axis=-1, epsilon=eps)

    def linear(x: str, name: str) -> str:
        y = g.op("MatMul", x, f"{name}.weight")
        return g.op("Add", y, f"{name}.bias") if g.has(f"{name}.bias") else y

    pixels = g.input("pixel_values", dtype, ["num_images", v.get("num_channels", 3), v["image_size"], v["image_size"]])
    patches = g.op("Conv", pixels, w("embeddings.patch_embedding.weight"), kernel_shape=[patch, patch],
                   strides=[patch, patch])
    patches = g.op("Transpose", g.op("Reshape", patches, g.const([0, 0, -1])), perm=[0, 2, 1])  # [B, N, hidden]
    batch = g.op("Slice", g.op("Shape", pixels), g.const([0]), g.const([1]))
    cls = g.op("Expand", g.op("Reshape", w("embeddings.class_embedding"), g.const([1, 1, hidden])),
               g.op("Concat", batch, g.const([1, hidden]), axis=0))
    x = g.op("Add", g.op("Concat", cls, patches, axis=1), w("embeddings.position_embedding.weight"))
    x = layer_norm(x, "pre_layrnorm")

    scale = g.const(head_dim ** -0.5, dtype)
    for l in range(feature_layer(cfg)):
        p = w(f"encoder.layers.{l}")
        h = layer_norm(x, f"encoder.layers.{l}.layer_norm1")
        q, k, vv = (g.op("Transpose", g.op("Reshape", linear(h, f"{p}.self_attn.{n}_proj"),
                                           g.const([0, 0, heads, head_dim])), perm=[0, 2, 1, 3]) for n in "qkv")
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        probs = g.op("Cast", g.op("Softmax", g.op("Cast", scores, to=TensorProto.FLOAT), axis=-1), to=elem)
        attn = g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, vv), perm=[0, 2, 1, 3]), g.const([0, 0, hidden]))
        x = g.op("Add", x, linear(attn, f"{p}.self_attn.out_proj"))
        h = layer_norm(x, f"encoder.layers.{l}.layer_norm2")
        h = linear(act(linear(h, f"{p}.mlp.fc1"), v.get("hidden_act", "quick_gelu")), f"{p}.mlp.fc2")
        x = g.op("Add", x, h)

    if cfg.get("vision_feature_select_strategy", "default") == "default":  # drop CLS
        x = g.op("Slice", x, g.const([1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    x = linear(act(linear(x, f"{PROJECTOR}.linear_1"), cfg.get("projector_hidden_act", "gelu")), f"{PROJECTOR}.linear_2")
    g.output(x, "image_features", dtype, ["num_images", image_tokens(cfg), text_config(cfg)["hidden_size"]])
