"""The ONNX graph of a Llama-family decoder (Llama, Mistral, Qwen2, Phi-3), written op for op as
transformers' eager implementation computes it, so ONNX Runtime gives the same logits.

Inputs follow optimum's decoder exports: `input_ids` (or `inputs_embeds`), `attention_mask`
over past + new positions, `position_ids`, and with a cache `past_key_values.{i}.key/.value`
[batch, kv_heads, past, head_dim] in, `present.{i}.key/.value` out. The causal mask is built
inside the graph from the mask's length, so a prefill (empty past) and a cached step are the
same graph. Linear weights are stored transposed ([in, out]) so MatMul reads them as they lie.
"""

from __future__ import annotations

import numpy as np
import torch

from ...archs import Model
from ...errors import WeightportError
from .rope import rotary

ARCHS = ("llama", "mistral", "qwen2", "phi3")
L = "model.layers.{l}"


def check(model: Model) -> None:
    if model.arch.name not in ARCHS:
        raise WeightportError(f"ONNX export handles the decoders {', '.join(ARCHS)}, not {model.arch.name}")
    act = model.config.get("hidden_act", "silu")
    if act != "silu":
        raise WeightportError(f"ONNX export: hidden_act {act!r} is not implemented (only silu)")
    rotary(model.config, model.dims.head_dim)  # refuses rope scalings it cannot compute


def sliding_windows(model: Model) -> list[int | None]:
    """Each layer's attention window (None: full causal), as transformers decides it."""
    cfg, n = model.config, model.dims.n_layer
    window = cfg.get("sliding_window")
    if cfg.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
    if model.arch.name == "qwen2":
        if not cfg.get("use_sliding_window"):
            return [None] * n
        first = cfg.get("max_window_layers", n)
        return [window if i >= first else None for i in range(n)]
    return [window] * n


