"""InternLM (1) and InternLM2 as Shanghai AI Lab publishes them on the Hugging Face Hub
(`trust_remote_code` modeling_internlm.py / modeling_internlm2.py).

InternLM is Llama's names with a `bias` switch for all of q, k, v and o (and no grouped kv heads).
InternLM2 renames everything and fuses q, k and v into one `wqkv` whose rows are grouped per kv
head: [the n_rep q heads of group g, k_g, v_g] for g = 0..n_kv-1.
"""

from __future__ import annotations

from .base import Arch, Dims, standard_dims

L = "model.layers.{l}"


def _dims(cfg: dict, n_kv_key: str | None) -> Dims:
    heads = cfg["num_attention_heads"]
    return standard_dims(cfg, n_kv=(cfg.get(n_kv_key) if n_kv_key else None) or heads,
                         head_dim=cfg["hidden_size"] // heads)


def _model(d: Dims, embed: str, layer: list, head: str) -> list:
    out = [(embed, (d.vocab, d.hidden))]
    for i in range(d.n_layer):
        out += [(name.format(l=i), shape) for name, shape in layer]
    out.append(("model.norm.weight", (d.hidden,)))
    return out if d.tied else out + [(head, (d.vocab, d.hidden))]


def _linear(name: str, out: int, inp: int, bias: bool) -> list:
    return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if bias else [])


def _internlm_tensors(d: Dims, cfg: dict) -> list:
    """In modeling_internlm.py's module order, which is the order its state_dict() has."""
    E, I, bias = d.hidden, d.intermediate, bool(cfg.get("bias", True))
    layer = [t for p in "qkvo" for t in _linear(f"{L}.self_attn.{p}_proj", E, E, bias)]
    layer += [(f"{L}.mlp.gate_proj.weight", (I, E)), (f"{L}.mlp.down_proj.weight", (E, I)),
              (f"{L}.mlp.up_proj.weight", (I, E)),
              (f"{L}.input_layernorm.weight", (E,)), (f"{L}.post_attention_layernorm.weight", (E,))]
    return _model(d, "model.embed_tokens.weight", layer, "lm_head.weight")


def _internlm2_tensors(d: Dims, cfg: dict) -> list:
    """In modeling_internlm2.py's module order, which is the order its state_dict() has."""
    E, I, bias = d.hidden, d.intermediate, bool(cfg.get("bias", False))
    layer = (_linear(f"{L}.attention.wqkv", d.q_rows + 2 * d.kv_rows, E, bias)
             + _linear(f"{L}.attention.wo", E, d.q_rows, bias)
             + [(f"{L}.feed_forward.w1.weight", (I, E)), (f"{L}.feed_forward.w3.weight", (I, E)),
                (f"{L}.feed_forward.w2.weight", (E, I)),
                (f"{L}.attention_norm.weight", (E,)), (f"{L}.ffn_norm.weight", (E,))])
    return _model(d, "model.tok_embeddings.weight", layer, "output.weight")


# internlm-7b's first modeling code, and its dynamic-NTK rotary since, keep inv_freq as a persistent
# buffer; InternLM2's is not persistent
INTERNLM = Arch("internlm", "InternLMForCausalLM", "internlm", "InternLM (1) (Shanghai AI Lab remote code)",
                lambda c: _dims(c, None), _internlm_tensors, (f"{L}.self_attn.rotary_emb.inv_freq",))
INTERNLM2 = Arch("internlm2", "InternLM2ForCausalLM", "internlm2", "InternLM2 / 2.5 (Shanghai AI Lab remote code)",
                 lambda c: _dims(c, "num_key_value_heads"), _internlm2_tensors)

ARCHS = (INTERNLM, INTERNLM2)
