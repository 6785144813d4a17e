"""Llama and its close relatives: Llama 2/3/3.x, Mistral, Mixtral, Qwen2/2.5, Phi-3, Gemma.

They share one block (RMSNorm, rotary attention with grouped KV heads, gated MLP); what
differs is declared per architecture below: biases, fused projections, experts, tying.
"""

from __future__ import annotations

from .base import Arch, Dims, standard_dims

L = "model.layers.{l}"


def _dims(cfg: dict, *, tied_default: bool = False, experts_key: str | None = None) -> Dims:
    return standard_dims(cfg, n_expert=cfg.get(experts_key, 0) if experts_key else 0,
                         tied=bool(cfg.get("tie_word_embeddings", tied_default)))


def _layer_tensors(d: Dims, *, qkv_bias=False, o_bias=False, mlp_bias=False, fused=False, moe=False):
    E, I = d.hidden, d.intermediate
    t = [(f"{L}.input_layernorm.weight", (E,))]
    if fused:
        t.append((f"{L}.self_attn.qkv_proj.weight", (d.q_rows + 2 * d.kv_rows, E)))
    else:
        for proj, rows in (("q", d.q_rows), ("k", d.kv_rows), ("v", d.kv_rows)):
            t.append((f"{L}.self_attn.{proj}_proj.weight", (rows, E)))
            if qkv_bias:
                t.append((f"{L}.self_attn.{proj}_proj.bias", (rows,)))
    t.append((f"{L}.self_attn.o_proj.weight", (E, d.q_rows)))
    if o_bias:
        t.append((f"{L}.self_attn.o_proj.bias", (E,)))
    t.append((f"{L}.post_attention_layernorm.weight", (E,)))
    if moe:
        t.append((f"{L}.block_sparse_moe.gate.weight", (d.n_expert, E)))
        for e in range(d.n_expert):
            x = f"{L}.block_sparse_moe.experts.{e}"
            t += [(f"{x}.w1.weight", (I, E)), (f"{x}.w2.weight", (E, I)), (f"{x}.w3.weight", (I, E))]
    elif fused:
        t += [(f"{L}.mlp.gate_up_proj.weight", (2 * I, E)), (f"{L}.mlp.down_proj.weight", (E, I))]
    else:
        for proj, shape, bias in (("gate", (I, E), (I,)), ("up", (I, E), (I,)), ("down", (E, I), (E,))):
            t.append((f"{L}.mlp.{proj}_proj.weight", shape))
            if mlp_bias:
                t.append((f"{L}.mlp.{proj}_proj.bias", bias))
    return t


def _model_tensors(d: Dims, layer: list) -> list:
    out = [("model.embed_tokens.weight", (d.vocab, d.hidden))]
    for i in range(d.n_layer):
        out += [(name.format(l=i), shape) for name, shape in layer]
    out.append(("model.norm.weight", (d.hidden,)))
    if not d.tied:
        out.append(("lm_head.weight", (d.vocab, d.hidden)))
    return out


def _llama_tensors(d, cfg):
    bias = bool(cfg.get("attention_bias"))
    return _model_tensors(d, _layer_tensors(d, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias"))))


def _plain_tensors(d, cfg):
    return _model_tensors(d, _layer_tensors(d))


def _qwen2_tensors(d, cfg):
    return _model_tensors(d, _layer_tensors(d, qkv_bias=True))


def _phi3_tensors(d, cfg):
    return _model_tensors(d, _layer_tensors(d, fused=True))


def _mixtral_tensors(d, cfg):
    return _model_tensors(d, _layer_tensors(d, moe=True))


# checkpoints written by older transformers versions carry the rotary cache as a buffer
_INV_FREQ = (f"{L}.self_attn.rotary_emb.inv_freq",)

LLAMA = Arch("llama", "LlamaForCausalLM", "llama", "Llama 2 / 3 / 3.1 / 3.2, CodeLlama",
             _dims, _llama_tensors, _INV_FREQ)
MISTRAL = Arch("mistral", "MistralForCausalLM", "mistral", "Mistral", _dims, _plain_tensors, _INV_FREQ)
MIXTRAL = Arch("mixtral", "MixtralForCausalLM", "mixtral", "Mixtral (MoE)",
               lambda c: _dims(c, experts_key="num_local_experts"), _mixtral_tensors, _INV_FREQ)
QWEN2 = Arch("qwen2", "Qwen2ForCausalLM", "qwen2", "Qwen2 / Qwen2.5", _dims, _qwen2_tensors, _INV_FREQ)
PHI3 = Arch("phi3", "Phi3ForCausalLM", "phi3", "Phi-3 (fused qkv_proj, gate_up_proj)", _dims, _phi3_tensors, _INV_FREQ)
GEMMA = Arch("gemma", "GemmaForCausalLM", "gemma", "Gemma (1)",
             lambda c: _dims(c, tied_default=True), _plain_tensors, _INV_FREQ)

ARCHS = (LLAMA, MISTRAL, MIXTRAL, QWEN2, PHI3, GEMMA)
NAMES = tuple(a.name for a in ARCHS)
