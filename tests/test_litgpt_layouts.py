"""LitGPT variants users have on disk: legacy lit-gpt interleaved qkv, wrapped state dicts."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import weightport
from conftest import build_hf


def _interleave(qkv, n_head, n_kv, head):
    """lit-gpt <= 0.5.4: per query group, q heads then its k head then its v head."""
    q, k, v = qkv.split((n_head * head, n_kv * head, n_kv * head))
    qs, ks, vs = q.split(n_head // n_kv * head), k.split(head), v.split(head)
    return torch.cat([t for g in zip(qs, ks, vs) for t in g])


@pytest.fixture
def lit_dir(tmp_path):
    src = build_hf("llama3", tmp_path / "hf")  # 4 heads, 2 kv groups: interleaving matters
    lit = tmp_path / "lit"
    weightport.convert(src, lit, "litgpt")
    return src, lit


def test_legacy_interleaved_layout_reads_back_to_the_source(lit_dir, tmp_path):
    src, lit = lit_dir
    cfg = yaml.safe_load((lit / "model_config.yaml").read_text())
    sd = torch.load(lit / "lit_model.pth", weights_only=True)
    legacy = {}
    for name, t in sd.items():
        if name.endswith("attn.qkv.weight"):
            name = name.replace("attn.qkv.weight", "attn.attn.weight")
            t = _interleave(t, cfg["n_head"], cfg["n_query_groups"], cfg["head_size"])
        legacy[name] = t
    old = tmp_path / "legacy"
    old.mkdir()
    torch.save(legacy, old / "lit_model.pth")
    # the oldest config spelling: lit_config.json with underscored class fields
    cfg["_norm_class"] = cfg.pop("norm_class_name")
    cfg["_mlp_class"] = cfg.pop("mlp_class_name")
    (old / "lit_config.json").write_text(json.dumps(cfg))

    info = weightport.inspect(old)
    assert info.format == "litgpt" and "legacy" in info.variant

    back = tmp_path / "back"
    weightport.convert(old, back, "hf")
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)

    # and legacy -> current LitGPT equals the current file
    new = tmp_path / "new"
    weightport.convert(old, new, "litgpt")
    x, y = torch.load(lit / "lit_model.pth", weights_only=True), torch.load(new / "lit_model.pth", weights_only=True)
    assert sorted(x) == sorted(y) and all(torch.equal(x[n], y[n]) for n in x)


@pytest.mark.parametrize("wrap", ["model", "compiled"])
def test_wrapped_training_checkpoints(lit_dir, tmp_path, wrap):
    src, lit = lit_dir
    sd = torch.load(lit / "lit_model.pth", weights_only=True)
    out = tmp_path / "wrapped"
    out.mkdir()
    (out / "model_config.yaml").write_text((lit / "model_config.yaml").read_text())
    if wrap == "model":  # finetune/full.py and pretrain.py save {"model": ..., "optimizer": ...}
        torch.save({"model": sd, "iter_num": 3, "optimizer": {"state": {}}}, out / "lit_model.pth")
    else:  # torch.compile leaves _orig_mod. in every key
        torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, out / "lit_model.pth")
    back = tmp_path / "back"
    weightport.convert(out, back, "hf")
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_tied_embedding_is_stored_once_as_litgpt_does(tmp_path):
    src = build_hf("llama3.2", tmp_path / "hf")
    lit = tmp_path / "lit"
    weightport.convert(src, lit, "litgpt")
    sd = torch.load(lit / "lit_model.pth", weights_only=True, mmap=True)
    assert sd["lm_head.weight"].untyped_storage().data_ptr() == sd["transformer.wte.weight"].untyped_storage().data_ptr()
    back = tmp_path / "back"
    weightport.convert(lit, back, "hf")
    assert "lm_head.weight" not in load_file(back / "model.safetensors")
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is True
