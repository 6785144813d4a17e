"""GPT-2 in the `mindspore` format: HF -> MindFormers .ckpt -> HF, checked by the real MindSpore loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import weightport
from conftest import assert_mindspore_holds, hf_logits, mindspore_values, rule_sets_round_trip, run_cli
from weightport.archs import model_from_hf_config
from weightport.errors import WeightportError
from weightport.verify import verify

# build_hf speaks Llama config keys; GPT-2 has its own (n_embd, n_layer, n_inner, ...)
SIZES = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=200, n_positions=32, bos_token_id=1, eos_token_id=2)


def build_gpt2(path: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A tiny random GPT2LMHeadModel. Default init leaves biases 0 and LayerNorm 1/0, which would
    hide a swapped gamma/beta or q/k/v bias, so every parameter is re-drawn."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    model = GPT2LMHeadModel(GPT2Config(**{**SIZES, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


def _expected(hf: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """MindFormers' GPT-2 names and layouts (shared/formats/mindspore.md 2.5), written out independently."""
    E = cfg["n_embd"]
    out = {"backbone.embedding.word_embedding.embedding_table": hf["transformer.wte.weight"],
           "backbone.embedding.position_embedding.embedding_table": hf["transformer.wpe.weight"],
           "backbone.layernorm.gamma": hf["transformer.ln_f.weight"],
           "backbone.layernorm.beta": hf["transformer.ln_f.bias"]}
    for l in range(cfg["n_layer"]):
        h, m = f"transformer.h.{l}", f"backbone.blocks.{l}"
        for i in range(3):  # q, k, v: columns of the (in, out) Conv1D weight, stored (out, in)
            out[f"{m}.attention.dense{i + 1}.weight"] = hf[f"{h}.attn.c_attn.weight"][:, i * E:(i + 1) * E].T
            out[f"{m}.attention.dense{i + 1}.bias"] = hf[f"{h}.attn.c_attn.bias"][i * E:(i + 1) * E]
        for hn, mn in (("ln_1", "layernorm1"), ("ln_2", "layernorm2")):
            out[f"{m}.{mn}.gamma"], out[f"{m}.{mn}.beta"] = hf[f"{h}.{hn}.weight"], hf[f"{h}.{hn}.bias"]
        for hn, mn in (("attn.c_proj", "attention.projection"), ("mlp.c_fc", "output.mapping"),
                       ("mlp.c_proj", "output.projection")):  # not transposed
            out[f"{m}.{mn}.weight"], out[f"{m}.{mn}.bias"] = hf[f"{h}.{hn}.weight"], hf[f"{h}.{hn}.bias"]
    return out


def _same_files(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("overrides,expand_ratio", [({}, 4), ({"n_inner": 128, "n_layer": 3}, 2)])
def test_hf_to_mindspore_loads_in_mindspore_and_comes_back_exact(tmp_path, mindspore_peer, overrides, expand_ratio):
    hf_dir = build_gpt2(tmp_path / "hf", **overrides)
    assert "lm_head.weight" not in load_file(hf_dir / "model.safetensors")  # transformers 5 omits the tied head
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore")
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = _expected(load_file(hf_dir / "model.safetensors"), cfg)

    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, expected, "Float32")

    mc = yaml.safe_load((ms / "mindformers.yaml").read_text())
    assert mc["weightport"] == {"layout": "separate", "hf_architecture": "GPT2LMHeadModel"}
    assert mc["model"]["arch"] == {"type": "GPT2LMHeadModel"}
    mc = mc["model"]["model_config"]
    assert (mc["type"], mc["num_layers"], mc["hidden_size"], mc["num_heads"], mc["vocab_size"], mc["seq_length"],
            mc["expand_ratio"], mc["hidden_act"], mc["compute_dtype"]) == (
        "GPT2Config", cfg["n_layer"], 64, 4, 200, 32, expand_ratio, "gelu", "float32")

    back = tmp_path / "back"
    weightport.convert(ms, back, "hf")
    _same_files(hf_dir, back)
    a, b = hf_logits(hf_dir), hf_logits(back)
    assert (a - b).abs().max().item() == 0.0
    assert verify(hf_dir, ms, tensors_only=True).equivalent
    report = verify(hf_dir, ms, samples=2)
    assert report.equivalent and report.function.max_abs_diff == 0.0, report.render()