def build(g, model: Model, dtype: torch.dtype, *, with_past: bool, prefix: str = "",
          embeds_input: bool = False) -> None:
    """Adds the decoder's inputs, nodes and outputs to `g`; its weights must already be
    initializers named as the hub names them (under `prefix`)."""
    from onnx import TensorProto

    from .graph import ONNX_DTYPES

    d, cfg = model.dims, model.config
    P = lambda template, l=None: prefix + template.format(l=l)  # noqa: E731
    has = g.has
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    elem = ONNX_DTYPES[dtype]

    if embeds_input:
        h = g.input("inputs_embeds", dtype, ["batch_size", "sequence_length", d.hidden])
        seq_of = h
    else:
        ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        h = g.op("Gather", P("model.embed_tokens.weight"), ids, axis=0)
        seq_of = ids
    mask_in = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    pos = g.input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])

    one = g.const([1])
    S = g.op("Gather", g.op("Shape", seq_of), one, axis=0)  # [1]
    T = g.op("Gather", g.op("Shape", mask_in), one, axis=0)
    past_len = g.op("Sub", T, S)
    q_pos = g.op("Range", g.op("Squeeze", past_len), g.op("Squeeze", T), g.const(1))
    k_pos = g.op("Range", g.const(0), g.op("Squeeze", T), g.const(1))
    q_col = g.op("Unsqueeze", q_pos, g.const([1]))  # [S, 1]
    k_row = g.op("Unsqueeze", k_pos, g.const([0]))  # [1, T]
    causal = g.op("LessOrEqual", k_row, q_col)
    padding = g.op("Unsqueeze", g.op("Cast", mask_in, to=TensorProto.BOOL), g.const([1, 2]))  # [B,1,1,T]
    masks: dict[int | None, str] = {}

    def additive_mask(window: int | None) -> str:
        if window not in masks:
            allowed = causal
            if window is not None:  # transformers: a key is seen while q - k < window
                allowed = g.op("And", allowed, g.op("Less", g.op("Sub", q_col, k_row), g.const(window)))
            allowed = g.op("And", g.op("Unsqueeze", allowed, g.const([0, 1])), padding)
            lowest = float(torch.finfo(dtype).min)
            masks[window] = g.op("Where", allowed, g.const(0.0, dtype), g.const(lowest, dtype))
        return masks[window]

    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=TensorProto.FLOAT), g.const([2])),
                 g.const(rotary(cfg, d.head_dim), np.float32))
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    cos = g.op("Unsqueeze", g.op("Cast", cos, to=elem), g.const([1]))  # [B, 1, S, head_dim]
    sin = g.op("Unsqueeze", g.op("Cast", sin, to=elem), g.const([1]))
    half = d.head_dim // 2

    def rope(x: str) -> str:
        x1 = g.op("Slice", x, g.const([0]), g.const([half]), g.const([-1]))
        x2 = g.op("Slice", x, g.const([half]), g.const([d.head_dim]), g.const([-1]))
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def linear(x: str, weight: str, bias: str | None = None) -> str:
        y = g.op("MatMul", x, weight)
        return g.op("Add", y, bias) if bias and has(bias) else y

    def rms_norm(x: str, weight: str) -> str:
        x32 = g.op("Cast", x, to=TensorProto.FLOAT)
        var = g.op("ReduceMean", g.op("Mul", x32, x32), g.const([-1]), keepdims=1)
        normed = g.op("Mul", x32, g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32)))))
        return g.op("Mul", weight, g.op("Cast", normed, to=elem))

    def heads(x: str, n: int) -> str:  # [B, S, n*hd] -> [B, n, S, hd]
        return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, d.head_dim])), perm=[0, 2, 1, 3])

    scale = g.const(d.head_dim ** -0.5, dtype)
    rep = d.n_head // d.n_kv
    for l, window in enumerate(sliding_windows(model)):
        w = lambda t: P(f"{L}.{t}", l)  # noqa: E731
        x = rms_norm(h, w("input_layernorm.weight"))
        if has(w("self_attn.qkv_proj.weight")):
            q, k, v = g.op("Split", g.op("MatMul", x, w("self_attn.qkv_proj.weight")),
                           g.const([d.q_rows, d.kv_rows, d.kv_rows]), axis=-1, outputs=3)
        else:
            q, k, v = (linear(x, w(f"self_attn.{p}_proj.weight"), w(f"self_attn.{p}_proj.bias")) for p in "qkv")
        q, k, v = rope(heads(q, d.n_head)), rope(heads(k, d.n_kv)), heads(v, d.n_kv)
        if with_past:
            past_k = g.input(f"past_key_values.{l}.key", dtype, ["batch_size", d.n_kv, "past_sequence_length", d.head_dim])
            past_v = g.input(f"past_key_values.{l}.value", dtype, ["batch_size", d.n_kv, "past_sequence_length", d.head_dim])
            k, v = g.op("Concat", past_k, k, axis=2), g.op("Concat", past_v, v, axis=2)
            for kind, value in (("key", k), ("value", v)):
                g.output(value, f"present.{l}.{kind}", dtype, ["batch_size", d.n_kv, "total_sequence_length", d.head_dim])
        if rep > 1:  # grouped KV heads: each serves `rep` query heads
            k, v = (g.op("Reshape", g.op("Expand", g.op("Unsqueeze", t, g.const([2])), g.const([1, 1, rep, 1, 1])),
                         g.const([0, d.n_head, -1, d.head_dim])) for t in (k, v))
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        scores = g.op("Add", scores, additive_mask(window))
        probs = g.op("Cast", g.op("Softmax", g.op("Cast", scores, to=TensorProto.FLOAT), axis=-1), to=elem)
        attn = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        attn = g.op("Reshape", attn, g.const([0, 0, d.q_rows]))
        h = g.op("Add", h, linear(attn, w("self_attn.o_proj.weight"), w("self_attn.o_proj.bias")))

        x = rms_norm(h, w("post_attention_layernorm.weight"))
        if has(w("mlp.gate_up_proj.weight")):
            gate, up = g.op("Split", g.op("MatMul", x, w("mlp.gate_up_proj.weight")),
                            g.const([d.intermediate, d.intermediate]), axis=-1, outputs=2)
        else:
            gate, up = (linear(x, w(f"mlp.{p}_proj.weight"), w(f"mlp.{p}_proj.bias")) for p in ("gate", "up"))
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        h = g.op("Add", h, linear(act, w("mlp.down_proj.weight"), w("mlp.down_proj.bias")))

    h = rms_norm(h, P("model.norm.weight"))
    if has(P("lm_head.weight")):
        logits = g.op("MatMul", h, P("lm_head.weight"))
    else:  # tied: Gemm reads the [vocab, hidden] table transposed, where a Transpose node would copy it
        flat = g.op("Gemm", g.op("Reshape", h, g.const([-1, d.hidden])), P("model.embed_tokens.weight"), transB=1)
        logits = g.op("Reshape", flat, g.op("Concat", g.op("Slice", g.op("Shape", h), g.const([0]), g.const([2])),
                                              g.const([d.vocab]), axis=0))
    logits = g.op("Cast", logits, to=TensorProto.FLOAT)
    g.output(logits, "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", d.vocab])
