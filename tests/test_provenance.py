"""weightport-manifest.json: written with every output, deterministic, and `verify --manifest` finds
exactly the file and the tensor whose bytes changed since."""

from __future__ import annotations

import json
import struct

import pytest

from conftest import build_hf, run_cli
from weightport import api
from weightport.provenance import MANIFEST
from weightport.verify.manifest import check_manifest


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_hf("llama3", tmp_path_factory.mktemp("prov") / "hf")


@pytest.mark.parametrize("to, extra", [("hf", {}), ("litgpt", {}), ("mindspore", {}), ("onnx", {"with_past": True}),
                                       ("nanotron", {"tp": 2})])
def test_every_output_has_a_manifest_that_checks_intact(src, tmp_path, to, extra):
    out = tmp_path / "out"
    plan = api.convert(src, out, to, **extra)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["format"] == "hf" and manifest["target"]["format"] == to
    assert set(manifest["tensors"]) == {t.name for t in plan.outputs}
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == written
    result = check_manifest(out)
    assert result.intact and result.files_checked == len(written)
    assert result.tensors_checked == len(manifest["tensors"])  # each re-read through the format's reader


def test_the_same_conversion_writes_the_same_manifest(src, tmp_path):
    api.convert(src, tmp_path / "a", "litgpt")
    api.convert(src, tmp_path / "b", "litgpt")
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()


def test_a_changed_byte_is_found_by_file_and_by_tensor(src, tmp_path):
    out = tmp_path / "out"
    api.convert(src, out, "hf")
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    begin, end = header["model.layers.1.mlp.up_proj.weight"]["data_offsets"]
    data[8 + n + (begin + end) // 2] ^= 0x01  # one bit, in the middle of one tensor
    f.write_bytes(bytes(data))

    proc = run_cli("verify", "--manifest", out)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert "changed file:   model.safetensors" in lines
    assert "changed tensor: model.layers.1.mlp.up_proj.weight" in lines
    assert sum(ln.startswith("changed tensor:") for ln in lines) == 1
    assert lines[-1] == "verdict:  CHANGED since it was written"

    (out / "config.json").unlink()
    proc = run_cli("verify", "--manifest", out)
    assert proc.returncode == 1 and "missing file:   config.json" in proc.stdout


def test_no_manifest_is_a_one_line_error(src, tmp_path):
    proc = run_cli("verify", "--manifest", src)
    assert proc.returncode == 1
    assert proc.stderr == f"weightport: error: {src}: no {MANIFEST} to check against\n"


@pytest.mark.parametrize("to, extra", [("hf", {}), ("litgpt", {}), ("mindspore", {}), ("onnx", {}),
                                       ("nanotron", {"tp": 2})])
def test_data_files_are_hashed_as_written_not_read_back(src, tmp_path, monkeypatch, to, extra):
    import weightport.provenance as provenance

    read_back = []
    real = provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda p: read_back.append(p.name) or real(p))
    out = tmp_path / "out"
    api.convert(src, out, to, **extra)
    data = {f: e["sha256"] for f, e in json.loads((out / MANIFEST).read_text())["files"].items()
            if f.endswith((".safetensors", ".pth", ".ckpt", ".onnx.data"))}
    assert data and not {f.rsplit("/", 1)[-1] for f in data} & set(read_back)
    monkeypatch.undo()
    assert all(real(out / f) == digest for f, digest in data.items())  # and the digests are the files'


@pytest.mark.parametrize("to, extra", [("hf", {}), ("litgpt", {}), ("mindspore", {}), ("nanotron", {"tp": 2})])
def test_no_manifest_writes_the_same_files_and_hashes_nothing(src, tmp_path, monkeypatch, to, extra):
    import hashlib
    import shutil

    out = tmp_path / "out"  # one path for every run: Nanotron's config.yaml records it

    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    api.convert(src, out, to, **extra)
    with_manifest = files()
    assert MANIFEST in with_manifest
    del with_manifest[MANIFEST]
    shutil.rmtree(out)
    proc = run_cli("convert", src, out, "--to", to, "--no-manifest", "-q", *(["--tp", str(extra["tp"])] if extra else []))
    assert proc.returncode == 0, proc.stderr
    assert files() == with_manifest
    proc = run_cli("verify", "--manifest", out)
    assert proc.stderr == f"weightport: error: {out}: no {MANIFEST} to check against\n"
    shutil.rmtree(out)
    monkeypatch.setattr(hashlib, "sha256", lambda *a: pytest.fail("hashed although no manifest is written"))
    api.convert(src, out, to, manifest=False, **extra)
    monkeypatch.undo()
    assert files() == with_manifest
