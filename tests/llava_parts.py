"""Tiny LLaVA parts built locally (a CLIP vision tower, an xtuner projector, a language model with a
tokenizer), the checkpoint layouts xtuner and the official codebase write, and a reference forward
pass assembled from the parts themselves, independent of any converter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf, word_tokenizer

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=28,
              patch_size=14, projection_dim=16)
PATCHES = (28 // 14) ** 2
TEXT_HIDDEN = 64
VOCAB = 128


def build_clip(path: Path, legacy_names: bool = True) -> Path:
    """A CLIPVisionModel directory; `legacy_names`: `vision_model.*` as transformers 4.x (and so
    every xtuner and Hub checkpoint) saves it, else bare as transformers 5 does."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(5)
    model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    if legacy_names:
        sd = load_file(path / "model.safetensors")
        save_file({k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in sd.items()},
                  path / "model.safetensors", metadata={"format": "pt"})
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 28, "width": 28},
        "size": {"shortest_edge": 28}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return path


def build_llm(path: Path, kind: str = "llama3", tokenizer_size: int | None = 120, **overrides) -> Path:
    """A tiny language model; a tokenizer smaller than the vocabulary leaves room for the image
    token, as Phi-3's 32011 tokens in 32064 rows do."""
    build_hf(kind, path, **overrides)
    if tokenizer_size is not None:
        word_tokenizer(path, tokenizer_size)
    return path


def projector_weights(seed: int = 9, vision: int = VISION["hidden_size"], text: int = TEXT_HIDDEN) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model.0.weight": 0.2 * torch.randn(text, vision, generator=g), "model.0.bias": 0.1 * torch.randn(text, generator=g),
            "model.2.weight": 0.2 * torch.randn(text, text, generator=g), "model.2.bias": 0.1 * torch.randn(text, generator=g)}


def write_projector(path: Path, weights: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    text, vision = weights["model.0.weight"].shape
    (path / "config.json").write_text(json.dumps({
        "architectures": ["ProjectorModel"], "model_type": "projector", "visual_hidden_size": vision,
        "llm_hidden_size": text, "depth": 2, "hidden_act": "gelu", "bias": True, "torch_dtype": "float32",
        "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig",
                     "AutoModel": "modeling_projector.ProjectorModel"}}))
    return path


def build_xtuner_dir(path: Path, llm: Path | None, clip: Path | None, projector: dict) -> Path:
    """What `xtuner convert pth_to_hf --save-format xtuner` writes: the LLM at the root (when
    trained), visual_encoder/ (when trained), projector/ always."""
    path.mkdir(parents=True)
    if llm is not None:
        for f in llm.iterdir():
            shutil.copy(f, path / f.name)
    if clip is not None:
        shutil.copytree(clip, path / "visual_encoder")
    write_projector(path / "projector", projector)
    return path


def pixels(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(seed))


def prompt(image_id: int) -> torch.Tensor:
    """Text tokens around one image, its placeholder expanded to one token per patch as
    transformers' processor does."""
    return torch.tensor([[1, 5, 9, *[image_id] * PATCHES, 17, 33, 4, 60]])


