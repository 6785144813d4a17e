"""Whisper (WhisperForConditionalGeneration): a speech encoder (two Conv1d layers over mel frames,
then Transformer layers) and a text decoder with cross-attention.

Dims describe the decoder, the part that scores tokens; the encoder's sizes (encoder_layers,
encoder_attention_heads, encoder_ffn_dim) and the input sizes are read from the config here.
The encoder's position table is a parameter (sinusoids, frozen), saved in every checkpoint.
"""

from __future__ import annotations

from .base import Arch, Dims

ENC, DEC = "model.encoder", "model.decoder"


def _dims(cfg: dict) -> Dims:
    E, heads = cfg["d_model"], cfg["decoder_attention_heads"]
    return Dims(n_layer=cfg["decoder_layers"], hidden=E, n_head=heads, n_kv=heads, head_dim=E // heads,
                intermediate=cfg["decoder_ffn_dim"], vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", True)))


def _tensors(d: Dims, cfg: dict) -> list:
    """In state_dict() order."""
    E = d.hidden

    def linear(name, out, inp, bias=True):
        return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if bias else [])

    def norm(name):
        return [(f"{name}.weight", (E,)), (f"{name}.bias", (E,))]

    def attention(name):  # k_proj has no bias in Whisper
        return (linear(f"{name}.k_proj", E, E, bias=False) + linear(f"{name}.v_proj", E, E)
                + linear(f"{name}.q_proj", E, E) + linear(f"{name}.out_proj", E, E))

    def mlp(prefix, inner):
        return (linear(f"{prefix}.fc1", inner, E) + linear(f"{prefix}.fc2", E, inner)
                + norm(f"{prefix}.final_layer_norm"))

    out = [(f"{ENC}.conv1.weight", (E, cfg["num_mel_bins"], 3)), (f"{ENC}.conv1.bias", (E,)),
           (f"{ENC}.conv2.weight", (E, E, 3)), (f"{ENC}.conv2.bias", (E,)),
           (f"{ENC}.embed_positions.weight", (cfg["max_source_positions"], E))]
    for i in range(cfg["encoder_layers"]):
        L = f"{ENC}.layers.{i}"
        out += attention(f"{L}.self_attn") + norm(f"{L}.self_attn_layer_norm") + mlp(L, cfg["encoder_ffn_dim"])
    out += norm(f"{ENC}.layer_norm")
    out += [(f"{DEC}.embed_tokens.weight", (d.vocab, E)),
            (f"{DEC}.embed_positions.weight", (cfg["max_target_positions"], E))]
    for i in range(d.n_layer):
        L = f"{DEC}.layers.{i}"
        out += (attention(f"{L}.self_attn") + norm(f"{L}.self_attn_layer_norm") + attention(f"{L}.encoder_attn")
                + norm(f"{L}.encoder_attn_layer_norm") + mlp(L, d.intermediate))
    out += norm(f"{DEC}.layer_norm")
    if not d.tied:
        out.append(("proj_out.weight", (d.vocab, E)))
    return out


# transformers 5 omits the tied proj_out on save; older files (and state_dict()) carry it, and it is
# re-tied to embed_tokens on load (an untied one is a hub tensor, so never dropped)
WHISPER = Arch("whisper", "WhisperForConditionalGeneration", "whisper", "Whisper (speech encoder-decoder)",
               _dims, _tensors, ("proj_out.weight",), causal_lm=False)
