"""Whisper in the `mindspore` format: HF -> MindFormers .ckpt -> HF, checked by the real MindSpore loader
and by transformers' own forward pass.

MindFormers removed Whisper (and its converter) in June 2025, so the expected names are written
here from mindformers/models/whisper/convert_weight.py (r1.5.0), not run from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import weightport
from conftest import assert_mindspore_holds, mindspore_values, rule_sets_round_trip, run_cli
from weightport.archs import model_from_hf_config
from weightport.errors import WeightportError
from weightport.verify import verify

# decoder and encoder sized differently, so a mixed-up layer count or head count shows
SIZES = dict(vocab_size=200, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
             decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=128, max_source_positions=30,
             max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)


def build_whisper(path: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A tiny random WhisperForConditionalGeneration. Default init leaves biases 0, LayerNorm 1/0
    and the encoder positions sinusoidal, which would hide swaps, so every parameter is re-drawn."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(11)
    model = WhisperForConditionalGeneration(WhisperConfig(**{**SIZES, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


def mindformers_convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What MindFormers' whisper convert_pt_to_ms does to each torch state-dict entry, in its order."""
    out = {}
    for key, t in state_dict.items():
        if "embed_tokens.weight" in key:
            key = key.replace("weight", "embedding_weight")
        if "embed_positions.weight" in key:
            key = key.replace("weight", "embedding_weight")
        if "layer_norm" in key:
            key = key.replace("weight", "gamma").replace("bias", "beta")
        if "conv1.weight" in key or "conv2.weight" in key:
            t = t.reshape(t.shape[0], t.shape[1], 1, t.shape[2])
        out[key] = t
    return out


def state_dict_order(hf_dir: Path) -> list[str]:
    """The order torch's state_dict() has (the safetensors file sorts its names)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(hf_dir))
    return [n for n in model.state_dict() if n != "proj_out.weight"]


def whisper_logits(path: Path) -> torch.Tensor:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
    decoder_ids = torch.tensor([[3, 5, 9, 17, 101, 199], [3, 4, 4, 150, 7, 8]])
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=decoder_ids).logits


def _same_files(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("overrides", [{}, {"encoder_layers": 3, "decoder_layers": 1, "num_mel_bins": 8}])
def test_hf_to_mindspore_loads_in_mindspore_and_comes_back_exact(tmp_path, mindspore_peer, overrides):
    hf_dir = build_whisper(tmp_path / "hf", **overrides)
    hf = load_file(hf_dir / "model.safetensors")
    assert "proj_out.weight" not in hf  # transformers 5 omits the tied head
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore")
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = mindformers_convert({n: hf[n] for n in state_dict_order(hf_dir)})
    assert expected["model.encoder.conv1.weight"].shape == (64, cfg["num_mel_bins"], 1, 3)

    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, expected, "Float32")
    assert list(mindspore_values(mindspore_peer, ms / "model.ckpt", tmp_path)) == list(expected)  # converter's order

    mc = yaml.safe_load((ms / "mindformers.yaml").read_text())
    assert mc["weightport"] == {"layout": "separate", "hf_architecture": "WhisperForConditionalGeneration"}
    assert mc["model"]["arch"] == {"type": "WhisperForConditionalGeneration"}
    mc = mc["model"]["model_config"]
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
                "max_target_positions", "decoder_start_token_id", "activation_function"):
        assert mc[key] == cfg[key], key
    assert (mc["type"], mc["compute_dtype"], mc["param_init_type"]) == ("WhisperConfig", "float32", "float32")

    back = tmp_path / "back"
    weightport.convert(ms, back, "hf")
    _same_files(hf_dir, back)
    assert (whisper_logits(hf_dir) - whisper_logits(back)).abs().max().item() == 0.0
    report = verify(hf_dir, ms, samples=1)  # tensors and config; the logits are compared above
    assert report.equivalent and report.function is None
    assert report.notes == ["function level not run: WhisperForConditionalGeneration is not a causal LM taking token ids"]


def test_float16_on_write(tmp_path, mindspore_peer):
    """MindFormers' Whisper guide converts with --dtype fp16."""
    hf_dir = build_whisper(tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore", dtype="float16")
    hf = load_file(hf_dir / "model.safetensors")
    expected = {n: t.half() for n, t in mindformers_convert({n: hf[n] for n in state_dict_order(hf_dir)}).items()}
    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, expected, "Float16")
    mc = yaml.safe_load((ms / "mindformers.yaml").read_text())["model"]["model_config"]
    assert mc["compute_dtype"] == mc["param_init_type"] == mc["embedding_init_type"] == "float16"
    report = verify(hf_dir, ms, tensors_only=True)
    assert report.equivalent and {r.status for r in report.tensors.results} == {"cast"}