def reference_logits(llm: Path, clip: Path, projector: dict, image_id: int) -> torch.Tensor:
    """LLaVA-1.5's forward pass from the parts: CLIP hidden_states[-2] without CLS -> Linear ->
    GELU(erf) -> Linear, spliced into the LLM's input embeddings at the image positions."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(clip, dtype=torch.float32).eval()
    lm = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32, attn_implementation="eager").eval()
    ids = prompt(image_id)
    with torch.no_grad():
        feats = vision(pixel_values=pixels(), output_hidden_states=True).hidden_states[-2][:, 1:]
        h = torch.nn.functional.gelu(feats @ projector["model.0.weight"].T + projector["model.0.bias"])
        feats = h @ projector["model.2.weight"].T + projector["model.2.bias"]
        embeds = lm.get_input_embeddings()(ids.clamp(max=VOCAB - 1))
        embeds[ids == image_id] = feats.reshape(-1, feats.shape[-1])
        return lm(inputs_embeds=embeds).logits


def llava_hf_logits(path: Path) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=prompt(model.config.image_token_index), pixel_values=pixels()).logits


def trained_state_dict(llm: Path, clip: Path, projector: dict, parts=("llm", "visual_encoder", "projector"),
                       shift: float = 0.01) -> dict:
    """xtuner LLaVAModel.state_dict() after training: the trained parts under llm.*, visual_encoder.*
    (CLIPVisionModel's module names) and projector.*, the trained weights differing from the bases."""
    sd = {}
    if "llm" in parts:
        sd.update({f"llm.{k}": v + shift for k, v in load_file(llm / "model.safetensors").items()})
    if "visual_encoder" in parts:
        sd.update({f"visual_encoder.{k}": v + shift for k, v in load_file(clip / "model.safetensors").items()})
    if "projector" in parts:
        sd.update({f"projector.{k}": v for k, v in projector.items()})
    return sd


class _StatisticMethod:
    """Pickles as mmengine's HistoryBuffer pickles its statistics methods: getattr(cls, name)."""

    def __reduce__(self):
        import argparse

        return (getattr, (argparse.Namespace, "__init__"))


def save_mmengine_checkpoint(path: Path, state_dict: dict) -> Path:
    """iter_N.pth as mmengine's Runner saves it: the state dict beside bookkeeping that pickles numpy
    objects, non-tensor classes and builtins.getattr calls."""
    import argparse

    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"epoch": 1, "iter": 50, "seed": np.int64(42), "cfg": "model = dict(type=LLaVAModel)"},
                "state_dict": state_dict,
                "message_hub": {"log_scalars": {"train/loss": np.array([2.5, 2.25])},
                                "statistics_methods": {"mean": _StatisticMethod()},
                                "runtime_info": argparse.Namespace(iter=50)},
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-5}]}}, path)
    return path


def save_zero_checkpoint(path: Path, state_dict: dict, stage: int, world: int = 2) -> Path:
    """The DeepSpeed ZeRO tag directory iter_N.pth/, by DeepSpeed's layout: ZeRO-2 keeps the module
    state dict whole; ZeRO-3 keeps per-rank fp32 flat groups where each parameter takes
    ceil(numel / world) elements a rank (zero-padded), in param_shapes order, two param groups."""
    import argparse
    import math
    from collections import OrderedDict

    path.mkdir(parents=True)
    names = list(state_dict)
    groups = [names[: len(names) // 2], names[len(names) // 2:]]
    shapes = [OrderedDict((n, torch.Size(state_dict[n].shape)) for n in g) for g in groups]
    common = {"buffer_names": [], "param_shapes": shapes, "shared_params": {}, "ds_version": "0.19.8",
              "ds_config": {"zero_optimization": {"stage": stage}}, "dp_world_size": world, "mp_world_size": 1}
    if stage == 2:
        # each group's fp32 params back to back, padded to a multiple of 2 * world, split evenly
        partitions = [[] for _ in range(world)]
        for g in groups:
            flat = torch.cat([state_dict[n].float().reshape(-1) for n in g])
            flat = torch.cat([flat, flat.new_zeros(-flat.numel() % (2 * world))])
            for r, piece in enumerate(flat.chunk(world)):
                partitions[r].append(piece.clone())
        torch.save(dict(common, module=state_dict, frozen_param_shapes=None), path / "mp_rank_00_model_states.pt")
        for r in range(world):
            torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": world,
                                                 "single_partition_of_fp32_groups": partitions[r],
                                                 "loss_scaler": argparse.Namespace(cur_scale=1.0)}},
                       path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        return path
    flats = [[] for _ in range(world)]
    for g in groups:
        pieces = [[] for _ in range(world)]
        for n in g:
            t = state_dict[n].float().reshape(-1)
            part = math.ceil(t.numel() / world)
            t = torch.cat([t, t.new_zeros(part * world - t.numel())])
            for r in range(world):
                pieces[r].append(t[r * part:(r + 1) * part])
        for r in range(world):
            flats[r].append(torch.cat(pieces[r]))
    for r in range(world):
        placeholders = {n: torch.empty(0) for n in names}
        torch.save(dict(common, module=placeholders, frozen_param_shapes=None),
                   path / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": world, "fp32_flat_groups": flats[r],
                                             "loss_scaler": argparse.Namespace(cur_scale=1.0)}},
                   path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return path
