"""MindFormers' names for first-generation Qwen (`--model qwen`, research/qwen) and Qwen-VL (`--model
qwenvl`, research/qwenvl); both were removed from MindFormers in March 2025.

The language model's names are the Hugging Face ones renamed Llama-style, with c_attn split into
wq / wk / wv in three equal parts. Its MLP names cross over: Hugging Face mlp.w1 is feed_forward.w1,
mlp.w2 (the one through silu) is feed_forward.w3, and mlp.c_proj is feed_forward.w2. Qwen-VL puts
that under llm_model. and the vision encoder under vision_encoder., where LayerNorms are
gamma / beta, each q / k / v is split out (the ViT's in_proj is interleaved per head) and every
attention output projection is stored transposed.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....archs.qwen import visual_sizes
from ....errors import WeightportError
from ....ops import Chain, GroupInterleave, Invert, Split, Transpose
from ....rules import Rule, expand, renames
from .base import MS_DTYPE_NAMES, NameSet

LAYOUTS = {
    "separate": "c_attn split into wq / wk / wv (MindFormers' qwen and qwenvl convert_weight)",
    "fused": "Qwen-VL only: c_attn kept whole as attention.w (qwenvl convert_weight --use_qkv_concat)",
}

H, M = "transformer.h.{l}", "transformer.layers.{l}"


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    d, visual = model.dims, model.config.get("visual")
    if layout == "fused" and not visual:
        raise WeightportError("layout fused is Qwen-VL's (qwenvl --use_qkv_concat); MindFormers' qwen has "
                              "only separate")
    pre = "llm_model." if visual else ""
    out = renames({h: pre + f for h, f in {
        "transformer.wte.weight": "transformer.wte.embedding_weight",
        f"{H}.ln_1.weight": f"{M}.attention_norm.weight",
        f"{H}.attn.c_proj.weight": f"{M}.attention.wo.weight",
        f"{H}.ln_2.weight": f"{M}.ffn_norm.weight",
        f"{H}.mlp.w1.weight": f"{M}.feed_forward.w1.weight",
        f"{H}.mlp.w2.weight": f"{M}.feed_forward.w3.weight",
        f"{H}.mlp.c_proj.weight": f"{M}.feed_forward.w2.weight",
        "transformer.ln_f.weight": "transformer.ln_f.weight",
        "lm_head.weight": "lm_head.weight",
    }.items()})
    for w in ("weight", "bias"):
        if layout == "fused":
            out += renames({f"{H}.attn.c_attn.{w}": f"{pre}{M}.attention.w.{w}"})
        else:  # numpy array_split into 3: equal thirds, as q, k and v are
            out.append(Rule(f"{H}.attn.c_attn.{w}", [f"{pre}{M}.attention.w{p}.{w}" for p in "qkv"],
                            Split((d.q_rows,) * 3)))
    hub = set(model.hub_tensors())
    out = expand(out, d.n_layer, 0, hub)
    if visual:
        s = visual_sizes(visual)
        out += expand(_vision_rules(s), s["layers"], 0, hub)
    return out


V, E = "transformer.visual", "vision_encoder"


def _vision_rules(s: dict) -> list[Rule]:
    w, out = s["width"], s["out"]
    b, mb = f"{V}.transformer.resblocks.{{l}}", f"{E}.transformer.resblocks.{{l}}"
    lns = [f"{V}.ln_pre", f"{b}.ln_1", f"{b}.ln_2", f"{V}.attn_pool.ln_q", f"{V}.attn_pool.ln_kv", f"{V}.ln_post"]
    r = renames({f"{n}.{h}": f"{n.replace(V, E, 1)}.{m}" for n in lns
                 for h, m in (("weight", "gamma"), ("bias", "beta"))})
    r += renames({f"{V}.{n}": f"{E}.{n}" for n in (
        "positional_embedding", "proj", "conv1.weight", "attn_pool.pos_embed", "attn_pool.query",
        "attn_pool.kv_proj.weight")})
    r += renames({f"{b}.{n}": f"{mb}.{n}" for n in ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                                                     "mlp.c_proj.bias")})
    r += renames({f"{b}.attn.out_proj.bias": f"{mb}.attn.projection.bias",
                  f"{V}.attn_pool.attn.out_proj.bias": f"{E}.attn_pool.attn.projection.bias"})
    # MindFormers' MultiHeadAttention keeps its output projection (in, out)
    r += [Rule(f"{b}.attn.out_proj.weight", f"{mb}.attn.projection.weight", Transpose()),
          Rule(f"{V}.attn_pool.attn.out_proj.weight", f"{E}.attn_pool.attn.projection.weight", Transpose())]
    # visual.py's in_proj rows are [q, k, v] per head; the resampler's nn.MultiheadAttention has [q; k; v]
    per_head = Chain((Invert(GroupInterleave((w, w, w), s["heads"])), Split((w, w, w))))
    for x in ("weight", "bias"):
        r += [Rule(f"{b}.attn.in_proj.{x}", [f"{mb}.attn.dense{i}.{x}" for i in (1, 2, 3)], per_head),
              Rule(f"{V}.attn_pool.attn.in_proj_{x}", [f"{E}.attn_pool.attn.dense{i}.{x}" for i in (1, 2, 3)],
                   Split((out, out, out)))]
    return r


# the converters walk the model's parameters and write each one's names where they meet it
_LAYER_ORDER = ["attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                "attention.w.weight", "attention.wq.bias", "attention.wk.bias", "attention.wv.bias", "attention.w.bias",
                "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                "feed_forward.w2.weight"]
_VIT_LAYER_ORDER = ["ln_1.gamma", "ln_1.beta", "ln_2.gamma", "ln_2.beta"] + [
    f"attn.dense{i}.{x}" for x in ("weight", "bias") for i in (1, 2, 3)] + [
    "attn.projection.weight", "attn.projection.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
    "mlp.c_proj.bias"]
_VIT_HEAD = ["positional_embedding", "proj", "conv1.weight", "ln_pre.gamma", "ln_pre.beta"]
_VIT_TAIL = ["attn_pool.pos_embed", "attn_pool.query", "attn_pool.kv_proj.weight"] + [
    f"attn_pool.attn.dense{i}.{x}" for x in ("weight", "bias") for i in (1, 2, 3)] + [
    "attn_pool.attn.projection.weight", "attn_pool.attn.projection.bias", "attn_pool.ln_q.gamma", "attn_pool.ln_q.beta",
    "attn_pool.ln_kv.gamma", "attn_pool.ln_kv.beta", "ln_post.gamma", "ln_post.beta"]


def write_order(name: str, layout: str) -> tuple:
    name = name.removeprefix("llm_model.")
    if name.startswith("transformer.layers."):
        layer, rest = name.removeprefix("transformer.layers.").split(".", 1)
        return (1, int(layer), _LAYER_ORDER.index(rest))
    if name.startswith(f"{E}.transformer.resblocks."):
        layer, rest = name.removeprefix(f"{E}.transformer.resblocks.").split(".", 1)
        return (3, 1, int(layer), _VIT_LAYER_ORDER.index(rest))
    if name.startswith(f"{E}."):
        rest = name.removeprefix(f"{E}.")
        return (3, 0, _VIT_HEAD.index(rest)) if rest in _VIT_HEAD else (3, 2, _VIT_TAIL.index(rest))
    return {"transformer.wte.embedding_weight": (0,), "transformer.ln_f.weight": (2,), "lm_head.weight": (4,)}[name]


def check(model: Model) -> None:
    d, cfg = model.dims, model.config
    problems = []
    if not cfg.get("no_bias", True):
        problems.append("has no biases on attn.c_proj or the MLP (no_bias is false)")
    if d.q_rows != d.hidden:
        problems.append(f"derives head_dim as hidden_size / num_heads = {d.hidden // d.n_head}, "
                        f"but kv_channels is {d.head_dim}")
    if cfg.get("rotary_pct", 1.0) != 1.0:
        problems.append(f"rotates every head dimension; rotary_pct is {cfg['rotary_pct']}")
    if problems:
        raise WeightportError("MindFormers' Qwen " + "; it ".join(problems))


# modeling_qwen.py settings MindFormers' qwen yamls carry along ("configuration items copied from
# Qwen"); QwenForCausalLM reads none of them but they bring config.json back from a yaml
_COPIED = ("kv_channels", "rotary_pct", "rotary_emb_base", "use_dynamic_ntk", "use_logn_attn",
           "max_position_embeddings")
# config.json's visual block <-> QwenVLVisionConfig; mlp_ratio and image_start_id ride along
_VISUAL = {"width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
           "image_size": "image_size", "patch_size": "patch_size", "output_dim": "output_dim"}


def _llm_config(model: Model, ms_dtype: str) -> dict:
    d, cfg = model.dims, model.config
    mc = {
        "type": "QwenConfig", "auto_register": "qwen_config.QwenConfig",
        "batch_size": 1,
        "seq_length": cfg.get("seq_length", 2048),
        "hidden_size": d.hidden,
        "num_layers": d.n_layer,
        "num_heads": d.n_head,
        "vocab_size": d.vocab,
        "intermediate_size": d.intermediate,  # MindFormers' is the width of w1 / w3, half of config.json's
        "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-6),
        "theta": float(cfg.get("rotary_emb_base", 10000)),
        "emb_dropout_prob": 0.0,
        "eos_token_id": cfg.get("eos_token_id", 151643),
        "pad_token_id": cfg.get("pad_token_id", 151643),
        "compute_dtype": ms_dtype,
        "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
        "rotary_dtype": "float32",
        "param_init_type": ms_dtype,
    }
    mc.update({k: cfg[k] for k in _COPIED if k in cfg})
    return mc


def to_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    """The model block of research/qwen/qwen_7b/predict_qwen_7b.yaml or, for Qwen-VL,
    research/qwenvl/qwenvl_9.6b/predict_qwenvl_9.6b.yaml, filled in."""
    ms_dtype = MS_DTYPE_NAMES.get(dtype, "float32")
    llm = _llm_config(model, ms_dtype)
    record = {"weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}
    visual = model.config.get("visual")
    if not visual:
        return {"model": {"model_config": llm, "arch": {"type": "QwenForCausalLM",
                                                        "auto_register": "qwen_model.QwenForCausalLM"}}, **record}
    s, image_start = visual_sizes(visual), visual.get("image_start_id", 151857)
    vc = {"type": "QwenVLVisionConfig", "auto_register": "qwenvl_config.QwenVLVisionConfig",
          **{m: visual[h] for h, m in _VISUAL.items()}, "intermediate_size": s["mlp"], "mlp_ratio": visual["mlp_ratio"],
          "compute_dtype": ms_dtype, "param_init_type": ms_dtype, "gelu_dtype": "float32"}
    llm.update(auto_register="qwenvl_config.QwenConfig", qkv_concat=layout == "fused")
    mc = {"type": "QwenVLConfig", "auto_register": "qwenvl_config.QwenVLConfig",
          "num_queries": s["queries"], "proj_output_dim": s["out"],
          "image_start_id": image_start, "image_pad_id": image_start + 2,
          "compute_dtype": ms_dtype, "param_init_type": ms_dtype, "softmax_compute_type": "float32",
          "vision_model": {"arch": {"type": "QwenVLVisionModel", "auto_register": "qwenvl_model.QwenVLVisionModel"},
                           "model_config": vc},
          "llm_model": {"arch": {"type": "QwenForCausalLM", "auto_register": "qwen_model.QwenForCausalLM"},
                        "model_config": llm}}
    return {"model": {"model_config": mc, "arch": {"type": "QwenVL", "auto_register": "qwenvl_model.QwenVL"}},
            **record}


def _from_llm(mc: dict) -> dict:
    cfg = {k: mc[k] for k in _COPIED if k in mc}
    cfg.update(
        model_type="qwen", architectures=["QWenLMHeadModel"], tie_word_embeddings=False, no_bias=True,
        hidden_size=mc["hidden_size"], num_hidden_layers=mc["num_layers"], num_attention_heads=mc["num_heads"],
        intermediate_size=2 * mc["intermediate_size"], vocab_size=mc["vocab_size"],
        layer_norm_epsilon=mc.get("rms_norm_eps", 1e-6), seq_length=mc.get("seq_length", 2048),
        rotary_emb_base=mc.get("theta", mc.get("rotary_emb_base", 10000)),
    )
    return cfg


def from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    """A config.json for modeling_qwen.py from a MindFormers qwen or qwenvl yaml, and its layout."""
    mc = data["model"]["model_config"]
    if mc.get("type") != "QwenVLConfig":
        return _from_llm(mc), "separate"
    llm, vc = mc["llm_model"]["model_config"], mc["vision_model"]["model_config"]
    cfg = _from_llm(llm)
    visual = {h: vc[m] for h, m in _VISUAL.items()}
    visual.update(mlp_ratio=vc.get("mlp_ratio") or vc["intermediate_size"] / vc["hidden_size"],
                  image_start_id=mc.get("image_start_id", 151857))
    if mc.get("num_queries", 256) != 256:
        visual["n_queries"] = mc["num_queries"]
    cfg["visual"] = visual
    return cfg, "fused" if llm.get("qkv_concat") else "separate"


NAMES = NameSet(
    title="Qwen and Qwen-VL (first generation)",
    archs=("qwen",), keys=("qwen", "qwenvl"),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_yaml,
    yaml_types=("QwenConfig", "QwenVLConfig"), from_yaml=from_yaml,
)
