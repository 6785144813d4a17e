"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm with biases, and Conv1D projections.

Conv1D stores weights (in, out), the transpose of nn.Linear, and the hub keeps them that way:
hub names and shapes are exactly what transformers saves.
"""

from __future__ import annotations

from ..errors import WeightportError
from .base import Arch, Dims

L = "transformer.h.{l}"


def _dims(cfg: dict) -> Dims:
    # cross-attention adds tensors (crossattention.*, ln_cross_attn) this declaration has no place for
    if cfg.get("add_cross_attention"):
        raise WeightportError("GPT-2 with cross-attention (add_cross_attention) is not supported")
    E, heads = cfg["n_embd"], cfg["n_head"]
    return Dims(n_layer=cfg["n_layer"], hidden=E, n_head=heads, n_kv=heads, head_dim=E // heads,
                intermediate=cfg.get("n_inner") or 4 * E, vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", True)))


def _tensors(d: Dims, cfg: dict) -> list:
    E, I = d.hidden, d.intermediate
    layer = [("ln_1.weight", (E,)), ("ln_1.bias", (E,)),
             ("attn.c_attn.weight", (E, 3 * E)), ("attn.c_attn.bias", (3 * E,)),
             ("attn.c_proj.weight", (E, E)), ("attn.c_proj.bias", (E,)),
             ("ln_2.weight", (E,)), ("ln_2.bias", (E,)),
             ("mlp.c_fc.weight", (E, I)), ("mlp.c_fc.bias", (I,)),
             ("mlp.c_proj.weight", (I, E)), ("mlp.c_proj.bias", (E,))]
    out = [("transformer.wte.weight", (d.vocab, E)), ("transformer.wpe.weight", (cfg["n_positions"], E))]
    for i in range(d.n_layer):
        out += [(f"{L.format(l=i)}.{n}", s) for n, s in layer]
    out += [("transformer.ln_f.weight", (E,)), ("transformer.ln_f.bias", (E,))]
    if not d.tied:
        out.append(("lm_head.weight", (d.vocab, E)))
    return out


# older transformers saved the causal-mask buffers (attn.bias, attn.masked_bias); a tied lm_head
# saved from state_dict() is the embedding again, and transformers re-ties it on load (an untied
# one is a hub tensor, so never dropped)
GPT2 = Arch("gpt2", "GPT2LMHeadModel", "gpt2", "GPT-2, DistilGPT-2", _dims, _tensors,
            (f"{L}.attn.bias", f"{L}.attn.masked_bias", "lm_head.weight"), aliases=(("transformer.", ""),))
