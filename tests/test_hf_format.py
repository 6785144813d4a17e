"""The hf adapter: every input layout transformers writes, sharded output with a true index,
metadata files, and dtype handling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import weightport
from conftest import build_hf, hf_logits


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_hf("qwen2", tmp_path_factory.mktemp("src") / "hf")


@pytest.mark.parametrize("layout", ["bin", "bin-sharded", "safetensors-sharded"])
def test_reads_every_transformers_layout(source, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    variant = tmp_path / layout
    if layout.startswith("bin"):
        # transformers 5 no longer writes .bin; build what 4.x wrote: pytorch_model*.bin (+ index)
        variant.mkdir()
        sd = load_file(source / "model.safetensors")
        (variant / "config.json").write_text((source / "config.json").read_text())
        if layout == "bin":
            torch.save(sd, variant / "pytorch_model.bin")
        else:
            names = sorted(sd)
            halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
            for fname, keys in halves.items():
                torch.save({k: sd[k] for k in keys}, variant / fname)
            index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
            (variant / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        model.save_pretrained(variant, max_shard_size="100KB")
    out = tmp_path / "out"
    weightport.convert(variant, out, "hf")
    a, b = load_file(source / "model.safetensors"), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_sharded_output_index_matches_files_and_loads(source, tmp_path):
    out = tmp_path / "out"
    plan = weightport.convert(source, out, "hf", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == len(plan.files) > 2
    assert sorted(set(index["weight_map"].values())) == shards
    held = {}
    for s in shards:
        for name in load_file(out / s):
            held[name] = s
    assert held == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(out).values())
    assert all((out / s).stat().st_size <= 100_000 + 10_000 for s in shards)
    assert (hf_logits(out) - hf_logits(source)).abs().max().item() == 0


def test_metadata_files_are_carried(source, tmp_path):
    src = tmp_path / "with_tok"
    weightport.convert(source, src, "hf")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (src / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    lit = tmp_path / "lit"
    weightport.convert(src, lit, "litgpt")
    back = tmp_path / "back"
    weightport.convert(lit, back, "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert json.loads((back / name).read_text()) == json.loads((src / name).read_text()), name
        assert (lit / name).exists()
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["torch_dtype"] == "float32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_cast(source, tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    out = tmp_path / name
    weightport.convert(source, out, "litgpt", dtype=name)
    sd = torch.load(out / "lit_model.pth", weights_only=True)
    assert {t.dtype for t in sd.values()} == {dtype}
    back = tmp_path / f"{name}-auto"
    weightport.convert(out, back, "hf")  # auto keeps the source's dtype
    b = _tensors(back)
    assert {t.dtype for t in b.values()} == {dtype}
    a = load_file(source / "model.safetensors")
    assert all(torch.equal(a[n].to(dtype), b[n]) for n in a)
    assert json.loads((back / "config.json").read_text())["dtype"] == name


def test_float16_overflow_is_refused_unless_allowed(tmp_path):
    src = build_hf("llama3", tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = 70000.0
    from safetensors.torch import save_file

    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(weightport.WeightportError) as err:
        weightport.convert(src, tmp_path / "out", "hf", dtype="float16")
    assert str(err.value) == ("tensor model.layers.1.mlp.down_proj.weight has values up to 70000, beyond float16's "
                              "±65504; pass --allow-overflow to cast anyway (they become inf)")
    assert not (tmp_path / "out").exists()
    weightport.convert(src, tmp_path / "out", "hf", dtype="float16", allow_overflow=True)
    assert torch.isinf(load_file(tmp_path / "out" / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]).any()


def test_bf16_source_keeps_bf16_bit_exact_through_litgpt(tmp_path):
    src = build_hf("mixtral", tmp_path / "src", dtype=torch.bfloat16)
    lit, back = tmp_path / "lit", tmp_path / "back"
    weightport.convert(src, lit, "litgpt")
    weightport.convert(lit, back, "hf")
    a, b = load_file(src / "model.safetensors"), _tensors(back)
    assert all(a[n].dtype == torch.bfloat16 and torch.equal(a[n], b[n]) for n in a)


def test_renamed_tensors_stream_in_pieces(source, tmp_path, monkeypatch):
    """Tiny pieces force the piecewise path (used for > 64 MB tensors) on every renamed tensor."""
    import weightport.execute as execute

    monkeypatch.setattr(execute, "CHUNK_BYTES", 1000)
    streamed = []
    real = execute._stream_rename
    monkeypatch.setattr(execute, "_stream_rename", lambda step, *a: real(step, *a) and not streamed.append(step))
    lit, back, half = tmp_path / "lit", tmp_path / "back", tmp_path / "half"
    weightport.convert(source, lit, "litgpt")
    weightport.convert(lit, back, "hf")
    # each way: embedding, lm_head, o_proj and the three MLP matrices of 2 layers (q/k/v are fused);
    # into safetensors in pieces, into lit_model.pth straight from the mapped source file
    assert len(streamed) == 20
    a, b = load_file(source / "model.safetensors"), _tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    weightport.convert(lit, half, "hf", dtype="bfloat16")
    c = _tensors(half)
    assert all(c[n].dtype == torch.bfloat16 and torch.equal(a[n].to(torch.bfloat16), c[n]) for n in a)
