"""Bad input: one clear line on stderr, a non-zero exit, no partial output, source untouched."""

from __future__ import annotations

import json
import os
import resource
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf, run_cli, tree_digest
from weightport.archs import ARCHS


@pytest.fixture
def src(tmp_path):
    return build_hf("llama3", tmp_path / "src")


@pytest.fixture
def sharded(tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_hf("llama3", tmp_path / "one")
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    return tmp_path / "sharded"


def fails(source, out, expected: str, *extra, **kw):
    """Run a conversion that must fail with exactly `expected` as its only stderr line."""
    before = tree_digest(source)
    proc = run_cli("convert", source, out, "--to", "litgpt", *extra, **kw)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"weightport: error: {expected}"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_digest(source) == before, "the source was modified"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.weightport-partial")]
    assert not leftovers
    return proc


def test_truncated_safetensors(src, tmp_path):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__")
    held = len(data) - 1000 - 8 - n
    name, end = min(((k, v["data_offsets"][1]) for k, v in header.items() if v["data_offsets"][1] > held),
                    key=lambda kv: kv[1])
    fails(src, tmp_path / "out", f"{f}: truncated: tensor {name} ends at byte {end} of the data but the file holds {held}")
    assert not (tmp_path / "out").exists()


def test_index_names_a_missing_shard(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    first = next(t for t, s in index["weight_map"].items() if s == shard)
    (sharded / shard).unlink()
    fails(sharded, tmp_path / "out",
          f"{sharded / 'model.safetensors.index.json'}: names shard {shard} (for tensor {first}) which does not exist")


def test_index_names_a_tensor_not_in_its_shard(sharded, tmp_path):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = shards[0] if index["weight_map"]["model.norm.weight"] != shards[0] else shards[1]
    wrong = index["weight_map"]["model.norm.weight"]
    path.write_text(json.dumps(index))
    fails(sharded, tmp_path / "out", f"{path}: names tensor model.norm.weight in {wrong}, but {wrong} does not hold it")


def test_config_disagrees_with_tensor_shapes(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (src / "config.json").write_text(json.dumps(cfg))
    fails(src, tmp_path / "out",
          f"{src / 'model.safetensors'}: tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64], but the config "
          "implies [80, 64] (config disagrees with tensor shapes) (and 5 more problems)")


def test_unknown_architecture(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (src / "config.json").write_text(json.dumps(cfg))
    known = ", ".join(sorted(a.model_type for a in ARCHS.values()))
    assert "llama" in known and "chatglm" in known
    fails(src, tmp_path / "out", f"{src / 'config.json'}: unknown architecture model_type='bloom' (supported: {known})")


def test_unmapped_extra_tensor(src, tmp_path):
    f = src / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.extra_gate.weight"] = torch.zeros(2, 2)
    save_file(sd, f, metadata={"format": "pt"})
    fails(src, tmp_path / "out", f"{f}: tensor model.layers.0.self_attn.extra_gate.weight is not part of a llama "
                                 "model with this config (unmapped extra tensor)")


def test_missing_tensor(src, tmp_path):
    f = src / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    fails(src, tmp_path / "out", f"{src}: tensor model.layers.1.mlp.up_proj.weight is missing "
                                 "(the llama config needs it)")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_not_run(src, tmp_path):
    marker = tmp_path / "pwned"
    sd = load_file(src / "model.safetensors")
    sd["model.norm.weight"] = _Exploit(marker)
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    proc = run_cli("convert", src, tmp_path / "out", "--to", "litgpt")
    assert proc.returncode != 0 and not marker.exists()
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"weightport: error: {src / 'pytorch_model.bin'}: refused, the pickle is not weights-only "
                           "and would run code (")
    assert "posix.system" in line or "os.system" in line
    assert not (tmp_path / "out").exists()


def test_output_exists_needs_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(src, out, f"{out}: already exists; pass --force to replace it")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what weightport wrote: keep.txt is the user's
    fails(src, out, f"{out}: holds 1 file(s) that no weightport manifest in it lists (keep.txt); not replaced "
                    "(pass --delete-existing to delete it anyway)", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_cli("convert", src, out, "--to", "litgpt", "--delete-existing", "-q")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "lit_model.pth").exists()


def test_output_inside_source_is_refused(src):
    fails(src, src / "lit", f"{src / 'lit'}: is, contains or lies inside the input {src} (SRC); "
                            "choose another output")


def _limit_file_size():
    # a write past 100 KB fails with EFBIG, as a full disk fails with ENOSPC (Python ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_write_error_midway_leaves_nothing(tmp_path):
    src = build_hf("llama3", tmp_path / "src", hidden_size=128, intermediate_size=256)  # ~0.9 MB
    out = tmp_path / "out"
    before = tree_digest(src)
    proc = run_cli("convert", src, out, "--to", "hf", "--max-shard-size", "1GB", preexec_fn=_limit_file_size)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("weightport: error: ") and "write failed (File too large); no output was left" in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "weightport-partial" in p.name]
    assert tree_digest(src) == before


def test_unknown_format_and_missing_source(tmp_path):
    proc = run_cli("convert", tmp_path / "nope", tmp_path / "out", "--to", "litgpt")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"weightport: error: {tmp_path / 'nope'}: no such file or directory"
    (tmp_path / "empty").mkdir()
    proc = run_cli("convert", tmp_path / "empty", tmp_path / "out", "--to", "litgpt")
    assert proc.stderr.strip() == (f"weightport: error: {tmp_path / 'empty'}: not a checkpoint in any known format "
                                   "(hf, litgpt, mindspore, nanotron, xtuner-llava, llava, llava-hf, xtuner, onnx); pass --from to say which it is")
