"""LLaVA: xtuner's directory layout and transformers' llava-hf, from tiny parts built here. Logits of
the llava-hf output equal a forward pass assembled from the parts; round trips are bit-identical;
partial checkpoints are completed from their bases; bad input is refused with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import weightport
from llava_parts import (PATCHES, VOCAB, build_clip, build_llm, build_xtuner_dir, llava_hf_logits, pixels,
                         projector_weights, reference_logits)
from weightport.errors import WeightportError


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-parts")
    llm = build_llm(root / "llm")
    clip = build_clip(root / "clip")
    return llm, clip, projector_weights()


@pytest.fixture(scope="module")
def xtuner_dir(parts, tmp_path_factory):
    llm, clip, proj = parts
    return build_xtuner_dir(tmp_path_factory.mktemp("xtuner") / "llava", llm, clip, proj)


@pytest.fixture(scope="module")
def reference(parts):
    llm, clip, proj = parts
    return reference_logits(llm, clip, proj, image_id=120)


def tensors_of(directory) -> dict:
    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        out.update({f"{f.parent.relative_to(directory)}/{k}": v for k, v in load_file(f).items()})
    return out


def test_xtuner_to_llava_hf_computes_what_the_parts_compute(xtuner_dir, reference, tmp_path):
    plan = weightport.convert(xtuner_dir, tmp_path / "hf", "llava-hf")
    text = plan.render()
    assert "note:    image token <image> = id 120 (added to the tokenizer)" in text
    assert "note:    pad token <pad> = id 121 (added to the tokenizer)" in text
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["image_token_index"], cfg["pad_token_id"], cfg["text_config"]["vocab_size"]) == (120, 121, VOCAB)
    assert cfg["image_seq_length"] == PATCHES and cfg["vision_feature_layer"] == -2
    logits = llava_hf_logits(tmp_path / "hf")
    assert (logits[..., :VOCAB] - reference).abs().max() < 1e-5


def test_llava_hf_processor_expands_the_image_token(xtuner_dir, tmp_path):
    from transformers import AutoProcessor

    weightport.convert(xtuner_dir, tmp_path / "hf", "llava-hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [120, 121]
    image = (pixels()[0].permute(1, 2, 0).clamp(-1, 1) * 127 + 128).byte().numpy()
    inputs = processor(text=["w1 <image> w2"], images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == 120).sum() == PATCHES
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)


def test_xtuner_round_trips_through_llava_hf_bit_identical(xtuner_dir, tmp_path):
    weightport.convert(xtuner_dir, tmp_path / "hf", "llava-hf")
    weightport.convert(tmp_path / "hf", tmp_path / "back", "xtuner-llava")
    want, got = tensors_of(xtuner_dir), tensors_of(tmp_path / "back")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_xtuner_projector_loads_with_transformers_remote_code(xtuner_dir, parts, tmp_path):
    from transformers import AutoModel

    weightport.convert(xtuner_dir, tmp_path / "x", "xtuner-llava")
    projector = AutoModel.from_pretrained(tmp_path / "x" / "projector", trust_remote_code=True).eval()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    w = parts[2]
    want = torch.nn.functional.gelu(x @ w["model.0.weight"].T + w["model.0.bias"]) @ w["model.2.weight"].T \
        + w["model.2.bias"]
    with torch.no_grad():
        assert (projector(x) - want).abs().max() < 1e-6


def test_partial_checkpoint_is_completed_from_its_bases(parts, xtuner_dir, tmp_path):
    llm, clip, proj = parts
    pretrain = build_xtuner_dir(tmp_path / "pretrain", None, None, proj)
    plan = weightport.convert(pretrain, tmp_path / "hf", "llava-hf", llm=llm, visual_encoder=clip)
    text = plan.render()
    assert f"note:    language model from --llm {llm}" in text
    assert f"note:    vision encoder from --visual-encoder {clip}" in text
    weightport.convert(xtuner_dir, tmp_path / "full", "llava-hf")
    assert tensors_of(tmp_path / "hf").keys() == tensors_of(tmp_path / "full").keys()
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(tmp_path / "hf").values(),
                                                 tensors_of(tmp_path / "full").values()))


def test_transformers_5_clip_names_are_read(parts, reference, tmp_path):
    llm, _, proj = parts
    clip5 = build_clip(tmp_path / "clip5", legacy_names=False)
    assert not any(k.startswith("vision_model.") for k in load_file(clip5 / "model.safetensors"))
    src = build_xtuner_dir(tmp_path / "x", llm, clip5, proj)
    weightport.convert(src, tmp_path / "hf", "llava-hf")
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - reference).abs().max() < 1e-5


def test_a_full_tokenizer_grows_the_vocabulary_by_mean_rows(parts, tmp_path):
    _, clip, proj = parts
    llm = build_llm(tmp_path / "llm", tokenizer_size=VOCAB)
    src = build_xtuner_dir(tmp_path / "x", llm, clip, proj)
    plan = weightport.convert(src, tmp_path / "hf", "llava-hf")
    assert "note:    embedding and lm_head grown from 128 to 192 rows (a multiple of 64, as transformers' LLaVA " \
           "converter pads) with the mean of the existing rows" in plan.render()
    got = load_file(tmp_path / "hf" / "model.safetensors")
    src_llm = load_file(llm / "model.safetensors")
    for hub, own in (("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
                     ("language_model.lm_head.weight", "lm_head.weight")):
        assert got[hub].shape == (192, 64) and torch.equal(got[hub][:VOCAB], src_llm[own])
        assert torch.allclose(got[hub][VOCAB:], src_llm[own].double().mean(0).float().expand(64, -1), atol=1e-7)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["image_token_index"], cfg["pad_token_id"], cfg["text_config"]["vocab_size"]) == (128, 129, 192)
    want = reference_logits(llm, clip, proj, image_id=128)
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - want).abs().max() < 1e-5


@pytest.mark.parametrize("case, message", [
    ("no-llm", "{src}: has no language model (training froze it); pass --llm with the base checkpoint it was "
               "trained from"),
    ("no-vision", "{src}: has no vision encoder (training froze it); pass --visual-encoder with the base checkpoint "
                  "it was trained from"),
    ("narrow-projector", "{src}: projector tensor projector/model.0.weight is [64, 16], but a vision width of 32 and "
                         "a text width of 64 need [64, 32]"),
    ("depth-3", "{src}/projector/config.json: projector depth 3; LLaVA-1.5 formats (and transformers' "
                "LlavaForConditionalGeneration) hold exactly 2 linear layers"),
    ("extra-tensor", "{src}/projector/model.safetensors: tensor projector/model.4.weight is not part of a llava model "
                     "with this config (unmapped extra tensor)"),
])
def test_bad_input_is_refused_with_nothing_written(parts, tmp_path, case, message):
    llm, clip, proj = parts
    if case == "narrow-projector":
        proj = projector_weights(vision=16)
    if case == "extra-tensor":
        proj = dict(proj, **{"model.4.weight": torch.zeros(64, 64)})
    src = build_xtuner_dir(tmp_path / "src", None if case == "no-llm" else llm,
                           None if case == "no-vision" else clip, proj)
    if case == "depth-3":
        cfg = json.loads((src / "projector" / "config.json").read_text())
        (src / "projector" / "config.json").write_text(json.dumps(dict(cfg, depth=3)))
    with pytest.raises(WeightportError) as e:
        weightport.convert(src, tmp_path / "out", "llava-hf")
    assert str(e.value) == message.format(src=src)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_official_layout_round_trip_and_logits(xtuner_dir, reference, tmp_path):
    weightport.convert(xtuner_dir, tmp_path / "llava-official", "llava")
    out = tmp_path / "llava-official"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava_llama"
    assert cfg["mm_vision_tower"] == str((out / "vision_tower").resolve())
    assert (cfg["mm_projector_type"], cfg["mm_vision_select_layer"], cfg["mm_vision_select_feature"],
            cfg["mm_hidden_size"], cfg["unfreeze_mm_vision_tower"]) == ("mlp2x_gelu", -2, "patch", 32, False)
    stored = load_file(out / "model.safetensors")
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias"} <= stored.keys()
    assert not [k for k in stored if "vision_tower" in k]
    assert sorted(p.name for p in (out / "vision_tower").iterdir()) == ["config.json", "model.safetensors",
                                                                         "preprocessor_config.json"]
    # official -> llava-hf computes what the parts compute; official -> xtuner is the source again
    weightport.convert(out, tmp_path / "hf", "llava-hf")
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - reference).abs().max() < 1e-5
    weightport.convert(out, tmp_path / "back", "xtuner-llava")
    want, got = tensors_of(xtuner_dir), tensors_of(tmp_path / "back")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_official_refuses_a_phi3_text_model_without_to_arch(tmp_path):
    llm = build_llm(tmp_path / "phi3", kind="phi3")
    src = build_xtuner_dir(tmp_path / "x", llm, build_clip(tmp_path / "clip"), projector_weights())
    with pytest.raises(WeightportError) as e:
        weightport.convert(src, tmp_path / "out", "llava")
    assert str(e.value) == ("the official LLaVA codebase runs Llama language models only (LlavaLlamaForCausalLM); "
                            "this one is phi3: add --to-arch llama")
    weightport.convert(src, tmp_path / "out", "llava", to_arch="llama")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava_llama"


def test_xtuner_lora_adapters_are_merged(parts, tmp_path):
    """pth_to_hf's xtuner layout after LoRA training: llm_adapter/ and visual_encoder_adapter/ beside
    the projector, the bases given with --llm / --visual-encoder; the result computes what peft's
    merged LLM and ViT compute."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    llm, clip, proj = parts
    src = build_xtuner_dir(tmp_path / "x", None, None, proj)
    merged = {}
    for name, base, cls, targets in (("llm", llm, AutoModelForCausalLM, ["q_proj", "down_proj"]),
                                     ("clip", clip, CLIPVisionModel, ["q_proj", "fc1"])):
        model = get_peft_model(cls.from_pretrained(base, dtype=torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.1 * torch.randn_like(p))
        model.save_pretrained(src / ("llm_adapter" if name == "llm" else "visual_encoder_adapter"))
        model.merge_and_unload().save_pretrained(tmp_path / f"merged-{name}")
        merged[name] = tmp_path / f"merged-{name}"
    (merged["llm"] / "tokenizer.json").write_bytes((llm / "tokenizer.json").read_bytes())
    plan = weightport.convert(src, tmp_path / "hf", "llava-hf", llm=llm, visual_encoder=clip)
    assert plan.render().count("note:    LoRA from") == 2
    want = reference_logits(merged["llm"], merged["clip"], proj, image_id=120)
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - want).abs().max() < 1e-5
