"""What the LLaVA formats (xtuner-llava, llava, llava-hf, the xtuner training checkpoint) share: the
hub config made from a text model, a CLIP vision tower and a projector, and the rules for each part.
See ../../../shared/formats/llava.md.

Every one of them computes the same function: CLIP hidden_states[-2] without the CLS token, a
Linear-GELU(erf)-Linear projector, the features spliced into the text model's input embeddings.
"""

from __future__ import annotations

from pathlib import Path

from ...archs import Model, model_from_hf_config
from ...archs.llava import LLAVA, PROJECTOR, TEXT, TEXT_ARCHS, VISION, vision_sizes, vision_tensors
from ...errors import WeightportError
from ...hf_config import load_json, rope_scaling, rope_theta, set_rope, vision_tower_config
from ...rules import Rule

IMAGE_PROCESSOR = "preprocessor_config.json"
# CLIPImageProcessor as openai/clip-vit-large-patch14-336 ships it; sizes follow the vision tower
CLIP_IMAGE_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "resample": 3,
                        "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                        "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}
# xtuner's ProjectorModel: nn.Sequential(Linear, GELU, Linear) under `model`
XTUNER_PROJECTOR = ("model.0", "model.2")
# config keys that describe where a checkpoint came from, not the network
_PROVENANCE = ("architectures", "_name_or_path", "auto_map", "transformers_version", "torch_dtype", "dtype")


def clip_vision_config(path: Path) -> dict:
    """The CLIP vision config in a CLIPVisionModel's (or a whole CLIPModel's) config.json."""
    cfg = vision_tower_config(path, "clip", "CLIP")
    return {k: v for k, v in cfg.items() if k not in _PROVENANCE} | {"model_type": "clip_vision_model"}


def hub_model(text_cfg: dict, vision_cfg: dict, *, projector_bias: bool = True, where: str,
              **fields) -> Model:
    """The llava hub model of these parts. `fields`: LlavaConfig fields the source records
    (image_token_index, vision_feature_layer, ...); the defaults are LLaVA-1.5's."""
    kind = text_cfg.get("model_type")
    if kind not in TEXT_ARCHS:
        raise WeightportError(f"{where}: the language model is {kind!r}; LLaVA's text model must be one of "
                              f"{', '.join(TEXT_ARCHS)}")
    config = {"model_type": "llava", "architectures": [LLAVA.hf_class],
              "text_config": {k: v for k, v in text_cfg.items() if k not in _PROVENANCE},
              "vision_config": vision_cfg, "projector_hidden_act": "gelu", "multimodal_projector_bias": projector_bias,
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "tie_word_embeddings": bool(text_cfg.get("tie_word_embeddings", False))}
    config.update({k: v for k, v in fields.items() if v is not None})
    return model_from_hf_config(config, where)


def portable_text_config(text_cfg: dict) -> dict:
    """The text config with its rotary settings in both spellings: xtuner and the official LLaVA
    run transformers 4.x, which reads rope_theta, not transformers 5's rope_parameters."""
    cfg = dict(text_cfg)
    set_rope(cfg, rope_theta(cfg), rope_scaling(cfg))
    return cfg


def text_part(model: Model) -> Model:
    """The text model alone, as its own checkpoint's config.json describes it."""
    text = model.config["text_config"]
    cfg = dict(portable_text_config(text), architectures=[TEXT_ARCHS[text["model_type"]].hf_class])
    return model_from_hf_config(cfg, "text_config")


def text_rules(model: Model, stored_prefix: str) -> list[Rule]:
    """Hub text tensors <- `stored_prefix` + the text model's own names."""
    return [Rule(h, stored_prefix + h.removeprefix(TEXT)) for h in model.hub_tensors() if h.startswith(TEXT)]


def vision_rules(model: Model, stored_prefix: str) -> list[Rule]:
    """Hub vision tensors <- `stored_prefix` + CLIPVisionModel's names below vision_model."""
    return [Rule(h, stored_prefix + h.removeprefix(VISION + ".")) for h, _ in vision_tensors(model.config)]


def projector_rules(model: Model, stored: tuple[str, str]) -> list[Rule]:
    """Hub projector tensors <- the two stored linear modules' weights (and biases)."""
    hub = model.hub_tensors()
    return [Rule(f"{PROJECTOR}.linear_{i + 1}.{w}", f"{s}.{w}") for i, s in enumerate(stored)
            for w in ("weight", "bias") if f"{PROJECTOR}.linear_{i + 1}.{w}" in hub]


def vision_prefix(names, under: str = "") -> str:
    """Where a CLIPVisionModel's tensors sit among `names`: `vision_model.` as transformers 4.x saves
    them, or bare as 5.x does."""
    return f"{under}vision_model." if any(n.startswith(f"{under}vision_model.") for n in names) else under


def check_projector(cfg: dict, where: str) -> bool:
    """An xtuner ProjectorConfig that LLaVA-1.5 formats can hold; returns its bias flag."""
    depth, act = cfg.get("depth", 2), cfg.get("hidden_act", "gelu")
    if depth != 2:
        raise WeightportError(f"{where}: projector depth {depth}; LLaVA-1.5 formats (and transformers' "
                              "LlavaForConditionalGeneration) hold exactly 2 linear layers")
    if act != "gelu":
        raise WeightportError(f"{where}: projector hidden_act {act!r}; LLaVA-1.5 projectors use exact GELU ('gelu')")
    return bool(cfg.get("bias", True))


def check_widths(model: Model, shapes: dict[str, tuple[int, ...]], names: dict[str, str], where: str) -> None:
    """The stored projector's shapes against the vision and text widths, named in the error."""
    want = model.hub_tensors()
    for hub, stored in names.items():
        if hub.startswith(PROJECTOR) and stored in shapes and tuple(shapes[stored]) != tuple(want[hub]):
            v, t = model.config["vision_config"]["hidden_size"], model.dims.hidden
            raise WeightportError(f"{where}: projector tensor {stored} is {list(shapes[stored])}, but a vision width "
                                  f"of {v} and a text width of {t} need {list(want[hub])}")


def image_processor(model: Model, side_files: list[Path]) -> dict:
    """The vision tower's CLIPImageProcessor config: the source's own, else CLIP's at the tower's size."""
    own = next((p for p in side_files if p.name == IMAGE_PROCESSOR), None)
    if own is not None:
        return load_json(own)
    size = vision_sizes(model.config)["image"]
    return dict(CLIP_IMAGE_PROCESSOR, size={"shortest_edge": size}, crop_size={"height": size, "width": size})
