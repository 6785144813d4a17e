"""ChatGLM2 / ChatGLM3 / GLM-4 as THUDM publishes them on the Hugging Face Hub (model_type
"chatglm", `trust_remote_code` modeling_chatglm.py): the names MindFormers' glm-n converter reads.

transformers' own GLM port (model_type "glm") renames everything, so it is not this architecture.
"""

from __future__ import annotations

from .base import Arch, Dims

L = "transformer.encoder.layers.{l}"


def _dims(cfg: dict) -> Dims:
    heads = cfg["num_attention_heads"]
    groups = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else heads
    return Dims(
        n_layer=cfg["num_layers"],
        hidden=cfg["hidden_size"],
        n_head=heads,
        n_kv=groups,
        head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
        intermediate=cfg["ffn_hidden_size"],
        vocab=cfg["padded_vocab_size"],
        tied=False,
    )


def _tensors(d: Dims, cfg: dict) -> list:
    """In modeling_chatglm.py's module order, which is the order its state_dict() has."""
    E, I = d.hidden, d.intermediate
    layer_norm_bias = not cfg.get("rmsnorm", True)
    linear_bias = bool(cfg.get("add_bias_linear", False))
    qkv_bias = linear_bias or bool(cfg.get("add_qkv_bias", False))
    qkv = d.q_rows + 2 * d.kv_rows

    def norm(name):
        return [(f"{name}.weight", (E,))] + ([(f"{name}.bias", (E,))] if layer_norm_bias else [])

    def linear(name, out, inp, bias):
        return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if bias else [])

    layer = (norm(f"{L}.input_layernorm")
             + linear(f"{L}.self_attention.query_key_value", qkv, E, qkv_bias)
             + linear(f"{L}.self_attention.dense", E, d.q_rows, linear_bias)
             + norm(f"{L}.post_attention_layernorm")
             + linear(f"{L}.mlp.dense_h_to_4h", 2 * I, E, linear_bias)
             + linear(f"{L}.mlp.dense_4h_to_h", E, I, linear_bias))
    out = [("transformer.embedding.word_embeddings.weight", (d.vocab, E))]
    for i in range(d.n_layer):
        out += [(name.format(l=i), shape) for name, shape in layer]
    if cfg.get("post_layer_norm", True):
        out += norm("transformer.encoder.final_layernorm")
    out.append(("transformer.output_layer.weight", (d.vocab, E)))
    return out


# the rotary cache is a persistent buffer in modeling_chatglm.py, so saved files carry it;
# the model recomputes it from the config
CHATGLM = Arch("chatglm", "ChatGLMModel", "chatglm", "ChatGLM2 / ChatGLM3 / GLM-4 (THUDM remote code)",
               _dims, _tensors, ("transformer.rotary_pos_emb.inv_freq",))

ARCHS = (CHATGLM,)
