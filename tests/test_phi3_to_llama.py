"""--to-arch llama: a Phi-3 model (alone, or as a LLaVA's text model) becomes a Llama computing the
same function; what Llama cannot do is refused or, with --allow-approximate, converted with a warning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import weightport
from conftest import TOKENS, build_hf, hf_logits
from llava_parts import VOCAB, build_clip, build_llm, build_xtuner_dir, llava_hf_logits, projector_weights, reference_logits
from weightport.errors import WeightportError


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return build_hf("phi3", tmp_path_factory.mktemp("phi3") / "phi3")


def test_llama_logits_equal_phi3_logits(phi3, tmp_path):
    plan = weightport.convert(phi3, tmp_path / "llama", "hf", to_arch="llama")
    assert "note:    architecture changed: phi3 -> llama (qkv_proj split into q/k/v by [64, 32, 32] rows, " \
           "gate_up_proj into gate/up, gate first)" in plan.render()
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert not {"resid_pdrop", "embd_pdrop", "original_max_position_embeddings"} & cfg.keys()
    src, got = load_file(phi3 / "model.safetensors"), load_file(tmp_path / "llama" / "model.safetensors")
    qkv = src["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"], qkv[64:96])
    assert torch.equal(got["model.layers.1.mlp.gate_proj.weight"], src["model.layers.1.mlp.gate_up_proj.weight"][:96])
    for tokens in TOKENS:
        assert (hf_logits(tmp_path / "llama", [tokens]) - hf_logits(phi3, [tokens])).abs().max() < 1e-5


def test_back_to_phi3_is_not_offered(phi3, tmp_path):
    weightport.convert(phi3, tmp_path / "llama", "hf", to_arch="llama")
    with pytest.raises(WeightportError) as e:
        weightport.convert(tmp_path / "llama", tmp_path / "x", "hf", to_arch="phi3")
    assert str(e.value) == "--to-arch phi3: weightport changes phi3 to llama only (this model's is llama)"


def test_sliding_window_needs_allow_approximate(tmp_path):
    src = build_hf("phi3", tmp_path / "phi3", sliding_window=8)
    with pytest.raises(WeightportError) as e:
        weightport.convert(src, tmp_path / "out", "hf", to_arch="llama")
    assert str(e.value) == ("sliding_window 8: Phi-3 attends to the last 8 tokens, Llama to all of them, so outputs "
                            "are equal only for sequences of at most 8 tokens (max_position_embeddings 256); pass "
                            "--allow-approximate to convert anyway")
    assert not (tmp_path / "out").exists()
    plan = weightport.convert(src, tmp_path / "out", "hf", to_arch="llama", allow_approximate=True)
    assert "warning: sliding_window 8: Phi-3 attends" in plan.render()
    ours, theirs = hf_logits(tmp_path / "out", [TOKENS[0]]), hf_logits(src, [TOKENS[0]])
    assert (ours[:, :8] - theirs[:, :8]).abs().max() < 1e-5  # inside the window: the same function
    assert (ours[:, 12:] - theirs[:, 12:]).abs().max() > 1e-2  # beyond it: what the warning says


def test_long_rope_is_refused_and_partial_rotary_always(tmp_path):
    factors = [1.0] * 8
    src = build_hf("phi3", tmp_path / "long", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors, "long_factor": factors,
        "original_max_position_embeddings": 64})
    with pytest.raises(WeightportError, match=r"^rope_type 'longrope' \(Phi-3's long-context scaling"):
        weightport.convert(src, tmp_path / "out", "hf", to_arch="llama")
    partial = build_hf("phi3", tmp_path / "partial", rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    with pytest.raises(WeightportError, match=r"^partial_rotary_factor 0.5: Phi-3 rotates only part"):
        weightport.convert(partial, tmp_path / "out", "hf", to_arch="llama", allow_approximate=True)


def test_llava_with_phi3_text_model(tmp_path):
    llm = build_llm(tmp_path / "phi3", kind="phi3")
    clip, proj = build_clip(tmp_path / "clip"), projector_weights()
    src = build_xtuner_dir(tmp_path / "x", llm, clip, proj)
    weightport.convert(src, tmp_path / "hf", "llava-hf", to_arch="llama")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "llama"
    want = reference_logits(llm, clip, proj, image_id=120)
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - want).abs().max() < 1e-5
