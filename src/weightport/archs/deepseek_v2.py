"""DeepSeek-V2 / V2-Lite (and V2.5): multi-head latent attention and a DeepSeekMoE block.

Hub names are what transformers >= 5 saves and what DeepSeek's released checkpoints hold: one
tensor per routed expert (transformers fuses them on load and splits them again on save).
"""

from __future__ import annotations

from ..errors import WeightportError
from .base import Arch, Dims, standard_dims

L = "model.layers.{l}"


def _dims(cfg: dict) -> Dims:
    # DeepSeek's own modeling code makes only every moe_layer_freq-th layer MoE; transformers
    # ignores the key, so such a checkpoint would load into a different network
    if cfg.get("moe_layer_freq", 1) != 1:
        raise WeightportError(f"DeepSeek-V2 with moe_layer_freq={cfg['moe_layer_freq']} is not supported "
                              "(transformers makes every layer from first_k_dense_replace on MoE)")
    # head_dim is the query/key head; values are v_head_dim wide and the rotary part qk_rope_head_dim
    return standard_dims(cfg, head_dim=cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
                         n_expert=cfg["n_routed_experts"])


def _mlp(prefix: str, hidden: int, inter: int, bias: bool) -> list:
    t = []
    for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
        t.append((f"{prefix}.{proj}_proj.weight", shape))
        if bias:
            t.append((f"{prefix}.{proj}_proj.bias", shape[:1]))
    return t


def _tensors(d: Dims, cfg: dict) -> list:
    E, H = d.hidden, d.n_head
    q_rank, kv_rank = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
    rope, nope, v = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    moe_inter = cfg["moe_intermediate_size"]
    attn_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
    first_moe = cfg.get("first_k_dense_replace") or 0

    attn = []
    if q_rank:
        attn += [("q_a_proj.weight", (q_rank, E))] + ([("q_a_proj.bias", (q_rank,))] if attn_bias else [])
        attn += [("q_a_layernorm.weight", (q_rank,)), ("q_b_proj.weight", (d.q_rows, q_rank))]
    else:
        attn.append(("q_proj.weight", (d.q_rows, E)))
    attn.append(("kv_a_proj_with_mqa.weight", (kv_rank + rope, E)))
    if attn_bias:
        attn.append(("kv_a_proj_with_mqa.bias", (kv_rank + rope,)))
    attn += [("kv_a_layernorm.weight", (kv_rank,)), ("kv_b_proj.weight", (H * (nope + v), kv_rank)),
             ("o_proj.weight", (E, H * v))]
    if attn_bias:
        attn.append(("o_proj.bias", (E,)))

    out = [("model.embed_tokens.weight", (d.vocab, E))]
    for i in range(d.n_layer):
        p = L.format(l=i)
        out.append((f"{p}.input_layernorm.weight", (E,)))
        out += [(f"{p}.self_attn.{n}", s) for n, s in attn]
        out.append((f"{p}.post_attention_layernorm.weight", (E,)))
        if i < first_moe:
            out += _mlp(f"{p}.mlp", E, d.intermediate, mlp_bias)
            continue
        out.append((f"{p}.mlp.gate.weight", (d.n_expert, E)))
        for e in range(d.n_expert):  # fused 3-D expert tensors in transformers carry no bias
            out += _mlp(f"{p}.mlp.experts.{e}", E, moe_inter, False)
        out += _mlp(f"{p}.mlp.shared_experts", E, moe_inter * cfg["n_shared_experts"], mlp_bias)
    out.append(("model.norm.weight", (E,)))
    if not d.tied:
        out.append(("lm_head.weight", (d.vocab, E)))
    return out


DEEPSEEK_V2 = Arch("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek_v2", "DeepSeek-V2 / V2-Lite / V2.5 (MLA, MoE)",
                   _dims, _tensors, (f"{L}.self_attn.rotary_emb.inv_freq",))
