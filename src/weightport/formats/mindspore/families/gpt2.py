"""MindFormers' GPT-2 names (mindformers/models/gpt2, `--model gpt`; removed from MindFormers in 2025).

Its blocks are the old mindformers.modules TransformerEncoderLayer: q, k and v are Linear layers
with (out, in) weights, so the Conv1D c_attn is split along its output (last) dim and each part
transposed; the attention output projection and both MLP layers keep Conv1D's (in, out). Only
the square attention projection could be transposed wrongly without a shape error.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....errors import WeightportError
from ....ops import Chain, Each, Split, Transpose
from ....rules import Rule, expand, renames
from .base import MS_DTYPE_NAMES, NameSet

LAYOUTS = {"separate": "q, k, v split out of c_attn as attention.dense1/2/3 with (out, in) weights, the other "
                       "projections kept (in, out) (MindFormers' gpt2 convert_weight)"}

H, M = "transformer.h.{l}", "backbone.blocks.{l}"


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    E = model.dims.hidden
    out = renames({
        "transformer.wte.weight": "backbone.embedding.word_embedding.embedding_table",
        "transformer.wpe.weight": "backbone.embedding.position_embedding.embedding_table",
        "transformer.ln_f.weight": "backbone.layernorm.gamma",
        "transformer.ln_f.bias": "backbone.layernorm.beta",
        **{f"{H}.{h}.{w}": f"{M}.{m}.{g}" for h, m in (("ln_1", "layernorm1"), ("ln_2", "layernorm2"))
           for w, g in (("weight", "gamma"), ("bias", "beta"))},
        **{f"{H}.{h}.{w}": f"{M}.{m}.{w}" for h, m in (("attn.c_proj", "attention.projection"),
                                                     ("mlp.c_fc", "output.mapping"),
                                                     ("mlp.c_proj", "output.projection"))
           for w in ("weight", "bias")},
    })
    qkv = [f"{M}.attention.dense{i}" for i in (1, 2, 3)]
    split_transpose = Chain((Split((E, E, E), dim=1), Each(Transpose(), 3)))
    out += [Rule(f"{H}.attn.c_attn.weight", [f"{n}.weight" for n in qkv], split_transpose),
            Rule(f"{H}.attn.c_attn.bias", [f"{n}.bias" for n in qkv], Split((E, E, E)))]
    return expand(out, model.dims.n_layer, 0, set(model.hub_tensors()))


# MindFormers' converter writes each layer in this order, then the final norm and the embeddings
_LAYER_ORDER = ["layernorm1.gamma", "layernorm1.beta", "layernorm2.gamma", "layernorm2.beta",
                "attention.projection.weight", "attention.projection.bias"] + [
    f"attention.dense{i}.{w}" for w in ("weight", "bias") for i in (1, 2, 3)] + [
    f"output.{p}.{w}" for p in ("mapping", "projection") for w in ("weight", "bias")]
_TAIL = ["backbone.layernorm.gamma", "backbone.layernorm.beta", "backbone.embedding.word_embedding.embedding_table",
         "backbone.embedding.position_embedding.embedding_table"]


def write_order(name: str, layout: str = "separate") -> tuple:
    if name.startswith("backbone.blocks."):
        layer, rest = name.removeprefix("backbone.blocks.").split(".", 1)
        return (0, int(layer), _LAYER_ORDER.index(rest))
    return (1, _TAIL.index(name)) if name in _TAIL else (2,)


# Hugging Face activation -> MindSpore's by name: MindSpore's "gelu" is the tanh approximation
# (exact erf GELU has no name there) and its "fast_gelu" is x * sigmoid(1.702 x)
_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "quick_gelu": "fast_gelu",
        "relu": "relu", "silu": "silu", "tanh": "tanh"}


def check(model: Model) -> None:
    d, cfg = model.dims, model.config
    problems = []
    if not d.tied:
        problems.append("has no lm_head of its own (it scores with the word embedding; tie_word_embeddings is false)")
    if d.intermediate % d.hidden:
        problems.append(f"sizes its MLP as hidden_size x an integer expand_ratio; n_inner={d.intermediate} is not "
                        f"a multiple of n_embd={d.hidden}")
    if cfg.get("activation_function", "gelu_new") not in _ACT:
        problems.append(f"has no activation {cfg['activation_function']!r} (supported: {', '.join(_ACT)})")
    if cfg.get("layer_norm_epsilon", 1e-5) != 1e-5:
        problems.append(f"fixes LayerNorm epsilon at 1e-5; this model uses {cfg['layer_norm_epsilon']}")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx"):
        problems.append("always scales attention by 1/sqrt(head_dim) (scale_attn_weights, "
                        "scale_attn_by_inverse_layer_idx)")
    if problems:
        raise WeightportError("MindFormers' GPT-2 " + "; it ".join(problems))


def to_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    """The model block of MindFormers' configs/gpt2/run_gpt2.yaml, filled in."""
    d, cfg = model.dims, model.config
    ms_dtype = MS_DTYPE_NAMES.get(dtype, "float32")
    mc = {
        "type": "GPT2Config",
        "batch_size": 1,
        # the position table has seq_length rows, so it must be the checkpoint's n_positions
        "seq_length": cfg["n_positions"],
        "vocab_size": d.vocab,
        "hidden_size": d.hidden,
        "num_layers": d.n_layer,
        "num_heads": d.n_head,
        "expand_ratio": d.intermediate // d.hidden,
        "hidden_act": _ACT.get(cfg.get("activation_function", "gelu_new"), "gelu"),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "param_init_type": ms_dtype,
        "compute_dtype": ms_dtype,
        "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
        "max_decode_length": cfg["n_positions"],
    }
    return {"model": {"model_config": mc, "arch": {"type": "GPT2LMHeadModel"}},
            "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}


NAMES = NameSet(
    title="GPT-2",
    archs=("gpt2",),
    keys=("gpt",),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_yaml,
)
