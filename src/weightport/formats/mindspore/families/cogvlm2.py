"""MindFormers' CogVLM2 names (`--model cogvlm2`; mindformers/models/cogvlm2, removed from MindFormers
in June 2025): CogVLM2ImageForCausalLM for the image model, CogVLM2ForCausalLM for the video one.

Names follow MindFormers' cogvlm2 convert_weight.py, whose `--modal` (image, or video by default)
picks how the language model is renamed; here the Hugging Face architecture decides. Both modals
rename the EVA2-CLIP tower to `vision_encoder` (LayerNorms to gamma/beta, the class and position
embeddings given a leading batch dim) and the adapter under `model.vision` to `mlp_adapter`. The
image LLM keeps its Hugging Face names under `llm_model.` (the MLP matrices renamed w1/w3/w2);
the video LLM is MindFormers' Llama, its fused language-expert qkv split into wq/wk/wv. Nothing is
transposed. MindFormers has no reverse converter for it.
"""

from __future__ import annotations

import torch

from ....archs import Model
from ....errors import WeightportError
from ....ops import Split, Stack
from ....rules import Rule, rename
from .base import MS_DTYPE_NAMES, NameSet

LAYOUTS = {"separate": "as MindFormers' cogvlm2 convert_weight writes (--modal image or video, by the "
                       "architecture): no tensor fused or split beyond its renames"}

_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_IMAGE_LAYER = {f"mlp.{e}_mlp.{h}": f"mlp.{e}_mlp.{m}" for e in ("language", "vision") for h, m in _MLP.items()}
_VIDEO_LAYER = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.language_expert_dense": "attention.wo",
                **{f"mlp.language_mlp.{h}": f"feed_forward.{m}" for h, m in _MLP.items()}}
_VISION_LAYER = {"input_layernorm": "norm1", "post_attention_layernorm": "norm2",
                 "attention.query_key_value": "attn.qkv", "attention.dense": "attn.proj"}
_GAMMA_BETA = {"weight": "gamma", "bias": "beta"}
_TOP = {
    "model.embed_tokens.weight": "llm_model.model.tok_embeddings.embedding_weight",
    "model.norm.weight": "llm_model.model.norm_out.weight",
    "lm_head.weight": "llm_model.lm_head.weight",
    "model.vision.patch_embedding.proj.weight": "vision_encoder.patch_embed.proj.weight",
    "model.vision.patch_embedding.proj.bias": "vision_encoder.patch_embed.proj.bias",
    "model.vision.linear_proj.norm1.weight": "mlp_adapter.linear_proj.norm1.gamma",
    "model.vision.linear_proj.norm1.bias": "mlp_adapter.linear_proj.norm1.beta",
}
# (n, H) -> (1, n, H): EVA's cls_token and pos_embed are batch-shaped parameters
_UNSQUEEZED = {"model.vision.patch_embedding.cls_embedding": "vision_encoder.cls_token",
               "model.vision.patch_embedding.position_embedding.weight": "vision_encoder.pos_embed"}


def _rule(name: str, model: Model) -> Rule:
    d, video = model.dims, model.arch.name == "cogvlm2_video"
    if name in _TOP:
        return rename(name, _TOP[name])
    if name in _UNSQUEEZED:
        return Rule(name, _UNSQUEEZED[name], Stack(1))
    if name.startswith("model.layers."):
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        module, w = rest.rsplit(".", 1)
        prefix = f"llm_model.model.layers.{layer}"
        if video and module == "self_attn.language_expert_query_key_value":
            return Rule(name, [f"{prefix}.attention.w{p}.{w}" for p in "qkv"],
                        Split((d.q_rows, d.kv_rows, d.kv_rows)))
        return rename(name, f"{prefix}.{(_VIDEO_LAYER if video else _IMAGE_LAYER).get(module, module)}.{w}")
    if name.startswith("model.vision.transformer.layers."):
        layer, rest = name.removeprefix("model.vision.transformer.layers.").split(".", 1)
        module, w = rest.rsplit(".", 1)
        w = _GAMMA_BETA[w] if module.endswith("layernorm") else w
        return rename(name, f"vision_encoder.blocks.{layer}.{_VISION_LAYER.get(module, module)}.{w}")
    return rename(name, "mlp_adapter." + name.removeprefix("model.vision."))  # linear_proj.*, conv.*, boi, eoi


def rules(model: Model, layout: str, stored: set[str] | None = None) -> list[Rule]:
    return [_rule(name, model) for name, _ in model.arch.tensors(model.dims, model.config)]


_GROUPS = ("llm_model.", "vision_encoder.", "mlp_adapter.")


