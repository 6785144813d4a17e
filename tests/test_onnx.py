"""ONNX export: ONNX Runtime computes what transformers computes, with and without a KV cache,
past 2 GB, and `weightport run` predicts what transformers predicts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from weightport import api
from weightport.cli import main
from weightport.errors import WeightportError

from conftest import TOKENS, build_hf, hf_logits, word_tokenizer

# the Llama-family decoders of the core issue, and what their configs can add
DECODERS = ["llama2", "llama3", "llama3.1", "llama3.2", "mistral", "qwen2", "qwen2-sliding", "phi3", "llama-bias"]


def session(directory):
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def feed(tokens, past_len=0, cache=None):
    ids = np.array(tokens, np.int64)
    batch, n = ids.shape
    out = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + n), np.int64),
           "position_ids": np.tile(np.arange(past_len, past_len + n), (batch, 1))}
    return {**out, **(cache or {})}


def empty_cache(sess, batch, dtype=np.float32):
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}


@pytest.mark.parametrize("key", DECODERS)
def test_onnx_runtime_logits_equal_transformers(key, tmp_path):
    src = build_hf(key, tmp_path / "hf")
    out = tmp_path / "onnx"
    api.convert(src, out, "onnx")
    onnx.checker.check_model(str(out / "model.onnx"))
    got = session(out).run(["logits"], feed(TOKENS))[0]
    diff = np.abs(got - hf_logits(src).numpy()).max()
    assert diff < 1e-5, f"{key}: max abs diff {diff}"
    assert (out / "model.onnx").stat().st_size < 200_000  # the graph only; the weights are external data


def test_from_another_format_in_one_command(tmp_path):
    """Any source format: a LitGPT checkpoint (fused qkv, its own names) to ONNX."""
    src = build_hf("qwen2", tmp_path / "hf")
    api.convert(src, tmp_path / "lit", "litgpt")
    plan = api.convert(tmp_path / "lit", tmp_path / "onnx", "onnx")
    assert plan.source.format.name == "litgpt"
    got = session(tmp_path / "onnx").run(["logits"], feed(TOKENS))[0]
    assert np.abs(got - hf_logits(src).numpy()).max() < 1e-5


def test_the_sliding_window_is_in_the_graph(tmp_path):
    """Mistral's window of 8 over 20 tokens: exporting the same weights without it gives other logits."""
    src = build_hf("mistral", tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["sliding_window"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    api.convert(src, tmp_path / "onnx", "onnx")
    got = session(tmp_path / "onnx").run(["logits"], feed(TOKENS))[0]
    windowed = build_hf("mistral", tmp_path / "hf-windowed")
    assert np.abs(got - hf_logits(windowed).numpy()).max() > 1e-2


@pytest.mark.parametrize("key", ["llama3", "phi3", "qwen2-sliding"])
def test_prefill_then_cached_steps_equal_one_longer_prefill(key, tmp_path):
    src = build_hf(key, tmp_path / "hf")
    out = tmp_path / "onnx"
    api.convert(src, out, "onnx", with_past=True)
    onnx.checker.check_model(str(out / "model.onnx"))
    sess = session(out)
    names = [o.name for o in sess.get_outputs()]
    whole = sess.run(["logits"], feed(TOKENS, cache=empty_cache(sess, 2)))[0]
    assert np.abs(whole - hf_logits(src).numpy()).max() < 1e-5

    first = 12
    outputs = dict(zip(names, sess.run(None, feed([t[:first] for t in TOKENS], cache=empty_cache(sess, 2)))))
    steps = [outputs["logits"][:, -1]]
    for pos in range(first, len(TOKENS[0])):
        cache = {n.replace("present.", "past_key_values."): v for n, v in outputs.items() if n.startswith("present.")}
        assert cache["past_key_values.0.key"].shape == (2, 2, pos, 16)
        outputs = dict(zip(names, sess.run(None, feed([t[pos:pos + 1] for t in TOKENS], pos, cache))))
        steps.append(outputs["logits"][:, -1])
    stepped = np.stack(steps[:-1], axis=1)
    assert np.abs(stepped - whole[:, first - 1:-1]).max() < 1e-5


def test_back_from_onnx_every_tensor_is_bit_identical(tmp_path):
    src = build_hf("llama3.1", tmp_path / "hf", dtype=torch.bfloat16)
    api.convert(src, tmp_path / "onnx", "onnx")
    api.convert(tmp_path / "onnx", tmp_path / "back", "hf")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_float16_runs_and_bfloat16_is_a_valid_graph(tmp_path):
    src = build_hf("llama3", tmp_path / "hf")
    api.convert(src, tmp_path / "fp16", "onnx", dtype="float16", with_past=True)
    sess = session(tmp_path / "fp16")
    got = sess.run(["logits"], feed(TOKENS, cache=empty_cache(sess, 2, np.float16)))[0]
    from transformers import AutoModelForCausalLM

    half = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16, attn_implementation="eager")
    with torch.no_grad():
        ref = half(torch.tensor(TOKENS)).logits.float().numpy()
    # logits are about ±3, where one float16 step is 2e-3
    assert np.abs(got - ref).max() < 1e-2
    assert sess.get_inputs()[3].type == "tensor(float16)"

    # ONNX Runtime's CPU provider has no bfloat16 kernels (GPU providers do): checked, not run
    api.convert(src, tmp_path / "bf16", "onnx", dtype="bfloat16")
    onnx.checker.check_model(str(tmp_path / "bf16" / "model.onnx"))
    graph = onnx.load(str(tmp_path / "bf16" / "model.onnx"), load_external_data=False).graph
    assert {t.data_type for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == {
        onnx.TensorProto.BFLOAT16}


@pytest.mark.slow
def test_weights_beyond_two_gigabytes_export_and_run(tmp_path):
    """A vocabulary of 4.3 M rows makes the tied embedding 2.2 GB: beyond protobuf's 2 GiB, so
    only external data can hold it; ONNX Runtime loads it and agrees with transformers."""
    src = build_hf("llama3.2", tmp_path / "hf", hidden_size=128, intermediate_size=192, num_hidden_layers=1,
                   vocab_size=4_300_000)
    out = tmp_path / "onnx"
    api.convert(src, out, "onnx")
    assert (out / "model.onnx.data").stat().st_size > 2**31
    assert (out / "model.onnx").stat().st_size < 200_000
    onnx.checker.check_model(str(out / "model.onnx"))
    tokens = [[5, 4_299_999, 17, 2_000_000, 3]]
    got = session(out).run(["logits"], feed(tokens))[0]
    ref = hf_logits(src, tokens).numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_run_prints_transformers_top_k_and_greedy_generation(tmp_path, capsys):
    src = build_hf("llama3", tmp_path / "hf")
    word_tokenizer(src, 128)
    prompt = "w5 w9 w40 w7"
    ids = [int(w[1:]) + 3 for w in prompt.split()]  # the word tokenizer's ids: <unk> <s> </s> w0 w1 ...
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    top = probs.topk(5)

    for with_past in (False, True):
        out = tmp_path / f"onnx-{with_past}"
        assert main(["convert", str(src), str(out), "--to", "onnx", "-q"] + (["--with-past"] if with_past else [])) == 0
        capsys.readouterr()
        assert main(["run", str(out), "--prompt", prompt, "--top-k", "5", "--generate", "6"]) == 0
        lines = capsys.readouterr().out.splitlines()
        for line, p, i in zip(lines, top.values.tolist(), top.indices.tolist()):
            rank, prob, token_id, token = line.split()
            assert int(token_id) == i and token == repr(f"w{i - 3}") and abs(float(prob) - p) < 5e-5
        assert lines[5].endswith(f"(ids {greedy})")


@pytest.mark.parametrize("key, message", [
    ("mixtral", "format onnx does not support mixtral (formats that do: hf, litgpt, mindspore)"),
    ("gemma", "format onnx does not support gemma (formats that do: hf, litgpt)"),
])
def test_what_is_not_exported_is_refused_before_writing(key, message, tmp_path):
    src = build_hf(key, tmp_path / "hf")
    with pytest.raises(WeightportError) as e:
        api.convert(src, tmp_path / "onnx", "onnx")
    assert str(e.value) == message
    assert not (tmp_path / "onnx").exists()


def test_unimplemented_rope_and_misplaced_options_are_one_line_errors(tmp_path, capsys):
    src = build_hf("llama3", tmp_path / "hf", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                               "factor": 2.0})
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "onnx"), "--to", "onnx"]) == 1
    assert capsys.readouterr().err == ("weightport: error: ONNX export: rope_type 'dynamic' is not implemented "
                                       "(default, linear, llama3 are); its frequencies depend on the sequence length\n")
    assert main(["convert", str(src), str(tmp_path / "lit"), "--to", "litgpt", "--with-past"]) == 1
    assert capsys.readouterr().err == "weightport: error: --with-past applies to onnx, not litgpt\n"
    assert main(["run", str(src), "--prompt", "w1"]) == 1
    assert capsys.readouterr().err == f"weightport: error: {src}: no weightport_onnx.json; not a weightport ONNX export\n"
    assert not (tmp_path / "onnx").exists()


def test_dry_run_prints_the_plan(tmp_path, capsys):
    src = build_hf("llama3", tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "onnx"), "--to", "onnx", "--with-past", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx.data  21 tensors" in out
    assert "transpose" in out and "dry run: nothing written" in out
    assert not (tmp_path / "onnx").exists()
