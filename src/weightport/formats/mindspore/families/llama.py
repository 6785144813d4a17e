"""MindFormers' LlamaForCausalLM names, which also run Qwen2 (q/k/v biases) and Mixtral (stacked
experts); Yi, CodeLlama and DeepSeek-Coder are Llama checkpoints.

Three layouts of attention and MLP weights exist, and the fused two have identical shapes, so a
wrong guess loads and computes garbage: the layout is a documented option, recorded on write
and, where the names tell, detected on read.
"""

from __future__ import annotations

from ....archs import Model
from ....errors import WeightportError
from ....ops import Chain, Concat, Each, GroupInterleave, Stack, Tie, Transpose
from ....rules import Rule, expand, rename
from .base import NameSet
from .llama_config import from_yaml, to_mindformers

LAYOUTS = {
    "separate": "wq/wk/wv and w1/w3 stored separately (MindFormers' convert_weight default)",
    "fused": "w_qkv = cat(wq, wk, wv), w_gate_hidden = cat(w1, w3) (qkv_concat, MindFormers <= 1.3)",
    "fused-interleaved": "w_qkv grouped per kv head [q.., k, v], w_gate_hidden rows alternating gate/up "
                         "(qkv_concat, MindFormers >= 1.5)",
    "gmm": "separate, with Mixtral's stacked experts transposed to (experts, in, out) (use_gmm)",
}

L = "model.layers.{l}"


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    """MindFormers' converter saves lm_head even when tied (from state_dict()), so we write it
    too; a tied checkpoint without it reads as well."""
    d = model.dims
    qkv = (d.q_rows, d.kv_rows, d.kv_rows)
    gate_up = (d.intermediate, d.intermediate)
    tied_head_stored = stored is None or "lm_head.weight" in stored
    out = [
        Rule("model.embed_tokens.weight", ("model.tok_embeddings.embedding_weight", "lm_head.weight"), Tie())
        if d.tied and tied_head_stored else rename("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
        rename("lm_head.weight", "lm_head.weight"),
        rename("model.norm.weight", "model.norm_out.weight"),
        rename(f"{L}.input_layernorm.weight", f"{L}.attention_norm.weight"),
        rename(f"{L}.post_attention_layernorm.weight", f"{L}.ffn_norm.weight"),
        rename(f"{L}.self_attn.o_proj.weight", f"{L}.attention.wo.weight"),
        rename(f"{L}.block_sparse_moe.gate.weight", f"{L}.feed_forward.router.dense.weight"),
    ]
    if layout in ("separate", "gmm"):
        for p in "qkv":
            out += [rename(f"{L}.self_attn.{p}_proj.{w}", f"{L}.attention.w{p}.{w}") for w in ("weight", "bias")]
        out += [rename(f"{L}.mlp.gate_proj.weight", f"{L}.feed_forward.w1.weight"),
                rename(f"{L}.mlp.up_proj.weight", f"{L}.feed_forward.w3.weight")]
    else:
        interleaved = layout == "fused-interleaved"
        fuse_qkv = Chain((Concat(qkv), GroupInterleave(qkv, d.n_kv))) if interleaved else Concat(qkv)
        fuse_mlp = Chain((Concat(gate_up), GroupInterleave(gate_up, d.intermediate))) if interleaved else Concat(gate_up)
        out += [Rule([f"{L}.self_attn.{p}_proj.{w}" for p in "qkv"], f"{L}.attention.w_qkv.{w}", fuse_qkv)
                for w in ("weight", "bias")]
        out.append(Rule([f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"],
                        f"{L}.feed_forward.w_gate_hidden.weight", fuse_mlp))
    out.append(rename(f"{L}.mlp.down_proj.weight", f"{L}.feed_forward.w2.weight"))
    # MindFormers stacks the experts of a layer into one (experts, out, in) tensor per matrix;
    # its grouped-matmul kernel wants (experts, in, out)
    if layout == "gmm" and not d.n_expert:
        raise WeightportError("layout gmm is for mixture-of-experts models; this model has no experts")
    stack = Chain((Each(Transpose(), d.n_expert), Stack(d.n_expert))) if layout == "gmm" else Stack(d.n_expert)
    for m in ("w1", "w2", "w3"):
        experts = [f"{L}.block_sparse_moe.experts.{e}.{m}.weight" for e in range(d.n_expert)]
        if experts:
            out.append(Rule(experts, f"{L}.feed_forward.ffn.{m}.weight", stack))
    return expand(out, d.n_layer, 0, set(model.hub_tensors()))


_LAYER_ORDER = [f"{p}.{w}" for p in ("attention.wq", "attention.wk", "attention.wv", "attention.w_qkv")
                for w in ("weight", "bias")] + [
    "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w_gate_hidden.weight",
    "feed_forward.w2.weight", "feed_forward.router.dense.weight", "feed_forward.ffn.w1.weight",
    "feed_forward.ffn.w2.weight", "feed_forward.ffn.w3.weight", "attention_norm.weight", "ffn_norm.weight"]


def write_order(name: str, layout: str) -> tuple:
    """The order MindFormers' converter writes (the HF state_dict's), so files can match byte for byte."""
    if name.startswith("model.layers."):
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        return (1, int(layer), _LAYER_ORDER.index(rest))
    return {"model.tok_embeddings.embedding_weight": (0,), "model.norm_out.weight": (2,)}.get(name, (3,))


def check(model: Model) -> None:
    d, cfg = model.dims, model.config
    if d.head_dim * d.n_head != d.hidden:
        raise WeightportError(f"MindFormers' Llama derives head_dim as hidden_size / num_heads = "
                              f"{d.hidden // d.n_head}, but this model's head_dim is {d.head_dim}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise WeightportError("MindFormers' Llama has no o_proj / MLP biases (attention_bias / mlp_bias)")


NAMES = NameSet(
    title="Llama 2 / 3 / 3.1, CodeLlama, Yi, DeepSeek-Coder, Qwen1.5 / 2 / 2.5, Mixtral",
    archs=("llama", "qwen2", "mixtral"),
    keys=("llama", "codellama", "yi", "deepseek", "qwen2", "qwen2_5", "mixtral"),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_mindformers,
    read_preference=("separate", "fused-interleaved", "fused"),
    key_archs={"llama": ("llama",), "codellama": ("llama",), "yi": ("llama",), "deepseek": ("llama",),
               "qwen2": ("qwen2",), "qwen2_5": ("qwen2",), "mixtral": ("mixtral",)},
    yaml_types=("LlamaConfig",), from_yaml=from_yaml,
)
