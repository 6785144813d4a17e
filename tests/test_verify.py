"""`weightport verify`: correct conversions pass; planted conversion bugs fail, naming the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightport
from conftest import build_hf, build_tokenizer, litgpt_python, run_cli
from weightport.ops import RotaryPermute
from weightport.verify import verify
from weightport.verify.tensors import compare


def _edit_hf(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_lit(directory, fn):
    path = directory / "lit_model.pth"
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _bad(report) -> dict:
    return {r.name: r for r in report.tensors.results if not r.ok}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """llama2 shape: 4 heads = 4 kv heads, so q and k have one shape and can be swapped."""
    root = tmp_path_factory.mktemp("verify")
    hf = build_hf("llama2", root / "hf")
    lit = root / "lit"
    weightport.convert(hf, lit, "litgpt")
    return root, hf, lit


# --- correct conversions pass, for every format pair -------------------------------------------

PAIRS = [("hf", "litgpt"), ("litgpt", "hf"), ("litgpt", "litgpt"), ("hf", "hf")]


@pytest.mark.parametrize("model", ["llama3.2", "mixtral", "phi3", "gemma", "qwen2"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "->".join(p))
def test_correct_conversion_is_equivalent(tmp_path, model, pair):
    src, dst = pair
    hf = build_hf(model, tmp_path / "hf")
    a = hf if src == "hf" else weightport.convert(hf, tmp_path / "a", "litgpt").out_dir
    b = tmp_path / "b"
    weightport.convert(a, b, dst)
    report = verify(a, b, samples=2)
    assert report.equivalent, report.render()
    assert not report.config
    assert {r.status for r in report.tensors.results} == {"exact"}
    assert report.function.max_abs_diff == 0.0
    assert report.function.top1_agreement == 1.0
    assert report.function.a.loss == report.function.b.loss


def test_dtype_cast_is_reported_as_cast_and_judged_at_that_dtype(llama, tmp_path):
    _, hf, _ = llama
    b = tmp_path / "bf16"
    weightport.convert(hf, b, "litgpt", dtype="bfloat16")
    report = verify(hf, b, samples=2)
    assert report.equivalent, report.render()
    assert {r.status for r in report.tensors.results} == {"cast"}
    assert report.function.dtype == "bfloat16"
    assert 0 < report.function.max_abs_diff < 0.2


# --- planted errors: each fails and names the tensor --------------------------------------------

def test_rotary_permutation_applied_twice(llama, tmp_path):
    _, hf, _ = llama
    b = shutil.copytree(hf, tmp_path / "b")
    name = "model.layers.1.self_attn.q_proj.weight"
    _edit_hf(b, lambda t: t.update({name: RotaryPermute(4, 16).forward([t[name]])[0]}))
    report = verify(hf, b, samples=2)
    assert not report.equivalent
    bad = _bad(report)
    assert list(bad) == [name]
    assert bad[name].status == "different"
    assert bad[name].note == "same rows in another order (a row permutation)"
    assert not report.function.ok


def test_q_and_k_swapped_in_a_fused_qkv(llama, tmp_path):
    """A buggy converter that swaps q and k before fusing: found through LitGPT's qkv."""
    _, hf, _ = llama
    swapped = shutil.copytree(hf, tmp_path / "swapped")
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    _edit_hf(swapped, lambda t: t.update({q: t[k], k: t[q]}))
    b = tmp_path / "b"
    weightport.convert(swapped, b, "litgpt")
    report = verify(hf, b, samples=2)
    bad = _bad(report)
    assert sorted(bad) == [k, q]
    assert bad[q].b_source == ["transformer.h.0.attn.qkv.weight"]
    assert not report.equivalent


