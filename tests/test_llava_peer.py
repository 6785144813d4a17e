"""The official LLaVA codebase (llava-torch 1.2.2.post1 with the transformers 4.37.2 it pins, in its
own venv) loads what weightport writes in the `llava` format and computes what the source parts
compute; and a checkpoint laid out as LLaVA's own training saves it is read the way LLaVA reads it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightport
from llava_parts import (VOCAB, build_clip, build_llm, build_xtuner_dir, llava_hf_logits, pixels, projector_weights,
                         reference_logits, save_mmengine_checkpoint, trained_state_dict)

# LLaVA's own prompt: one IMAGE_TOKEN_INDEX that its forward replaces with the image's patches
LLAVA_IDS = torch.tensor([[1, 5, 9, -200, 17, 33, 4, 60]])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-peer-parts")
    return build_llm(root / "llm"), build_clip(root / "clip"), projector_weights()


def test_llava_runs_our_official_output_with_the_parts_logits(parts, llava_peer, tmp_path):
    llm, clip, proj = parts
    src = build_xtuner_dir(tmp_path / "x", llm, clip, proj)
    weightport.convert(src, tmp_path / "llava-out", "llava")
    theirs = llava_peer(tmp_path / "llava-out", LLAVA_IDS, pixels(), tmp_path)
    want = reference_logits(llm, clip, proj, image_id=120)
    assert theirs.shape[:2] == want.shape[:2]
    assert (theirs[..., :VOCAB] - want).abs().max() < 1e-5


def test_phi3_training_checkpoint_to_official_llava_in_one_command(llava_peer, tmp_path):
    llm, clip, proj = build_llm(tmp_path / "phi3", kind="phi3"), build_clip(tmp_path / "clip"), projector_weights()
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_9.pth", trained_state_dict(llm, clip, proj, shift=0.0))
    weightport.convert(pth, tmp_path / "llava-phi3", "llava", llm=llm, visual_encoder=clip, to_arch="llama")
    theirs = llava_peer(tmp_path / "llava-phi3", LLAVA_IDS, pixels(), tmp_path)
    want = reference_logits(llm, clip, proj, image_id=120)
    assert (theirs[..., :VOCAB] - want).abs().max() < 1e-5


@pytest.mark.parametrize("unfreeze", [True, False])
def test_a_stored_vit_is_used_exactly_when_llava_uses_it(parts, llava_peer, tmp_path, unfreeze):
    """An official checkpoint carrying fine-tuned ViT tensors: LLaVA uses them only with
    unfreeze_mm_vision_tower; weightport's llava-hf output must agree with LLaVA either way."""
    llm, clip, proj = parts
    weightport.convert(build_xtuner_dir(tmp_path / "x", llm, clip, proj), tmp_path / "llava-base", "llava")
    ckpt = tmp_path / "llava-base"
    sd = load_file(ckpt / "model.safetensors")
    tuned = {f"model.vision_tower.vision_tower.{k}": v + 0.05
             for k, v in load_file(ckpt / "vision_tower" / "model.safetensors").items()}
    save_file({**sd, **tuned}, ckpt / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, unfreeze_mm_vision_tower=unfreeze)))
    theirs = llava_peer(ckpt, LLAVA_IDS, pixels(), tmp_path)
    plan = weightport.convert(ckpt, tmp_path / "hf", "llava-hf")
    ours = llava_hf_logits(tmp_path / "hf")
    assert (theirs[..., :VOCAB] - ours[..., :VOCAB]).abs().max() < 1e-5
    ignored = any("the checkpoint's own ViT tensors are ignored" in n for n in plan.source.notes)
    assert ignored == (not unfreeze)