def test_reads_what_mindformers_converter_wrote(tmp_path, mindspore_peer):
    """MindFormers' converter walks a torch state dict that carries the tied proj_out (as the
    pytorch_model.bin files do) and saves every entry with MindSpore's save_checkpoint; here the same
    list goes through the real save_checkpoint, in fp16, beside the Hugging Face config.json."""
    from transformers import WhisperForConditionalGeneration

    hf_dir = build_whisper(tmp_path / "hf")
    state = WhisperForConditionalGeneration.from_pretrained(hf_dir).state_dict()
    assert "proj_out.weight" in state
    converted = mindformers_convert(state)
    npy = tmp_path / "npy"
    npy.mkdir()
    params = []
    for i, (name, t) in enumerate(converted.items()):
        np.save(npy / f"{i}.npy", t.numpy())
        params.append({"name": name, "npy": str(npy / f"{i}.npy"), "dtype": "float16"})
    mf = tmp_path / "mf"
    mf.mkdir()
    (result,) = mindspore_peer([{"op": "save", "path": str(mf / "whisper.ckpt"), "params": params}], tmp_path)
    assert result == {"ok": True}
    (mf / "config.json").write_text((hf_dir / "config.json").read_text())

    back = tmp_path / "back"
    plan = weightport.convert(mf, back, "hf")
    assert plan.dropped == [("proj_out.weight", "recomputed by the model")]
    hf, got = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(got) == sorted(hf)
    assert all(got[n].dtype == torch.float16 and torch.equal(got[n], hf[n].half()) for n in hf)


def test_config_from_the_mindformers_yaml_alone(tmp_path):
    """A .ckpt with only its MindFormers yaml beside it: the yaml gives the config transformers needs."""
    hf_dir = build_whisper(tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore")
    (ms / "config.json").unlink()
    mc = yaml.safe_load((ms / "mindformers.yaml").read_text())
    del mc["weightport"]
    (ms / "mindformers.yaml").write_text(yaml.safe_dump(mc))
    back = tmp_path / "back"
    weightport.convert(ms, back, "hf")
    _same_files(hf_dir, back)
    assert torch.equal(whisper_logits(hf_dir), whisper_logits(back))


def test_hf_with_tied_proj_out_saved(tmp_path):
    """Older transformers (and state_dict()) save proj_out.weight beside the embedding it is tied to."""
    hf_dir = build_whisper(tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file({**tensors, "proj_out.weight": tensors["model.decoder.embed_tokens.weight"].clone()},
              old / "model.safetensors", metadata={"format": "pt"})
    plan = weightport.convert(old, tmp_path / "ms", "mindspore")
    assert [n for n, _ in plan.dropped] == ["proj_out.weight"]
    weightport.convert(tmp_path / "ms", tmp_path / "back", "hf")
    _same_files(hf_dir, tmp_path / "back")


@pytest.mark.parametrize("overrides,message", [
    ({"tie_word_embeddings": False}, "has no proj_out of its own"),
    ({"scale_embedding": True}, "never scales the token embedding"),
    ({"activation_function": "gelu_new"}, "has no activation 'gelu_new'"),
])
def test_what_mindformers_whisper_cannot_hold_is_refused(tmp_path, overrides, message):
    hf_dir = build_whisper(tmp_path / "hf", **overrides)
    with pytest.raises(WeightportError, match="MindFormers' Whisper .*" + message):
        weightport.convert(hf_dir, tmp_path / "ms", "mindspore")
    assert not (tmp_path / "ms").exists()


def test_untied_proj_out_is_a_hub_tensor(tmp_path):
    hf_dir = build_whisper(tmp_path / "hf", tie_word_embeddings=False)
    assert "proj_out.weight" in load_file(hf_dir / "model.safetensors")
    weightport.convert(hf_dir, tmp_path / "back", "hf")
    _same_files(hf_dir, tmp_path / "back")


def test_mindformers_command_line(tmp_path):
    hf_dir = build_whisper(tmp_path / "hf")
    out = tmp_path / "out" / "whisper.ckpt"
    out.parent.mkdir()
    proc = run_cli("mindformers", "--model", "whisper", "--input_path", hf_dir, "--output_path", out,
                   "--layers", "3", "--hidden_size", "64")
    assert proc.returncode == 0, proc.stderr
    rev = tmp_path / "rev"
    proc = run_cli("mindformers", "--model", "whisper", "--reversed", "--input_path", out, "--output_path", rev)
    assert proc.returncode == 0, proc.stderr
    _same_files(hf_dir, rev)
    proc = run_cli("mindformers", "--model", "gpt", "--input_path", hf_dir, "--output_path", tmp_path / "x.ckpt")
    assert proc.returncode != 0 and "is a whisper model" in proc.stderr


def test_dry_run_plan(tmp_path):
    hf_dir = build_whisper(tmp_path / "hf")
    proc = run_cli("convert", hf_dir, tmp_path / "ms", "--to", "mindspore", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "whisper (WhisperForConditionalGeneration), 3 layers, hidden 64, 2 heads / 2 kv, vocab 200, " \
           "tied embeddings" in proc.stdout
    assert "add_axis(dim=2)" in proc.stdout
    assert not (tmp_path / "ms").exists()


def test_squeezed_conv_kernel_is_refused(tmp_path):
    """A kernel stored (out, in, k), without MindFormers' extra axis, does not fit."""
    hf_dir = build_whisper(tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore", container="safetensors")
    tensors = load_file(ms / "model.safetensors")
    tensors["model.encoder.conv2.weight"] = tensors["model.encoder.conv2.weight"].squeeze(2)
    save_file(tensors, ms / "model.safetensors", metadata={"format": "ms"})
    with pytest.raises(WeightportError, match="model.encoder.conv2.weight"):
        weightport.convert(ms, tmp_path / "back", "hf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_rule_set_round_trips(dtype):
    """What tests/test_rules.py checks for its (Llama-keyed) configs, for Whisper."""
    model = model_from_hf_config({"model_type": "whisper", **SIZES}, "whisper")
    assert {("hf", None), ("mindspore", "separate")} <= set(rule_sets_round_trip(model, dtype))