def test_gate_and_up_swapped(llama, tmp_path):
    _, hf, lit = llama
    b = shutil.copytree(lit, tmp_path / "b")
    g, u = "transformer.h.1.mlp.fc_1.weight", "transformer.h.1.mlp.fc_2.weight"
    _edit_lit(b, lambda sd: sd.update({g: sd[u], u: sd[g]}))
    report = verify(hf, b, samples=2)
    bad = _bad(report)
    assert sorted(bad) == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert bad["model.layers.1.mlp.gate_proj.weight"].b_source == [g]
    assert not report.equivalent


def test_transposed_square_matrix(llama, tmp_path):
    _, hf, _ = llama
    b = shutil.copytree(hf, tmp_path / "b")
    name = "model.layers.0.self_attn.o_proj.weight"
    _edit_hf(b, lambda t: t.update({name: t[name].T.contiguous()}))
    report = verify(hf, b, samples=2)
    bad = _bad(report)
    assert list(bad) == [name]
    assert bad[name].note == "B holds A transposed"
    assert "B holds A transposed" in report.render()


def test_one_ulp_in_bf16_is_reported_not_hidden(tmp_path):
    a = build_hf("llama3", tmp_path / "a", dtype=torch.bfloat16)
    b = shutil.copytree(a, tmp_path / "b")
    name = "model.layers.1.mlp.down_proj.weight"

    def nudge(t):
        w = t[name].clone()
        w.view(torch.int16)[3, 5] += 1  # the next representable bf16 value
        t[name] = w

    _edit_hf(b, nudge)
    report = verify(a, b, samples=2)
    bad = _bad(report)
    assert list(bad) == [name]
    r = bad[name]
    assert (r.status, r.n_different, r.max_ulp, r.first_diff) == ("different", 1, 1, [3, 5])
    assert "rounding-level: max 1 ulp in bfloat16" in r.describe()
    assert not report.equivalent
    assert report.verdict == "NOT equivalent"


def test_dropped_tensor(llama, tmp_path):
    _, hf, lit = llama
    b = shutil.copytree(lit, tmp_path / "b")
    _edit_lit(b, lambda sd: sd.pop("transformer.h.1.norm_2.weight"))
    report = verify(hf, b, samples=2)
    bad = _bad(report)
    assert list(bad) == ["model.layers.1.post_attention_layernorm.weight"]
    assert bad["model.layers.1.post_attention_layernorm.weight"].note == (
        "missing in B (its stored tensor transformer.h.1.norm_2.weight is absent)")
    assert report.function is None
    assert report.notes[0].startswith("function level not run: ")