def write_order(name: str, layout: str = "separate") -> tuple:
    """Language model, vision tower, adapter; layers by number. MindFormers' converter writes in
    the order of its source's shards (each one's names sorted), which no name alone gives; MindSpore's
    loader goes by name."""
    group = next((i for i, g in enumerate(_GROUPS) if name.startswith(g)), len(_GROUPS))
    return (group, *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")))


def check(model: Model) -> None:
    vc = model.config["vision_config"]
    grid = vc["image_size"] // vc["patch_size"]
    # MindFormers' EVA sizes pos_embed from image_size and patch_size, not from num_positions
    if vc["num_positions"] != grid * grid + 1:
        raise WeightportError(f"MindFormers' EVA has (image_size / patch_size)^2 + 1 = {grid * grid + 1} "
                              f"positions, but vision_config.num_positions is {vc['num_positions']}")


_ARCH_TYPES = {"cogvlm2": ("CogVLM2ImageForCausalLM", "LlamaForCausalLMForCogVLM2Image"),
               "cogvlm2_video": ("CogVLM2ForCausalLM", "CogVLM2VideoLM")}


def to_yaml(model: Model, dtype: torch.dtype, layout: str) -> dict:
    """The model block of MindFormers' configs/cogvlm2 predict yamls, filled in."""
    d, cfg, vc = model.dims, model.config, model.config["vision_config"]
    ms_dtype = MS_DTYPE_NAMES.get(dtype, "float32")
    arch, llm_arch = _ARCH_TYPES[model.arch.name]
    vision = {
        "type": "EVA02Config", "image_size": vc["image_size"], "patch_size": vc["patch_size"],
        "num_channels": vc["in_channels"], "hidden_size": vc["hidden_size"],
        "num_hidden_layers": vc["num_hidden_layers"], "num_attention_heads": vc["num_heads"],
        "intermediate_size": vc["intermediate_size"], "layer_norm_eps": vc.get("layer_norm_eps", 1e-6),
        # visual.py's EVA2-CLIP: absolute positions, fused qkv with bias, GELU MLP, norms after each sublayer
        "use_abs_pos_emb": True, "use_rot_pos_emb": False, "use_qkv_fused": True, "use_qkv_simple": True,
        "use_swiglu": False, "use_scale_mlp": False, "use_post_norm": True, "use_attn_norm": False,
        "post_norm": True, "class_token": True, "with_cls_token": False,
        "compute_dtype": ms_dtype, "layer_norm_type": "float32", "param_init_type": ms_dtype,
    }
    llm = {
        "type": "LlamaConfig", "batch_size": 1, "seq_length": cfg.get("max_position_embeddings", 2048),
        "hidden_size": d.hidden, "num_layers": d.n_layer, "num_heads": d.n_head, "n_kv_heads": d.n_kv,
        "vocab_size": d.vocab, "intermediate_size": d.intermediate, "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "theta": 500000,  # modeling_cogvlm.py's FastRotaryEmbedding base, not in config.json
        "compute_dtype": ms_dtype, "param_init_type": ms_dtype, "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
    }
    mc = {"type": "CogVLM2Config", "vision_model": {"arch": {"type": "EVAModel"}, "model_config": vision},
          "llm_model": {"arch": {"type": llm_arch}, "model_config": llm}}
    return {"model": {"model_config": mc, "arch": {"type": arch}},
            "weightport": {"layout": layout, "hf_architecture": model.arch.hf_class}}


def from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    """A config.json for the Hub's modeling_cogvlm.py from a MindFormers cogvlm2 yaml."""
    mc = data["model"]["model_config"]
    v, l = mc["vision_model"]["model_config"], mc["llm_model"]["model_config"]
    video = data["model"]["arch"]["type"] != _ARCH_TYPES["cogvlm2"][0]
    grid = v["image_size"] // v["patch_size"]
    cfg = {
        "architectures": ["CogVLMVideoForCausalLM" if video else "CogVLMForCausalLM"],
        "model_type": "cogvlm2_video" if video else "cogvlm2",
        "hidden_size": l["hidden_size"], "intermediate_size": l["intermediate_size"],
        "num_hidden_layers": l["num_layers"], "num_attention_heads": l["num_heads"],
        "num_multi_query_heads": l.get("n_kv_heads") or l["num_heads"], "vocab_size": l["vocab_size"],
        "rms_norm_eps": l.get("rms_norm_eps", 1e-5), "hidden_act": "silu", "tie_word_embeddings": False,
        "max_position_embeddings": l.get("max_position_embedding") or l.get("seq_length", 2048),
        **{k: l[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if l.get(k) is not None},
        "vision_config": {
            "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
            "num_hidden_layers": v["num_hidden_layers"], "num_heads": v["num_attention_heads"],
            "image_size": v["image_size"], "patch_size": v["patch_size"], "in_channels": v.get("num_channels", 3),
            "num_positions": grid * grid + 1, "layer_norm_eps": v.get("layer_norm_eps", 1e-6),
            "hidden_act": "gelu", "dropout_prob": 0.0,
        },
    }
    return cfg, "separate"


NAMES = NameSet(
    title="CogVLM2 (image and video)",
    archs=("cogvlm2", "cogvlm2_video"), keys=("cogvlm2",),
    layouts=LAYOUTS, rules=rules, write_order=write_order, check=check, to_yaml=to_yaml,
    yaml_types=("CogVLM2Config",), from_yaml=from_yaml,
)
