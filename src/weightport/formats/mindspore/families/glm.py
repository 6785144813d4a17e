"""MindFormers' names for ChatGLM2 / ChatGLM3 / GLM-4 (`--model glm-n`, `glm4`): the Hugging Face
names, with the embedding renamed, and q/k/v and the MLP optionally split or rearranged.

Three switches of MindFormers' ChatGLM2Config decide the layout (its convert_weight.py reads them
from the model yaml): `qkv_concat` and `mlp_concat` keep query_key_value / dense_h_to_4h fused
(else wq/wk/wv and dense_left/dense_right), and `use_rearrange_rope` reorders every q and k head's
rows to [even rows, odd rows], so that MindFormers' rotate-half rotary computes what GLM's
interleaved-pair rotary does. Rearranged and plain files have the same names and shapes; only
the yaml tells them apart.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....ops import Chain, Concat, Identity, Invert, Parallel, RotaryPermute, Split
from ....rules import Rule, expand, rename
from .base import MS_DTYPE_NAMES, NameSet

# layout -> (qkv_concat and mlp_concat, use_rearrange_rope)
_SWITCHES = {
    "fused": (True, False),
    "fused-rearranged": (True, True),
    "separate": (False, False),
    "separate-rearranged": (False, True),
}
LAYOUTS = {
    "fused": "query_key_value and dense_h_to_4h as Hugging Face stores them (qkv_concat, mlp_concat; "
             "MindFormers' ChatGLM2Config defaults, and all MindFormers <= 1.3 files)",
    "fused-rearranged": "fused, q/k head rows reordered even-then-odd (use_rearrange_rope)",
    "separate": "wq/wk/wv and dense_left (gate) / dense_right (up) (qkv_concat and mlp_concat false)",
    "separate-rearranged": "separate, q/k head rows reordered even-then-odd (use_rearrange_rope)",
}

L = "transformer.encoder.layers.{l}"
_QKV = f"{L}.self_attention.query_key_value"
_H_TO_4H = f"{L}.mlp.dense_h_to_4h"
_LAYER_ORDER = [f"{m}.{w}" for m in ("input_layernorm", "self_attention.query_key_value", "self_attention.dense",
                                     "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
                for w in ("weight", "bias")]


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    d = model.dims
    concat, rearrange = _SWITCHES[layout]
    sizes = (d.q_rows, d.kv_rows, d.kv_rows)
    # MindFormers' rearrange_w/_b: head rows [0, 2, 4, ..., 1, 3, 5, ...], the inverse of
    # the rotate-half -> interleaved permutation
    heads = Parallel((Invert(RotaryPermute(d.n_head, d.head_dim)), Invert(RotaryPermute(d.n_kv, d.head_dim)),
                      Identity())) if rearrange else None
    out = [rename("transformer.embedding.word_embeddings.weight", "transformer.embedding.embedding_weight")]
    for name, _ in model.arch.tensors(d, model.config):
        if name.startswith("transformer.encoder.layers."):
            template = f"{L}." + name.removeprefix("transformer.encoder.layers.").split(".", 1)[1]
            if name.startswith("transformer.encoder.layers.0.") and not template.startswith((_QKV, _H_TO_4H)):
                out.append(rename(template, template))
        elif name != "transformer.embedding.word_embeddings.weight":
            out.append(rename(name, name))
    for w in ("weight", "bias"):
        qkv, h_to_4h = f"{_QKV}.{w}", f"{_H_TO_4H}.{w}"
        parts = [f"{L}.self_attention.{p}.{w}" for p in ("wq", "wk", "wv")]
        if concat:
            op = Chain((Split(sizes), heads, Concat(sizes))) if rearrange else Identity()
            out += [Rule(qkv, qkv, op), rename(h_to_4h, h_to_4h)]
        else:
            op = Chain((Split(sizes), heads)) if rearrange else Split(sizes)
            out += [Rule(qkv, parts, op),
                    Rule(h_to_4h, (f"{L}.mlp.dense_left.{w}", f"{L}.mlp.dense_right.{w}"),
                         Split((d.intermediate, d.intermediate)))]
    return expand(out, d.n_layer, 0, set(model.hub_tensors()))


def write_order(name: str, layout: str) -> tuple:
    """MindFormers' converter writes the q/k/v it split or rearranged first, then the MLP halves it
    split, then everything else in state_dict() order."""
    concat, rearrange = _SWITCHES[layout]
    if name.startswith("transformer.encoder.layers."):
        layer, rest = name.removeprefix("transformer.encoder.layers.").split(".", 1)
        module, w = rest.rsplit(".", 1)
        wi = ("weight", "bias").index(w)
        if module in ("self_attention.wq", "self_attention.wk", "self_attention.wv") or (
                module == "self_attention.query_key_value" and rearrange):
            return (0, int(layer), wi, ("wq", "wk", "wv", "query_key_value").index(module.rsplit(".", 1)[1]))
        if module in ("mlp.dense_left", "mlp.dense_right"):
            return (1, int(layer), wi, module)
        return (2, 1, int(layer), _LAYER_ORDER.index(rest))
    top = ["transformer.embedding.embedding_weight", "transformer.rotary_pos_emb.inv_freq"]
    return (2, 0, top.index(name)) if name in top else (2, 2, name != "transformer.encoder.final_layernorm.weight", name)


def check(model: Model) -> None:
    pass  # ChatGLM2Config has a switch for every option of modeling_chatglm.py's config


_CONFIG_KEYS = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                "num_attention_heads", "seq_length", "layernorm_epsilon", "rope_ratio", "rmsnorm",
                "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear", "add_qkv_bias",
                "multi_query_attention", "multi_query_group_num", "eos_token_id", "pad_token_id")


def to_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    concat, rearrange = _SWITCHES[layout]
    mc = {"type": "ChatGLM2Config", "batch_size": 1}
    mc.update({k: model.config[k] for k in _CONFIG_KEYS if k in model.config})
    mc.update(qkv_concat=concat, mlp_concat=concat, use_rearrange_rope=rearrange,
              compute_dtype=MS_DTYPE_NAMES.get(dtype, "float32"), param_init_type=MS_DTYPE_NAMES.get(dtype, "float32"))
    return {"model": {"model_config": mc, "arch": {"type": "ChatGLM2ForConditionalGeneration"}},
            "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}


def from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    """A config.json for modeling_chatglm.py from a MindFormers glm yaml, and the layout it implies."""
    mc = data["model"]["model_config"]
    cfg = {k: mc[k] for k in _CONFIG_KEYS if k in mc}
    cfg.update(model_type="chatglm", architectures=["ChatGLMModel"], tie_word_embeddings=False)
    qkv, mlp = mc.get("qkv_concat", True), mc.get("mlp_concat", True)
    if qkv != mlp:
        return cfg, None  # a mixed file; the names decide and the plan reports what is unclaimed
    name = ("fused" if qkv else "separate") + ("-rearranged" if mc.get("use_rearrange_rope") else "")
    return cfg, name


NAMES = NameSet(
    title="ChatGLM2 / ChatGLM3 / GLM-4",
    archs=("chatglm",), keys=("glm-n", "glm4"),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_yaml,
    read_preference=("fused", "separate"),
    yaml_types=("ChatGLM2Config",), from_yaml=from_yaml,
)
