"""Baichuan2 7B and 13B as baichuan-inc publishes them on the Hugging Face Hub (model_type "baichuan",
`trust_remote_code` modeling_baichuan.py): the names MindFormers' baichuan2 converter reads.

Both sizes have the same tensors: q, k and v fused in one W_pack (3·hidden rows, no grouped kv
heads) and an lm_head that is a NormHead (the model normalises its rows on use; stored as is).
7B is rotary, 13B ALiBi; neither saves a position buffer.
"""

from __future__ import annotations

from .base import Arch, Dims, standard_dims

L = "model.layers.{l}"


def _dims(cfg: dict) -> Dims:
    return standard_dims(cfg, tied=False)  # NormHead is its own parameter; no Baichuan2 config ties it


def _tensors(d: Dims, cfg: dict) -> list:
    """In modeling_baichuan.py's module order, which is the order its state_dict() has."""
    E, I = d.hidden, d.intermediate
    layer = [(f"{L}.self_attn.W_pack.weight", (3 * E, E)), (f"{L}.self_attn.o_proj.weight", (E, E)),
             (f"{L}.mlp.gate_proj.weight", (I, E)), (f"{L}.mlp.down_proj.weight", (E, I)),
             (f"{L}.mlp.up_proj.weight", (I, E)),
             (f"{L}.input_layernorm.weight", (E,)), (f"{L}.post_attention_layernorm.weight", (E,))]
    out = [("model.embed_tokens.weight", (d.vocab, E))]
    for i in range(d.n_layer):
        out += [(name.format(l=i), shape) for name, shape in layer]
    return out + [("model.norm.weight", (E,)), ("lm_head.weight", (d.vocab, E))]


# Baichuan (1) 7B, which shares model_type and names, kept its rotary inv_freq as a persistent buffer
BAICHUAN = Arch("baichuan", "BaichuanForCausalLM", "baichuan", "Baichuan2 7B / 13B (baichuan-inc remote code)",
                _dims, _tensors, (f"{L}.self_attn.rotary_emb.inv_freq",))

ARCHS = (BAICHUAN,)
