"""The official LLaVA codebase's checkpoints (haotian-liu/LLaVA, `llava-torch`; liuhaotian/llava-v1.5-7b):
LlavaLlamaForCausalLM, a Llama config with `mm_*` fields, the projector at `model.mm_projector.{0,2}`.
See ../../../shared/formats/llava.md §4.

The vision tower. LLaVA builds it from the CLIP checkpoint `mm_vision_tower` names, and uses ViT
tensors stored in the checkpoint (`model.vision_tower.vision_tower.vision_model.*`) only when
`unfreeze_mm_vision_tower` is true. Reading follows the same rule, taking the CLIP checkpoint from
`--visual-encoder` or from `mm_vision_tower` when that is a local directory. Writing puts the vision
tower beside the weights as a CLIPVisionModel directory, `vision_tower/`, and points
`mm_vision_tower` at it (an absolute path, as the codebase needs a path or a Hub id), so the output
is complete on its own and no ViT tensor is stored twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...archs import Model
from ...archs.llava import TEXT, text_config, vision_sizes
from ...dtypes import short_name
from ...errors import WeightportError
from ...hf_config import load_json
from ...io import open_files
from ...io.parts import PartsSource
from ...rules import Rule
from . import parts as llava_parts
from ...format import Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions
from ..common import copy_side_files, find_side_files, write_json
from ...staging import final_dir
from ..hf import FORMAT as HF, _weight_files
from .parts import IMAGE_PROCESSOR
from .xtuner_llava import SubdirWriter

VISION_DIR = "vision_tower"
STORED_VISION = "model.vision_tower.vision_tower.vision_model."
STORED_PROJECTOR = ("model.mm_projector.0", "model.mm_projector.2")
# the LlavaConfig fields the official code adds to the Llama config
MM_FIELDS = ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
             "mm_vision_select_feature", "mm_patch_merge_type", "mm_use_im_start_end", "mm_use_im_patch_token",
             "mm_projector_lr", "mm_resampler_type", "mm_vision_tower_lr", "image_aspect_ratio",
             "image_grid_pinpoints", "unfreeze_mm_vision_tower", "use_mm_proj", "tune_mm_mlp_adapter",
             "freeze_mm_mlp_adapter", "tune_mm_vision_resampler", "tokenizer_model_max_length",
             "tokenizer_padding_side", "mm_projector_type")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


class LlavaOfficialFormat(Format):
    name = "llava"
    title = "official LLaVA (LlavaLlamaForCausalLM, mm_* config fields; llava-torch)"
    archs = ("llava",)
    takes_bases = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and "mm_vision_tower" in load_json(path / "config.json")

    def open(self, path: Path, layout: str | None = None, bases: dict[str, Path] | None = None) -> Checkpoint:
        bases = bases or {}
        if "llm" in bases:
            raise WeightportError(f"--llm: {path} holds its language model; only --visual-encoder completes an "
                                  "official LLaVA checkpoint")
        where = path / "config.json"
        cfg = load_json(where)
        kind = cfg.get("mm_projector_type", "linear")
        if kind != "mlp2x_gelu":
            raise WeightportError(f"{where}: mm_projector_type {kind!r}; weightport converts LLaVA-1.5's 'mlp2x_gelu' "
                                  "projector only")
        merge = cfg.get("mm_patch_merge_type", "flat")
        if merge != "flat":
            raise WeightportError(f"{where}: mm_patch_merge_type {merge!r} (LLaVA-1.6 anyres); weightport converts "
                                  "LLaVA-1.5's 'flat' only")
        select = cfg.get("mm_vision_select_feature", "patch")
        if select not in SELECT_FEATURE:
            raise WeightportError(f"{where}: mm_vision_select_feature {select!r} (expected patch or cls_patch)")
        vision_dir = bases.get("visual_encoder")
        notes = []
        if vision_dir is None:
            named = Path(cfg["mm_vision_tower"])
            if not (named / "config.json").is_file():
                raise WeightportError(f"{where}: mm_vision_tower {cfg['mm_vision_tower']!r} is not a local CLIP "
                                      "directory; pass --visual-encoder with the CLIP checkpoint it names")
            vision_dir = named
            notes.append(f"vision encoder config from mm_vision_tower {named}")
        else:
            notes.append(f"vision encoder config from --visual-encoder {vision_dir}")
        vision_cfg = llava_parts.clip_vision_config(vision_dir / "config.json")

        text_cfg = {k: v for k, v in cfg.items() if k not in MM_FIELDS}
        text_cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        model = llava_parts.hub_model(text_cfg, vision_cfg, where=str(where),
                                      vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
                                      vision_feature_select_strategy=SELECT_FEATURE[select])
        files, _, _ = _weight_files(path)
        own = open_files(files)
        stored_vit = [n for n in own.tensors if n.startswith("model.vision_tower.")]
        use_own_vit = bool(stored_vit) and bool(cfg.get("unfreeze_mm_vision_tower"))
        parts = {"": own}
        if not use_own_vit:
            vision_files, _, _ = _weight_files(vision_dir)
            parts["vision/"] = open_files(vision_files)
            notes.append(f"vision tower weights from {vision_dir}" + (
                " (the checkpoint's own ViT tensors are ignored, as LLaVA ignores them without "
                "unfreeze_mm_vision_tower)" if stored_vit else ""))
        source = PartsSource(parts, {})
        if "model.image_newline" in own.tensors:
            source.close()
            raise WeightportError(f"{files[0]}: tensor model.image_newline belongs to LLaVA-1.6 (anyres); not converted")
        rules = [Rule(TEXT + h, h) for h in _llama_names(model)]
        if use_own_vit:
            rules += llava_parts.vision_rules(model, STORED_VISION)
        else:
            names = [n.removeprefix("vision/") for n in source.tensors if n.startswith("vision/")]
            rules += llava_parts.vision_rules(model, "vision/" + llava_parts.vision_prefix(names))
        rules += llava_parts.projector_rules(model, STORED_PROJECTOR)
        llava_parts.check_widths(model, {n: m.shape for n, m in source.tensors.items()},
                                 {r.hub[0]: r.fmt[0] for r in rules}, str(path))
        dropped = {n: "ignored by LLaVA without unfreeze_mm_vision_tower" for n in stored_vit if not use_own_vit}
        dropped.update({n: "recomputed by the model" for n in own.tensors if n.endswith(".rotary_emb.inv_freq")})
        side = find_side_files(path)
        if (vision_dir / IMAGE_PROCESSOR).is_file():
            side.append(vision_dir / IMAGE_PROCESSOR)
        generation = path / "generation_config.json"
        return Checkpoint(path=path, format=self, variant=f"LlavaLlamaForCausalLM, {len(files)} file(s)", model=model,
                          source=source, rules=rules, side_files=side, notes=notes, dropped=dropped,
                          generation_config=load_json(generation) if generation.is_file() else None)

    def check_write(self, model: Model, options: WriteOptions) -> list[str]:
        kind = text_config(model.config)["model_type"]
        if kind != "llama":
            raise WeightportError(f"the official LLaVA codebase runs Llama language models only (LlavaLlamaForCausalLM); "
                                  f"this one is {kind}: add --to-arch llama")
        layer = model.config.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise WeightportError(f"vision_feature_layer {layer}: the official LLaVA selects one layer")
        return []

    def write_notes(self, model: Model, options: WriteOptions) -> list[str]:
        return [f"vision tower written to {VISION_DIR}/, which mm_vision_tower names by its absolute path (LLaVA "
                "takes a path or a Hub id): edit it if the directory moves"]

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        rules = [Rule(TEXT + h, h) for h in _llama_names(model)]
        rules += [Rule(r.hub, f"{VISION_DIR}/{r.fmt[0]}") for r in llava_parts.vision_rules(model, "vision_model.")]
        rules += llava_parts.projector_rules(model, STORED_PROJECTOR)
        return rules

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        vision = [t for t in tensors if t.name.startswith(f"{VISION_DIR}/")]
        return HF.files([t for t in tensors if t not in vision], options) + \
            [OutputFile(f"{VISION_DIR}/model.safetensors", vision)]

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        return SubdirWriter(directory, files)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        text = llava_parts.text_part(model)
        strategy = model.config.get("vision_feature_select_strategy", "default")
        tower = final_dir(directory) / VISION_DIR
        cfg = dict(text.config, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                   torch_dtype=short_name(dtype), use_cache=True,
                   mm_vision_tower=str(tower), mm_hidden_size=vision_sizes(model.config)["hidden"],
                   mm_projector_type="mlp2x_gelu", mm_vision_select_layer=model.config.get("vision_feature_layer", -2),
                   mm_vision_select_feature={v: k for k, v in SELECT_FEATURE.items()}[strategy],
                   mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False,
                   image_aspect_ratio="pad", unfreeze_mm_vision_tower=False, use_mm_proj=True,
                   tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False)
        write_json(directory / "config.json", cfg)
        written = ["config.json"]
        if source.generation_config is not None:
            write_json(directory / "generation_config.json", source.generation_config)
            written.append("generation_config.json")
        # the image token and processor files are llava-hf's; LLaVA's tokenizer has no <image>
        keep = [p for p in source.side_files if p.name not in (IMAGE_PROCESSOR, "processor_config.json")]
        written += copy_side_files(keep, directory)
        write_json(directory / VISION_DIR / "config.json",
                   dict(model.config["vision_config"], architectures=["CLIPVisionModel"], torch_dtype=short_name(dtype)))
        written.append(f"{VISION_DIR}/config.json")
        # LLaVA's CLIPVisionTower loads its image processor from mm_vision_tower
        write_json(directory / VISION_DIR / IMAGE_PROCESSOR, llava_parts.image_processor(model, source.side_files))
        return written + [f"{VISION_DIR}/{IMAGE_PROCESSOR}"]


def _llama_names(model: Model) -> list[str]:
    return [h.removeprefix(TEXT) for h in model.hub_tensors() if h.startswith(TEXT)]


FORMAT = LlavaOfficialFormat()
