"""`weightport build idefics3`: a tiny Llama and a tiny SigLIP become an Idefics3 that transformers
runs, with every copied tensor exact and every new one as the documented rule makes it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import weightport
from weightport.build import build
from weightport.errors import WeightportError

from conftest import TOKENS, assert_same_tensors, build_hf, hf_logits, run_cli, tree_digest, word_tokenizer

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
V = 128  # the tiny Llama's vocabulary; Idefics3 adds three tokens after it
CONNECTOR = "model.connector.modality_projection.proj.weight"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("parts")
    text = build_hf("llama3", root / "llama")
    torch.manual_seed(7)
    siglip = SiglipModel(SiglipConfig(vision_config=VISION, text_config=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)))
    with torch.no_grad():
        for p in siglip.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    siglip.save_pretrained(root / "siglip")
    return text, root / "siglip"


@pytest.fixture(scope="module")
def built(parts, tmp_path_factory):
    text, vision = parts
    out = tmp_path_factory.mktemp("built") / "idefics3"
    plan = build("idefics3", out, text=text, vision=vision)
    return out, plan


def test_copied_tensors_are_exact_and_new_ones_follow_the_rule(parts, built):
    (text, vision), (out, _) = parts, built
    llama, siglip = load_file(text / "model.safetensors"), load_file(vision / "model.safetensors")
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    for name, t in siglip.items():
        if name.startswith("vision_model.") and not name.startswith("vision_model.head."):
            assert torch.equal(got.pop("model." + name), t), name
    embed, head = got.pop("model.text_model.embed_tokens.weight"), got.pop("lm_head.weight")
    for name, t in llama.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(got.pop("model.text_model." + name.removeprefix("model.")), t), name
    assert embed.shape == (V + 3, 64) and torch.equal(embed[:V], llama["model.embed_tokens.weight"])
    assert torch.equal(head[:V], llama["lm_head.weight"])
    for new, old in ((embed[V:], llama["model.embed_tokens.weight"]), (head[V:], llama["lm_head.weight"])):
        assert torch.allclose(new, old.double().mean(0).float().expand(3, -1), atol=1e-7, rtol=0)
    # the documented connector rule, written out independently
    g = torch.Generator().manual_seed(0)
    assert torch.equal(got.pop(CONNECTOR), torch.normal(0.0, 0.02, (64, 32 * 4), generator=g))
    assert not got, f"unexpected tensors: {sorted(got)}"


def test_plan_says_what_was_initialised_and_dropped(built):
    _, plan = built
    text = plan.render()
    assert f"note:    initialised: rows {V}..{V + 2} of model.text_model.embed_tokens.weight" in text
    assert f"note:    initialised: rows {V}..{V + 2} of lm_head.weight" in text
    assert f"note:    initialised: {CONNECTOR} [64, 128] ~ N(0, 0.02^2) in float32, " \
           "torch.Generator().manual_seed(0), cast to float32" in text
    assert "drop:    vision/vision_model.head.probe (SigLIP's attention-pooling head" in text
    assert "drop:    vision/text_model.embeddings.token_embedding.weight (SigLIP's text tower" in text


def test_transformers_runs_it_and_text_logits_are_the_llamas(parts, built):
    from transformers import Idefics3ForConditionalGeneration, SiglipVisionModel

    (text, vision), (out, _) = parts, built
    model = Idefics3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.image_token_id, cfg.scale_factor, cfg.text_config.vocab_size) == (V + 1, 2, V + 3)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(TOKENS)).logits
        assert (logits[..., :V] - hf_logits(text)).abs().max() < 1e-5
        pixels = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        ref = SiglipVisionModel.from_pretrained(vision, dtype=torch.float32).eval()
        features = model.model.vision_model(pixel_values=pixels[0]).last_hidden_state
        assert (features - ref(pixel_values=pixels[0]).last_hidden_state).abs().max() < 1e-5
        # (32/8)^2 patches / 2^2 = 4 image tokens, between the Llama's text tokens
        ids = torch.tensor([[1, 2, V, *[V + 1] * 4, V, 5, 6]])
        out_logits = model(input_ids=ids, pixel_values=pixels).logits
        assert out_logits.shape == (1, ids.shape[1], V + 3) and torch.isfinite(out_logits).all()


def test_same_seed_same_bytes_and_nanotron_round_trip(parts, built, tmp_path):
    (text, vision), (out, _) = parts, built
    build("idefics3", tmp_path / "again", text=text, vision=vision)
    assert tree_digest(tmp_path / "again") == tree_digest(out)
    build("idefics3", tmp_path / "seed1", text=text, vision=vision, seed=1)
    assert not torch.equal(load_file(tmp_path / "seed1" / "model.safetensors")[CONNECTOR],
                           load_file(out / "model.safetensors")[CONNECTOR])
    build("idefics3", tmp_path / "nt", text=text, vision=vision, to="nanotron", tp=2)
    weightport.convert(tmp_path / "nt", tmp_path / "back", "hf")
    assert_same_tensors(load_file(out / "model.safetensors"), tmp_path / "back")


def test_cli(parts, tmp_path):
    text, vision = parts
    r = run_cli("build", "idefics3", tmp_path / "out", "--text", text, "--vision", vision, "--to", "nanotron")
    assert r.returncode == 0, r.stderr
    assert "initialised: model.connector.modality_projection.proj.weight" in r.stdout
    assert (tmp_path / "out" / "model_config.json").is_file()
    r = run_cli("build", "idefics3", tmp_path / "out", "--text", text, "--vision", vision)
    assert r.returncode == 1 and r.stderr == f"weightport: error: {tmp_path / 'out'}: already exists; pass --force " \
                                            "to replace it\n"


@pytest.mark.parametrize("which, message", [
    ("vision-is-llama", "model_type 'llama' is not a SigLIP checkpoint (expected siglip or siglip_vision_model)"),
    ("text-is-qwen2", "the text model is qwen2; Idefics3's text model is a Llama"),
])
def test_wrong_parts_are_refused(parts, tmp_path, which, message):
    text, vision = parts
    if which == "vision-is-llama":
        vision = text
    else:
        text = build_hf("qwen2", tmp_path / "qwen2")
    with pytest.raises(WeightportError) as e:
        build("idefics3", tmp_path / "out", text=text, vision=vision)
    assert str(e.value).endswith(message)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_tokenizer_and_processor_feed_the_model(parts, tmp_path):
    import shutil

    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer, Idefics3ForConditionalGeneration

    text, vision = parts
    shutil.copytree(text, tmp_path / "llama")
    word_tokenizer(tmp_path / "llama", V)
    plan = build("idefics3", tmp_path / "out", text=tmp_path / "llama", vision=vision)
    assert f"note:    tokenizer: <fake_token_around_image>, <image>, <end_of_utterance> added at ids {V}..{V + 2}; " \
           "processor: Idefics3Processor, 4 tokens per image tile" in plan.render()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == V + 3
    assert tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [V, V + 1, V + 2]

    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    model = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert processor.image_token_id == model.config.image_token_id == V + 1
    image = Image.fromarray((torch.rand(48, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    inputs = processor(text=["w1 <image> w2 w3"], images=[[image]], return_tensors="pt")
    # 48x40 px -> resized to 128 px on the long side -> 4x4 tiles of 32 px + the global view, 4 tokens each
    assert (inputs["input_ids"] == V + 1).sum() == 4 * inputs["pixel_values"].shape[1] > 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == V + 3 and torch.isfinite(logits).all()


def test_a_tokenizer_of_another_size_is_left_out(parts, tmp_path):
    import shutil

    text, vision = parts
    shutil.copytree(text, tmp_path / "llama")
    word_tokenizer(tmp_path / "llama", V - 8)
    plan = build("idefics3", tmp_path / "out", text=tmp_path / "llama", vision=vision)
    assert f"note:    tokenizer and processor not written: its tokenizer.json has {V - 8} ids, not the model's {V}, " \
           f"so <fake_token_around_image>, <image>, <end_of_utterance> cannot take ids {V}..{V + 2}" in plan.render()
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(("tokenizer", "pre", "processor"))]
