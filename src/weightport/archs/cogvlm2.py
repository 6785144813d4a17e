"""CogVLM2 as THUDM publishes it on the Hugging Face Hub (`trust_remote_code` modeling_cogvlm.py and
visual.py): a Llama-3 decoder whose layers hold a language expert and, in the image model, a vision
expert beside it; an EVA2-CLIP vision tower and its GLU adapter under `model.vision`.

cogvlm2-llama3-chat-19B (CogVLMForCausalLM) has both experts. cogvlm2-video-llama3-chat and
cogvlm2-llama3-caption (CogVLMVideoForCausalLM) commented the vision expert out, so their layers hold
the language expert alone; the vision tower and adapter are the same in both.

The Hub's CogVLMConfig declares no model_type, so its config.json has none: weightport finds these
architectures by the model_type given here ("cogvlm2", "cogvlm2_video"), which such a config.json
must be given.
"""

from __future__ import annotations

from .base import Arch, Dims, standard_dims

L = "model.layers.{l}"


def _dims(cfg: dict) -> Dims:
    # modeling_cogvlm.py derives head_dim (there is no key) and names its kv heads its own way
    return standard_dims(cfg, n_kv=cfg["num_multi_query_heads"], tied=False)


def _vision(d: Dims, cfg: dict) -> list:
    """visual.py's EVA2CLIPModel in state_dict() order (its own boi/eoi before its submodules)."""
    vc = cfg["vision_config"]
    H, I, E = vc["hidden_size"], vc["intermediate_size"], d.hidden
    V = "model.vision"

    def linear(name, out, inp):
        return [(f"{name}.weight", (out, inp)), (f"{name}.bias", (out,))]

    layer = ([(f"input_layernorm.{w}", (H,)) for w in ("weight", "bias")]
             + linear("attention.query_key_value", 3 * H, H) + linear("attention.dense", H, H)
             + linear("mlp.fc1", I, H) + linear("mlp.fc2", H, I)
             + [(f"post_attention_layernorm.{w}", (H,)) for w in ("weight", "bias")])
    out = [(f"{V}.boi", (1, 1, E)), (f"{V}.eoi", (1, 1, E)),
           (f"{V}.patch_embedding.cls_embedding", (1, H)),
           (f"{V}.patch_embedding.proj.weight", (H, vc["in_channels"], vc["patch_size"], vc["patch_size"])),
           (f"{V}.patch_embedding.proj.bias", (H,)),
           (f"{V}.patch_embedding.position_embedding.weight", (vc["num_positions"], H))]
    for i in range(vc["num_hidden_layers"]):
        out += [(f"{V}.transformer.layers.{i}.{n}", s) for n, s in layer]
    # the GLU maps the (2x2-conv pooled) vision width to the LLM's, with the LLM's intermediate size
    out += [(f"{V}.linear_proj.linear_proj.weight", (E, H)),
            (f"{V}.linear_proj.norm1.weight", (E,)), (f"{V}.linear_proj.norm1.bias", (E,)),
            (f"{V}.linear_proj.dense_h_to_4h.weight", (d.intermediate, E)),
            (f"{V}.linear_proj.gate_proj.weight", (d.intermediate, E)),
            (f"{V}.linear_proj.dense_4h_to_h.weight", (E, d.intermediate)),
            (f"{V}.conv.weight", (H, H, 2, 2)), (f"{V}.conv.bias", (H,))]
    return out


def _tensors(d: Dims, cfg: dict, vision_expert: bool) -> list:
    E, I = d.hidden, d.intermediate
    qkv = d.q_rows + 2 * d.kv_rows
    mlp = lambda e: [(f"mlp.{e}_mlp.{p}_proj.weight", s) for p, s in (("gate", (I, E)), ("up", (I, E)),
                                                                        ("down", (E, I)))]
    layer = ([("self_attn.vision_expert_query_key_value.weight", (qkv, E)),
              ("self_attn.vision_expert_query_key_value.bias", (qkv,)),
              ("self_attn.vision_expert_dense.weight", (E, E))] if vision_expert else [])
    layer += [("self_attn.language_expert_query_key_value.weight", (qkv, E)),
              ("self_attn.language_expert_dense.weight", (E, E))]
    layer += mlp("language") + (mlp("vision") if vision_expert else [])
    layer += [("input_layernorm.weight", (E,)), ("post_attention_layernorm.weight", (E,))]
    out = [("model.embed_tokens.weight", (d.vocab, E))]
    for i in range(d.n_layer):
        out += [(f"{L.format(l=i)}.{n}", s) for n, s in layer]
    out.append(("model.norm.weight", (E,)))
    return out + _vision(d, cfg) + [("lm_head.weight", (d.vocab, E))]


# FastRotaryEmbedding keeps inv_freq as a persistent buffer in every layer, so the Hub files carry
# it (the video files do: 8 tensors a layer); the model recomputes it. MindFormers' converter stores
# the first copy as the FreqsMgr parameter below, which its model also computes from the yaml's theta.
_DROPPABLE = (f"{L}.self_attn.rotary_emb.inv_freq", "llm_model.model.freqs_mgr.freqs")

COGVLM2 = Arch("cogvlm2", "CogVLMForCausalLM", "cogvlm2",
               "CogVLM2 image (cogvlm2-llama3-chat-19B; THUDM remote code)",
               _dims, lambda d, cfg: _tensors(d, cfg, vision_expert=True), _DROPPABLE)
COGVLM2_VIDEO = Arch("cogvlm2_video", "CogVLMVideoForCausalLM", "cogvlm2_video",
                     "CogVLM2 video (cogvlm2-video-llama3-chat, cogvlm2-llama3-caption; THUDM remote code)",
                     _dims, lambda d, cfg: _tensors(d, cfg, vision_expert=False), _DROPPABLE)

ARCHS = (COGVLM2, COGVLM2_VIDEO)
