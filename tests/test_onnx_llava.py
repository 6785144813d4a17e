"""LLaVA to ONNX: vision + projector, embeddings and decoder graphs connected as the manifest says
compute transformers' LlavaForConditionalGeneration logits; `weightport run --image` too."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from llava_parts import build_clip, build_llm, build_xtuner_dir, llava_hf_logits, pixels, projector_weights, prompt
from weightport import api
from weightport.cli import main
from weightport.formats.onnx.image_preprocess import clip_pixels


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-onnx")
    xtuner = build_xtuner_dir(root / "xtuner", build_llm(root / "llm"), build_clip(root / "clip"), projector_weights())
    api.convert(xtuner, root / "hf", "llava-hf")
    return root / "hf"


def sessions(directory):
    return {g: ort.InferenceSession(str(directory / f"{g}.onnx"), providers=["CPUExecutionProvider"])
            for g in ("vision", "embed", "decoder")}


def connected(directory, ids, pixel_values, past=None, past_len=0):
    """The manifest's recipe: embed the ids, put the image features in the image token's rows, decode."""
    manifest = json.loads((directory / "weightport_onnx.json").read_text())
    s = sessions(directory)
    embeds = s["embed"].run(None, {"input_ids": ids})[0]
    at = ids == manifest["image"]["token_id"]
    if at.any():
        feats = s["vision"].run(None, {"pixel_values": pixel_values})[0]
        embeds[at] = feats.reshape(-1, feats.shape[-1])
    n = ids.shape[1]
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, past_len + n), np.int64),
            "position_ids": np.arange(past_len, past_len + n)[None]}
    names = [o.name for o in s["decoder"].get_outputs()]
    return dict(zip(names, s["decoder"].run(None, {**feed, **(past or {})})))


def test_three_graphs_compute_transformers_llava_logits(llava_hf, tmp_path):
    out = tmp_path / "onnx"
    plan = api.convert(llava_hf, out, "onnx")
    assert [f.name for f in plan.files] == ["vision.onnx.data", "embed.onnx.data", "decoder.onnx.data"]
    for g in ("vision", "embed", "decoder"):
        onnx.checker.check_model(str(out / f"{g}.onnx"))
    manifest = json.loads((out / "weightport_onnx.json").read_text())
    assert manifest["image"]["token_id"] == 120 and manifest["image"]["tokens_per_image"] == 4
    # CLIP's last layer and post_layernorm: LLaVA reads hidden_states[-2], so no graph runs them
    assert sorted(manifest["unused_weights"])[-1] == "vision_tower.vision_model.post_layernorm.weight"
    assert len(manifest["unused_weights"]) == 18

    logits = connected(out, prompt(120).numpy(), pixels().numpy())["logits"]
    diff = np.abs(logits - llava_hf_logits(llava_hf).numpy()).max()
    assert diff < 1e-5, diff


def test_cached_decoder_steps_equal_one_prefill(llava_hf, tmp_path):
    out = tmp_path / "onnx"
    api.convert(llava_hf, out, "onnx", with_past=True)
    ids = prompt(120).numpy()
    empty = {f"past_key_values.{l}.{k}": np.zeros((1, 2, 0, 16), np.float32) for l in range(2) for k in ("key", "value")}
    whole = connected(out, ids, pixels().numpy(), empty)["logits"]
    assert np.abs(whole - llava_hf_logits(llava_hf).numpy()).max() < 1e-5
    first = connected(out, ids[:, :-1], pixels().numpy(), empty)
    past = {k.replace("present.", "past_key_values."): v for k, v in first.items() if k.startswith("present.")}
    step = connected(out, ids[:, -1:], None, past, past_len=ids.shape[1] - 1)["logits"]
    assert np.abs(step[:, -1] - whole[:, -1]).max() < 1e-5


def test_back_from_onnx_is_the_llava_hf_checkpoint_bit_for_bit(llava_hf, tmp_path):
    api.convert(llava_hf, tmp_path / "onnx", "onnx")
    api.convert(tmp_path / "onnx", tmp_path / "back", "llava-hf")
    a, b = load_file(llava_hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((llava_hf / "config.json").read_text())


def test_run_with_an_image_predicts_what_transformers_predicts(llava_hf, tmp_path, capsys):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "onnx"
    api.convert(llava_hf, out, "onnx", with_past=True)
    rng = np.random.default_rng(0)
    image = tmp_path / "cat.png"
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(image)  # not square: resized, cropped

    processor = AutoProcessor.from_pretrained(llava_hf)
    inputs = processor(text=["w1 <image> w2 w7"], images=[Image.open(image)], return_tensors="pt")
    ours = clip_pixels(image, json.loads((out / "preprocessor_config.json").read_text()))
    assert np.abs(ours - inputs["pixel_values"].numpy()).max() < 1e-5
    model = LlavaForConditionalGeneration.from_pretrained(llava_hf, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        probs = model(**inputs).logits[0, -1].double().softmax(-1)
        greedy = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None)
    top = probs.topk(3)

    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "w1 <image> w2 w7", "--image", str(image), "--top-k", "3",
                 "--generate", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, p, i in zip(lines, top.values.tolist(), top.indices.tolist()):
        _, prob, token_id, _ = line.split()
        assert int(token_id) == i and abs(float(prob) - p) < 5e-5
    assert lines[3].endswith(f"(ids {greedy[0, inputs['input_ids'].shape[1]:].tolist()})")

    assert main(["run", str(out), "--prompt", "w1 <image> w2"]) == 1
    assert capsys.readouterr().err == "weightport: error: the prompt has an image token but no --image was given\n"
