"""Qwen, the first generation (Qwen-7B / 14B / 72B and their -Chat), as Alibaba publishes it on the
Hugging Face Hub: model_type "qwen", class QWenLMHeadModel, `trust_remote_code` modeling_qwen.py.
Qwen-VL is the same class and model_type with a `visual` block in config.json and a vision
encoder (visual.py) under transformer.visual.

Not transformers' Qwen2 (model_type "qwen2"): q, k and v are one c_attn with a bias, and the MLP
is w1 * silu(w2) -> c_proj. config.json's intermediate_size is twice the width of w1 and w2.
"""

from __future__ import annotations

from .base import Arch, Dims, standard_dims

L = "transformer.h.{l}"


def _dims(cfg: dict) -> Dims:
    heads = cfg["num_attention_heads"]
    # modeling_qwen.py's QWenMLP builds w1 and w2 with intermediate_size // 2 rows
    return standard_dims(cfg, head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
                         intermediate=cfg["intermediate_size"] // 2, tied=False)


def _tensors(d: Dims, cfg: dict) -> list:
    """In modeling_qwen.py's module order, which is the order its state_dict() has; its rotary
    inv_freq and causal mask are non-persistent buffers, so saved files do not carry them."""
    E, I, P = d.hidden, d.intermediate, d.q_rows
    bias = not cfg.get("no_bias", True)

    def linear(name, out, inp, has_bias):
        return [(f"{L}.{name}.weight", (out, inp))] + ([(f"{L}.{name}.bias", (out,))] if has_bias else [])

    # c_proj is declared nn.Linear(hidden_size, projection_size), so its weight is (P, E)
    layer = ([(f"{L}.ln_1.weight", (E,))] + linear("attn.c_attn", 3 * P, E, True) + linear("attn.c_proj", P, E, bias)
             + [(f"{L}.ln_2.weight", (E,))] + linear("mlp.w1", I, E, bias) + linear("mlp.w2", I, E, bias)
             + linear("mlp.c_proj", E, I, bias))
    out = [("transformer.wte.weight", (d.vocab, E))]
    for i in range(d.n_layer):
        out += [(name.format(l=i), shape) for name, shape in layer]
    out.append(("transformer.ln_f.weight", (E,)))
    if cfg.get("visual"):
        out += visual_tensors(cfg["visual"])
    out.append(("lm_head.weight", (d.vocab, E)))
    return out


def visual_sizes(v: dict) -> dict:
    """Qwen-VL's VisionTransformer(**config.visual) sizes, as visual.py derives them."""
    w, out = v["width"], v["output_dim"]
    return dict(width=w, layers=v["layers"], heads=v["heads"], mlp=int(w * v["mlp_ratio"]), out=out,
                queries=v.get("n_queries", 256), patch=v["patch_size"])


def visual_tensors(v: dict) -> list:
    """Qwen-VL's transformer.visual.* in named_parameters() order: each module's own parameters
    (positional_embedding, proj; the resampler's pos_embed, query) before its submodules'."""
    s = visual_sizes(v)
    w, out, mlp = s["width"], s["out"], s["mlp"]
    V = "transformer.visual"

    def ln(name, n):
        return [(f"{name}.weight", (n,)), (f"{name}.bias", (n,))]

    def linear(name, o, i):
        return [(f"{name}.weight", (o, i)), (f"{name}.bias", (o,))]

    # positional_embedding has 256 rows whatever the image size (interpolated at run time)
    t = [(f"{V}.positional_embedding", (256, w)), (f"{V}.proj", (out, out)),
         (f"{V}.conv1.weight", (w, 3, s["patch"], s["patch"]))] + ln(f"{V}.ln_pre", w)
    for i in range(s["layers"]):
        b = f"{V}.transformer.resblocks.{i}"
        t += (ln(f"{b}.ln_1", w) + ln(f"{b}.ln_2", w) + linear(f"{b}.attn.in_proj", 3 * w, w)
              + linear(f"{b}.attn.out_proj", w, w) + linear(f"{b}.mlp.c_fc", mlp, w)
              + linear(f"{b}.mlp.c_proj", w, mlp))
    p = f"{V}.attn_pool"
    t += [(f"{p}.pos_embed", (s["queries"], out)), (f"{p}.query", (s["queries"], out))]
    if w != out:  # else kv_proj is nn.Identity
        t.append((f"{p}.kv_proj.weight", (out, w)))
    t += [(f"{p}.attn.in_proj_weight", (3 * out, out)), (f"{p}.attn.in_proj_bias", (3 * out,))]
    t += linear(f"{p}.attn.out_proj", out, out) + ln(f"{p}.ln_q", out) + ln(f"{p}.ln_kv", out) + ln(f"{V}.ln_post", out)
    return t


# QWenLMHeadModel ignores these on load (_keys_to_ignore_on_load_*): buffers of GPT-2-style and
# early per-layer rotary code that a file saved from such a revision could hold
QWEN = Arch("qwen", "QWenLMHeadModel", "qwen",
            "Qwen-7B / 14B / 72B and Qwen-VL, first generation (Alibaba remote code)", _dims, _tensors,
            (f"{L}.attn.masked_bias", f"{L}.attn.rotary_emb.inv_freq"))

ARCHS = (QWEN,)