def test_bfloat16_on_write_is_native(tmp_path, mindspore_peer):
    hf_dir = build_gpt2(tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore", dtype="bfloat16")
    loaded = mindspore_values(mindspore_peer, ms / "model.ckpt", tmp_path)
    expected = _expected(load_file(hf_dir / "model.safetensors"), json.loads((hf_dir / "config.json").read_text()))
    assert set(loaded) == set(expected) and {d for _, d, _ in loaded.values()} == {"BFloat16"}
    for name, t in expected.items():
        assert np.array_equal(loaded[name][2], t.to(torch.bfloat16).float().numpy()), name
    mc = yaml.safe_load((ms / "mindformers.yaml").read_text())["model"]["model_config"]
    assert mc["compute_dtype"] == mc["param_init_type"] == "bfloat16"
    report = verify(hf_dir, ms, tensors_only=True)
    assert report.equivalent and {r.status for r in report.tensors.results} == {"cast"}


def test_old_checkpoint_buffers_and_tied_head_are_dropped(tmp_path):
    """transformers 4 checkpoints carry the causal-mask buffers and the tied lm_head."""
    hf_dir = build_gpt2(tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    new = dict(tensors)
    for l in range(SIZES["n_layer"]):
        new[f"transformer.h.{l}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        new[f"transformer.h.{l}.attn.masked_bias"] = torch.tensor(-1e4)
    new["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file(new, old / "model.safetensors", metadata={"format": "pt"})

    plan = weightport.convert(old, tmp_path / "ms", "mindspore")
    assert sorted(n for n, _ in plan.dropped) == sorted(set(new) - set(tensors))
    weightport.convert(tmp_path / "ms", tmp_path / "back", "hf")
    _same_files(hf_dir, tmp_path / "back")


def test_base_model_names_as_the_original_gpt2_files_have(tmp_path):
    """openai-community/gpt2 stores GPT2Model's names (h.0.attn..., wte.weight) with the mask
    buffers; transformers loads them into GPT2LMHeadModel, and so do we."""
    hf_dir = build_gpt2(tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    bare = {n.removeprefix("transformer."): t for n, t in tensors.items()}
    for l in range(SIZES["n_layer"]):
        bare[f"h.{l}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file(bare, orig / "model.safetensors", metadata={"format": "pt"})

    plan = weightport.convert(orig, tmp_path / "ms", "mindspore")
    assert "base-model names (no 'transformer.')" in plan.source.variant
    assert sorted(n for n, _ in plan.dropped) == [f"h.{l}.attn.bias" for l in range(SIZES["n_layer"])]
    weightport.convert(tmp_path / "ms", tmp_path / "back", "hf")
    _same_files(hf_dir, tmp_path / "back")
    assert torch.equal(hf_logits(orig), hf_logits(tmp_path / "back"))


@pytest.mark.parametrize("overrides,message", [
    ({"tie_word_embeddings": False}, "has no lm_head of its own"),
    ({"n_inner": 100}, "n_inner=100 is not a multiple of n_embd=64"),
    ({"activation_function": "gelu"}, "has no activation 'gelu'"),
    ({"layer_norm_epsilon": 1e-6}, "fixes LayerNorm epsilon at 1e-5"),
    ({"scale_attn_by_inverse_layer_idx": True}, "always scales attention by 1/sqrt(head_dim)"),
])
def test_what_mindformers_gpt2_cannot_hold_is_refused(tmp_path, overrides, message):
    hf_dir = build_gpt2(tmp_path / "hf", **overrides)
    with pytest.raises(WeightportError, match="MindFormers' GPT-2 .*" + message.replace("(", r"\(").replace(")", r"\)")):
        weightport.convert(hf_dir, tmp_path / "ms", "mindspore")
    assert not (tmp_path / "ms").exists()


def test_dry_run_plan(tmp_path):
    hf_dir = build_gpt2(tmp_path / "hf")
    proc = run_cli("convert", hf_dir, tmp_path / "ms", "--to", "mindspore", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "gpt2 (GPT2LMHeadModel), 2 layers, hidden 64, 4 heads / 4 kv, vocab 200, tied embeddings" in proc.stdout
    assert "[mindspore, separate layout]" in proc.stdout
    assert not (tmp_path / "ms").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_rule_set_round_trips(dtype):
    """What tests/test_rules.py checks for its (Llama-keyed) configs, for GPT-2."""
    model = model_from_hf_config({"model_type": "gpt2", **SIZES, "n_inner": 192}, "gpt2")
    assert {("hf", None), ("mindspore", "separate")} <= set(rule_sets_round_trip(model, dtype))
