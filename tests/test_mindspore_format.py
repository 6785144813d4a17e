"""The `mindspore` format: HF -> MindFormers .ckpt -> HF, checked by the real MindSpore loader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import weightport
from conftest import assert_mindspore_holds, build_hf, mindspore_values, run_cli
from weightport.formats.mindspore.ckpt import MsCkptFile, MsCkptWriter
from weightport.formats.mindspore.compat import MODELS as MINDFORMERS_KEYS
from weightport.verify import verify

# MindFormers' conversion table entries with a transformers implementation, by our test models
MODELS = ["llama2", "llama3", "llama3.1", "llama3.2", "qwen2", "mixtral"]
LAYOUTS = ["separate", "fused", "fused-interleaved"]


def _expected(hf: dict[str, torch.Tensor], cfg: dict, layout: str) -> dict[str, torch.Tensor]:
    """MindFormers names and layouts, written out here independently of the format's rules."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // heads
    out = {"model.tok_embeddings.embedding_weight": hf["model.embed_tokens.weight"],
           "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]),
           "model.norm_out.weight": hf["model.norm.weight"]}
    for l in range(cfg["num_hidden_layers"]):
        h, m = f"model.layers.{l}", f"model.layers.{l}"
        out[f"{m}.attention_norm.weight"] = hf[f"{h}.input_layernorm.weight"]
        out[f"{m}.ffn_norm.weight"] = hf[f"{h}.post_attention_layernorm.weight"]
        out[f"{m}.attention.wo.weight"] = hf[f"{h}.self_attn.o_proj.weight"]
        for w in ("weight", "bias"):
            q, k, v = (hf.get(f"{h}.self_attn.{p}_proj.{w}") for p in "qkv")
            if q is None:
                continue
            if layout == "separate":
                out.update({f"{m}.attention.wq.{w}": q, f"{m}.attention.wk.{w}": k, f"{m}.attention.wv.{w}": v})
            elif layout == "fused":
                out[f"{m}.attention.w_qkv.{w}"] = torch.cat([q, k, v])
            else:  # per kv group: its q heads, its k head, its v head
                rest = q.shape[1:]
                out[f"{m}.attention.w_qkv.{w}"] = torch.cat([
                    q.reshape(kv, heads // kv * hd, *rest), k.reshape(kv, hd, *rest), v.reshape(kv, hd, *rest)],
                    dim=1).reshape(-1, *rest)
        if cfg.get("num_local_experts"):
            out[f"{m}.feed_forward.router.dense.weight"] = hf[f"{h}.block_sparse_moe.gate.weight"]
            for w in ("w1", "w2", "w3"):
                out[f"{m}.feed_forward.ffn.{w}.weight"] = torch.stack(
                    [hf[f"{h}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(cfg["num_local_experts"])])
            continue
        gate, up = hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]
        out[f"{m}.feed_forward.w2.weight"] = hf[f"{h}.mlp.down_proj.weight"]
        if layout == "separate":
            out[f"{m}.feed_forward.w1.weight"], out[f"{m}.feed_forward.w3.weight"] = gate, up
        elif layout == "fused":
            out[f"{m}.feed_forward.w_gate_hidden.weight"] = torch.cat([gate, up])
        else:
            out[f"{m}.feed_forward.w_gate_hidden.weight"] = torch.stack([gate, up], 1).reshape(-1, gate.shape[1])
    return out




@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", MODELS)
def test_hf_to_mindspore_loads_in_mindspore_and_comes_back_exact(tmp_path, mindspore_peer, model, layout):
    if model == "mixtral" and layout != "separate":
        layout = "fused-interleaved"  # experts stay stacked; only attention fuses
    hf_dir = build_hf(model, tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore", layout=layout)
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = _expected(load_file(hf_dir / "model.safetensors"), cfg, layout)

    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, expected, "Float32")

    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())
    assert mf["weightport"]["layout"] == layout
    assert mf["model"]["model_config"]["qkv_concat"] == (layout != "separate")

    back = tmp_path / "back"
    weightport.convert(ms, back, "hf")
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    report = verify(hf_dir, ms, samples=2)
    assert report.equivalent and report.function.max_abs_diff == 0.0, report.render()


@pytest.mark.parametrize("dtype,ms_name", [("bfloat16", "BFloat16"), ("float16", "Float16")])
def test_dtype_on_write_is_native(tmp_path, mindspore_peer, dtype, ms_name):
    hf_dir = build_hf("llama3", tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore", dtype=dtype)
    loaded = mindspore_values(mindspore_peer, ms / "model.ckpt", tmp_path)
    src = load_file(hf_dir / "model.safetensors")
    assert {d for _, d, _ in loaded.values()} == {ms_name}
    want = src["model.layers.1.mlp.down_proj.weight"].to(getattr(torch, dtype)).float().numpy()
    assert np.array_equal(loaded["model.layers.1.feed_forward.w2.weight"][2].astype(np.float32), want)
    assert yaml.safe_load((ms / "mindformers.yaml").read_text())["model"]["model_config"]["compute_dtype"] == dtype
    report = verify(hf_dir, ms, tensors_only=True)
    assert report.equivalent and {r.status for r in report.tensors.results} == {"cast"}


def test_fused_layout_is_detected_and_overridable(tmp_path):
    hf_dir = build_hf("llama3", tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore", layout="fused")
    # without the recorded layout (a file from MindFormers itself): read as >= 1.5 interleaved, said so
    (ms / "mindformers.yaml").unlink()
    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert plan.source.variant == ".ckpt, fused-interleaved layout"
    assert any("pass --from-layout fused" in n for n in plan.source.notes)
    plan.source.close()
    assert not verify(hf_dir, ms, tensors_only=True).equivalent  # the wrong guess is caught, not hidden
    proc = run_cli("convert", ms, tmp_path / "back", "--to", "hf", "--from-layout", "fused", "-q")
    assert proc.returncode == 0, proc.stderr
    assert verify(hf_dir, tmp_path / "back", tensors_only=True).equivalent
    bad = run_cli("convert", ms, tmp_path / "bad", "--to", "hf", "--from-layout", "separate")
    assert bad.stderr == (f"weightport: error: {ms / 'model.ckpt'}: its names and shapes are those of layout "
                          "fused-interleaved or fused, not separate\n")
    bad = run_cli("convert", hf_dir, tmp_path / "bad", "--to", "mindspore", "--layout", "zigzag")
    assert bad.stderr == ("weightport: error: format mindspore has no layout 'zigzag' for llama (choose one of "
                          "separate, fused, fused-interleaved, gmm)\n")


def test_training_checkpoint_state_is_dropped_and_yaml_alone_suffices(tmp_path):
    """A MindFormers training .ckpt: optimizer moments and step counters next to the weights,
    and only the MindFormers yaml to say what the model is."""
    hf_dir = build_hf("qwen2", tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore")
    train = tmp_path / "train"
    train.mkdir()
    src = MsCkptFile(ms / "model.ckpt")
    with MsCkptWriter(train / "rank_0.ckpt") as w:
        for name in src.entries:
            w.write(name, src.load(name))
            w.write(f"adam_m.{name}", torch.zeros(src.entries[name][0]))
        w.write("global_step", torch.tensor(1200))
        w.write("loss_scale", torch.tensor(1024.0))
    src.close()
    shutil.copy(ms / "mindformers.yaml", train / "qwen2_train.yaml")
    y = yaml.safe_load((train / "qwen2_train.yaml").read_text())
    del y["weightport"]
    (train / "qwen2_train.yaml").write_text(yaml.safe_dump(y))
    plan = weightport.plan_conversion(train, tmp_path / "x", "hf")
    drops = dict(plan.dropped)
    assert drops["global_step"] == "training state, not a weight"
    assert drops["adam_m.model.norm_out.weight"] == "training state, not a weight"
    assert plan.source.model.arch.name == "qwen2"
    plan.source.close()
    back = tmp_path / "back"
    weightport.convert(train, back, "hf")
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_what_mindformers_llama_cannot_hold_is_refused(tmp_path):
    for model, message in (
        ("llama-bias", "MindFormers' Llama has no o_proj / MLP biases (attention_bias / mlp_bias)"),
        ("gemma", "format mindspore does not support gemma (formats that do: hf, litgpt)"),
    ):
        hf_dir = build_hf(model, tmp_path / model)
        proc = run_cli("convert", hf_dir, tmp_path / f"{model}-ms", "--to", "mindspore")
        assert proc.returncode == 1
        assert proc.stderr == f"weightport: error: {message}\n"
        assert not (tmp_path / f"{model}-ms").exists()


def test_mindformers_compatible_command_line(tmp_path, mindspore_peer):
    hf_dir = build_hf("llama3.2", tmp_path / "hf", dtype=torch.bfloat16)
    out = tmp_path / "ms" / "llama3.ckpt"
    out.parent.mkdir()
    # MindFormers <= 1.3 took a file inside the HF directory as --input_path
    proc = run_cli("mindformers", "--model", "llama", "--input_path", hf_dir / "config.json",
                   "--output_path", out, "--dtype", "bf16", "--qkv_concat", "True", "--n_head", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {out} (and config.json, mindformers.yaml beside it)\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.json", "llama3.ckpt", "mindformers.yaml"]
    loaded = mindspore_values(mindspore_peer, out, tmp_path)
    assert loaded["model.layers.0.attention.w_qkv.weight"][:2] == ([128, 64], "BFloat16")
    assert loaded["lm_head.weight"][0] == [128, 64]  # tied, written as MindFormers does from state_dict()

    back = tmp_path / "back"
    proc = run_cli("mindformers", "--model", "llama", "--reversed", "--input_path", out, "--output_path", back)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    for args, message in (
        (["--model", "telechat"], "--model telechat: in MindFormers' table, but weightport does not convert it "
                                  f"yet (supported: {', '.join(MINDFORMERS_KEYS)})"),
        (["--model", "qwen2"], f"--model qwen2: {hf_dir} is a llama model (LlamaForCausalLM)"),
        (["--model", "llama", "--layers", "32"], "--layers 32: the model's config says 2"),
        (["--model", "llama"], f"{out}: already exists; pass --force to replace it"),
    ):
        proc = run_cli("mindformers", *args, "--input_path", hf_dir, "--output_path", out)
        assert (proc.returncode, proc.stderr) == (1, f"weightport: error: {message}\n")


# MindSpore 2.10 reads bf16 safetensors only through numpy's bfloat16, which it refuses with the
# numpy 2.4 its requirements allow ("Numpy bfloat16 data type is not supported"): its own
# save_checkpoint(format="safetensors") of a bf16 tensor fails the same way, so fp32 and fp16 here
@pytest.mark.parametrize("model,dtype,ms_dtype", [("llama3.2", torch.float32, "Float32"),
                                                  ("qwen2", torch.float16, "Float16")])
def test_safetensors_container_loads_in_mindspore_and_comes_back_exact(tmp_path, mindspore_peer, model, dtype,
                                                                       ms_dtype):
    """MindFormers >= 1.5 saves MindSpore safetensors (metadata format "ms"), not .ckpt."""
    hf_dir = build_hf(model, tmp_path / "hf", dtype=dtype)
    ms = tmp_path / "ms"
    proc = run_cli("convert", hf_dir, ms, "--to", "mindspore", "--container", "safetensors", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in ms.iterdir()) == ["config.json", "generation_config.json", "mindformers.yaml",
                                                   "model.safetensors", "weightport-manifest.json"]
    from safetensors import safe_open
    with safe_open(ms / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "ms"}
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = _expected(load_file(hf_dir / "model.safetensors"), cfg, "separate")
    assert_mindspore_holds(mindspore_peer, ms / "model.safetensors", tmp_path, expected, ms_dtype)
    # config.json beside model.safetensors must not make it look like a Hugging Face directory
    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert (plan.source.format.name, plan.source.variant) == ("mindspore", "safetensors, separate layout")
    plan.source.close()
    weightport.convert(ms, tmp_path / "back", "hf")
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    bad = run_cli("convert", hf_dir, tmp_path / "bad", "--to", "hf", "--container", "safetensors")
    assert bad.stderr == "weightport: error: format hf has no container 'safetensors' (it has only one)\n"


def test_reads_safetensors_saved_by_mindspore(tmp_path, mindspore_peer):
    hf_dir = build_hf("llama3", tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = _expected(load_file(hf_dir / "model.safetensors"), cfg, "separate")
    ms = tmp_path / "ms"
    ms.mkdir()
    shutil.copy(hf_dir / "config.json", ms / "config.json")
    params = []
    for i, (name, t) in enumerate(expected.items()):
        np.save(tmp_path / f"{i}.npy", t.numpy())
        params.append({"name": name, "npy": str(tmp_path / f"{i}.npy"), "dtype": "float16"})
    (result,) = mindspore_peer([{"op": "save", "path": str(ms / "net.safetensors"), "params": params,
                                 "crc_check": True}], tmp_path)
    assert result == {"ok": True}
    weightport.convert(ms, tmp_path / "back", "hf")
    back = load_file(tmp_path / "back" / "model.safetensors")
    src = load_file(hf_dir / "model.safetensors")
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[k], src[k].to(torch.float16)) for k in src)


def test_gmm_layout_stacks_experts_in_by_out(tmp_path, mindspore_peer):
    """use_gmm: MindFormers' grouped matmul takes each layer's experts as (experts, in, out)."""
    hf_dir = build_hf("mixtral", tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore", layout="gmm")
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = _expected(load_file(hf_dir / "model.safetensors"), cfg, "separate")
    expected = {n: t.transpose(1, 2) if ".feed_forward.ffn." in n else t for n, t in expected.items()}
    loaded = mindspore_values(mindspore_peer, ms / "model.ckpt", tmp_path)
    assert sorted(loaded) == sorted(expected)
    for name, t in expected.items():
        assert loaded[name][0] == list(t.shape) and np.array_equal(loaded[name][2], t.numpy()), name
    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())["model"]["model_config"]
    assert mf["moe_config"]["use_gmm"] is True and mf["qkv_concat"] is False
    # a MindFormers file records no layout; the expert shapes tell gmm from separate
    (ms / "mindformers.yaml").unlink()
    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert plan.source.variant == ".ckpt, gmm layout" and not plan.source.notes
    plan.source.close()
    report = verify(hf_dir, ms, samples=2)
    assert report.equivalent and report.function.max_abs_diff == 0.0, report.render()
    bad = run_cli("convert", build_hf("llama3", tmp_path / "llama"), tmp_path / "bad", "--to", "mindspore",
                  "--layout", "gmm")
    assert bad.stderr == "weightport: error: layout gmm is for mixture-of-experts models; this model has no experts\n"