def test_extra_tensor_and_config_change(llama, tmp_path):
    _, hf, _ = llama
    b = shutil.copytree(hf, tmp_path / "b")
    _edit_hf(b, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.scale": torch.ones(4)}))
    cfg = json.loads((b / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 500000.0
    (b / "config.json").write_text(json.dumps(cfg))
    report = verify(hf, b, tensors_only=True)
    assert report.config == [{"key": "rope_theta", "a": 10000.0, "b": 500000.0}]
    assert [(r.name, r.status) for r in report.tensors.results if not r.ok] == [
        ("model.layers.0.self_attn.rotary_emb.scale", "extra")]
    assert not report.equivalent


def test_compare_reports_shape_and_integer_differences():
    assert compare("x", torch.zeros(2, 3), torch.zeros(3, 2)).status == "shape"
    r = compare("ids", torch.tensor([1, 2, 3]), torch.tensor([1, 2, 5]))
    assert (r.status, r.n_different, r.max_abs_diff, r.first_diff) == ("different", 1, 2.0, [2])
    # -0.0 and +0.0 differ in bits: a bit-exactness claim has to see it
    r = compare("z", torch.tensor([0.0]), torch.tensor([-0.0]))
    assert (r.status, r.max_ulp) == ("different", 0)


# --- captions, runtimes, CLI ---------------------------------------------------------------------

def test_captions_drive_the_function_level(llama, tmp_path):
    _, hf, lit = llama
    a = shutil.copytree(hf, tmp_path / "a")
    build_tokenizer(a)
    b = tmp_path / "b"
    weightport.convert(a, b, "litgpt")
    assert (b / "tokenizer.json").is_file()
    report = verify(a, b, samples=5)
    f = report.function
    assert report.equivalent and f.sequences == 5
    assert f.inputs.startswith("5 captions from the built-in caption set")
    assert f.a.tokens > 20 and f.a.loss == f.b.loss


@pytest.mark.skipif(litgpt_python() is None, reason="LitGPT venv not installed")
def test_runtime_litgpt_runs_b_in_litgpt(llama):
    _, hf, lit = llama
    report = verify(hf, lit, samples=3, runtime="litgpt", runtime_python=litgpt_python())
    f = report.function
    assert f.runtime_b == "litgpt"
    assert 0 < f.max_abs_diff < 1e-5, f.max_abs_diff
    assert report.equivalent


def test_runtime_errors_are_clear(llama):
    _, hf, lit = llama
    with pytest.raises(weightport.WeightportError, match=r"^--runtime litgpt runs B in LitGPT, but .* is a hf checkpoint$"):
        verify(lit, hf, runtime="litgpt")
    with pytest.raises(weightport.WeightportError,
                       match="^--runtime mindspore: weightport cannot write the mindspore format yet"):
        verify(hf, lit, runtime="mindspore")


def test_cli_exit_codes_table_and_json(llama, tmp_path):
    _, hf, lit = llama
    ok = run_cli("verify", hf, lit, "--samples", "2", "--report", tmp_path / "ok.json")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.rstrip().endswith("verdict:  equivalent")
    assert "tensors:  21 exact" in ok.stdout
    data = json.loads((tmp_path / "ok.json").read_text())
    assert data["verdict"] == "equivalent" and len(data["tensors"]["items"]) == 21

    b = shutil.copytree(lit, tmp_path / "b")
    _edit_lit(b, lambda sd: sd["transformer.h.0.attn.proj.weight"].mul_(2))
    bad = run_cli("verify", hf, b, "--tensors-only", "--report", tmp_path / "bad.json")
    assert bad.returncode == 1
    assert "different  model.layers.0.self_attn.o_proj.weight  4096 of 4096 values differ" in bad.stdout
    assert "(B: transformer.h.0.attn.proj.weight)" in bad.stdout
    assert bad.stdout.rstrip().endswith("verdict:  NOT equivalent")
    items = json.loads((tmp_path / "bad.json").read_text())["tensors"]["items"]
    assert [i["name"] for i in items if i["status"] != "exact"] == ["model.layers.0.self_attn.o_proj.weight"]


def test_convert_verify_flag(llama, tmp_path):
    _, hf, _ = llama
    proc = run_cli("convert", hf, tmp_path / "out", "--to", "litgpt", "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "tensors:  21 exact" in proc.stdout
    assert proc.stdout.rstrip().endswith("verdict:  equivalent")


def test_eval_captions_matches_a_direct_computation(llama, tmp_path):
    """Loss and top-1 on caption tokens only, recomputed here with transformers and torch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightport.captions import load_captions
    from weightport.verify import eval_captions
    from weightport.verify.inputs import PROMPT

    _, hf, _ = llama
    a = shutil.copytree(hf, tmp_path / "a")
    build_tokenizer(a)
    lit = tmp_path / "lit"
    weightport.convert(a, lit, "litgpt")

    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    losses, correct, total = [], 0, 0
    for sample in load_captions(limit=6):
        prefix = tok(PROMPT)["input_ids"]
        ids = torch.tensor([prefix + tok(sample.caption, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        labels = ids[0, 1:]
        scored = torch.arange(len(labels)) >= len(prefix) - 1
        losses.append(torch.nn.functional.cross_entropy(logits[scored], labels[scored]).item())
        correct += int((logits[scored].argmax(-1) == labels[scored]).sum())
        total += int(scored.sum())

    for path in (a, lit):
        result = eval_captions(path, samples=6)
        assert result.scores.tokens == total
        assert abs(result.scores.loss - sum(losses) / len(losses)) < 1e-6
        assert result.scores.top1 == correct / total

    proc = run_cli("eval-captions", lit, "--samples", "6", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert f"over {total} caption tokens" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["scores"]["tokens"] == total


def test_eval_captions_without_a_tokenizer_says_so(llama):
    _, hf, _ = llama
    proc = run_cli("eval-captions", hf)
    assert proc.returncode == 1
    assert proc.stderr == f"weightport: error: {hf}: has no tokenizer files; pass --tokenizer DIR\n"


def test_verify_and_eval_read_webdataset_shards_and_saved_datasets(llama, tmp_path):
    """The same captions from webdataset's own ShardWriter and from datasets.save_to_disk give the
    same scores as the built-in tar they were copied from."""
    import datasets
    import webdataset as wds

    from weightport.captions import load_captions

    _, hf, _ = llama
    a = shutil.copytree(hf, tmp_path / "a")
    build_tokenizer(a)
    b = tmp_path / "b"
    weightport.convert(a, b, "litgpt", dtype="bfloat16")
    samples = load_captions(limit=7)
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "captions-%06d.tar"), maxcount=3, verbose=0) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "jpg": s.image, "txt": s.caption, "json": s.meta})
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [{"bytes": s.image, "path": None} for s in samples],
                                "caption": [s.caption for s in samples]},
                               features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
                               ).save_to_disk(str(saved))

    results = []
    for data in (None, shards, str(shards / "captions-{000000..000002}.tar"), saved):
        f = verify(a, b, data=data, samples=7).function
        assert f.sequences == 7 and f.dtype == "bfloat16" and f.ok
        assert f.inputs.startswith("7 captions from " + ("the built-in caption set" if data is None else str(data)))
        results.append((f.a, f.b, f.max_abs_diff))
    assert all(r == results[0] for r in results)
    proc = run_cli("eval-captions", b, "--data", shards, "--samples", "7")
    assert proc.returncode == 0, proc.stderr
    assert f"over {results[0][1].tokens} caption tokens" in proc.stdout


def test_large_renamed_tensors_are_compared_piecewise_from_the_files(tmp_path, monkeypatch):
    """Above STREAM_BYTES a plainly renamed tensor is never loaded whole: force that path on a tiny
    model, with pieces that do not align to rows, and check it finds what the whole-tensor path finds."""
    from weightport.verify import tensors

    calls = []
    piecewise = tensors.compare_pieces
    monkeypatch.setattr(tensors, "STREAM_BYTES", 0)
    monkeypatch.setattr(tensors, "CHUNK", 1000)
    monkeypatch.setattr(tensors, "compare_pieces", lambda name, *a: calls.append(name) or piecewise(name, *a))

    a = build_hf("llama3", tmp_path / "a", dtype=torch.bfloat16)
    lit = tmp_path / "lit"
    weightport.convert(a, lit, "litgpt", dtype="float32")
    report = verify(a, lit, tensors_only=True)
    assert report.equivalent, report.render()
    assert {r.status for r in report.tensors.results} == {"cast"}
    assert "model.layers.1.mlp.down_proj.weight" in calls and "model.embed_tokens.weight" in calls
    assert not any("q_proj" in c for c in calls)  # fused in LitGPT: loaded as a group

    b = shutil.copytree(a, tmp_path / "b")
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 96]: element 40*96+7 = 3847 is in the 4th piece

    def nudge(t):
        w = t[name].clone()
        w.view(torch.int16)[40, 7] -= 1
        t[name] = w

    _edit_hf(b, nudge)
    calls.clear()
    bad = _bad(verify(a, b, tensors_only=True))
    assert name in calls
    assert list(bad) == [name]
    assert (bad[name].n_different, bad[name].max_ulp, bad[name].first_diff) == (1, 1, [40, 7])
