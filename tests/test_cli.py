"""The command line: help, dry-run plans, inspect and the support matrix."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from conftest import build_hf, run_cli


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_hf("mixtral", tmp_path_factory.mktemp("cli") / "hf")


def test_help_explains_every_option():
    out = run_cli("convert", "--help").stdout
    for opt in ("--to", "--from", "--dtype", "--max-shard-size", "--dry-run", "--force", "--allow-overflow", "--quiet"):
        assert opt in out
    assert "auto" in out and "bfloat16" in out and "hf, litgpt" in out
    assert "--tensors" in run_cli("inspect", "--help").stdout
    top = run_cli("--help").stdout
    assert all(c in top for c in ("convert", "inspect", "formats"))


def test_dry_run_prints_the_plan_and_writes_nothing(src, tmp_path):
    out = tmp_path / "lit"
    proc = run_cli("convert", src, out, "--to", "litgpt", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "model:   mixtral (MixtralForCausalLM), 2 layers, hidden 64, 4 heads / 2 kv, vocab 128, 4 experts" in text
    assert "coverage: every source tensor used, every target tensor produced" in text
    assert "lit_model.pth  37 tensors" in text
    assert ("model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.k_proj.weight, "
            "model.layers.1.self_attn.v_proj.weight -> transformer.h.1.attn.qkv.weight  "
            "[concat(dim=0, sizes=[64, 32, 32])]") in text
    assert "transformer.h.1.mlp.experts.3.fc_2.weight  [96, 64]  float32" in text
    assert text.rstrip().endswith("dry run: nothing written")


def test_inspect_reads_headers_only(src):
    proc = run_cli("inspect", src, "--tensors")
    assert proc.returncode == 0, proc.stderr
    with safe_open(src / "model.safetensors", "pt") as f:
        names = list(f.keys())
        n_params = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in names)
    assert "format:      hf (safetensors, 1 file(s))" in proc.stdout
    assert "arch:        mixtral (MixtralForCausalLM)" in proc.stdout
    assert f"parameters:  {n_params:,}" in proc.stdout
    assert f"dtypes:      float32 ({len(names)} tensors)" in proc.stdout
    assert "num_local_experts=4" in proc.stdout
    for n in names:
        assert f"  {n}  [" in proc.stdout


def test_from_overrides_detection(src, tmp_path):
    proc = run_cli("inspect", src, "--from", "litgpt")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"weightport: error: {src}: no model_config.yaml (or legacy lit_config.json) next to the weights"


def test_formats_matrix():
    out = run_cli("formats").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["format", "architecture", "read", "write"]
    for fmt in ("hf", "litgpt"):
        for arch in ("llama", "mistral", "mixtral", "qwen2", "phi3", "gemma"):
            assert any(l.startswith(f"{fmt} ") and f" {arch} —" in l and l.rstrip().endswith("yes   yes") for l in lines), (fmt, arch)
    for arch, ok in (("llama", True), ("mixtral", True), ("qwen2", True), ("mistral", False), ("gemma", False)):
        row = next(l for l in lines if l.startswith("mindspore ") and f" {arch} —" in l)
        assert row.rstrip().endswith("yes   yes" if ok else "no    no"), row


def test_closed_stdout_is_not_an_error(tmp_path):
    """`weightport inspect --tensors | head -1`: the reader going away ends the output quietly."""
    import subprocess
    import sys

    hf_dir = build_hf("llama3", tmp_path / "hf", num_hidden_layers=300)  # far more than a pipe buffer
    proc = subprocess.run(f"{sys.executable} -m weightport inspect {hf_dir} --tensors | head -1",
                          shell=True, capture_output=True, text=True)
    assert proc.stdout.count("\n") == 1 and proc.stderr == ""
