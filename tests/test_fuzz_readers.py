"""Property-based fuzzing of every reader: valid small files, mutated (truncated, bits flipped, bytes
overwritten, header fields set to huge, negative, overlapping or non-UTF-8 values, JSON nested
deep), must either read correctly or fail with WeightportError; never another exception, never a
crash. FUZZ_EXAMPLES (env) sets the examples per reader (default 150; docs/reliability.md has a
longer run's numbers)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from weightport import api
from weightport.errors import WeightportError
from weightport.formats.mindspore import open_weights
from weightport.io import open_files

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OUTCOMES: Counter = Counter()


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.arange(5, dtype=torch.float16),
            "c": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16)}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, bytes]:
    """One small valid file per reader, as bytes."""
    root = tmp_path_factory.mktemp("fuzz-valid")
    save_file(_tensors(), root / "x.safetensors", metadata={"format": "pt"})
    torch.save(_tensors(), root / "x.bin")
    from weightport.formats.mindspore.ckpt import MsCkptWriter

    w = MsCkptWriter(root / "x.ckpt", crc=True)
    for n, t in _tensors().items():
        w.write(n, t)
    w.close()
    return {ext: (root / f"x.{ext}").read_bytes() for ext in ("safetensors", "bin", "ckpt")}


def read_everything(path: Path) -> None:
    """What a conversion does with a file: open it, then load every tensor it lists."""
    with (open_weights(path) if path.suffix == ".ckpt" else open_files([path])) as source:  # MindSpore's codec
        for name in source.tensors:
            source.load(name)


def outcome(kind: str, fn) -> None:
    try:
        fn()
        OUTCOMES[f"{kind}: read"] += 1
    except WeightportError as e:
        assert str(e) and "\n" not in str(e).strip(), f"{kind}: a multi-line or empty error: {e!r}"
        OUTCOMES[f"{kind}: refused"] += 1


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def mutate(data: bytes, m) -> bytes:
    b = bytearray(data)
    kind = m[0]
    if kind == "truncate":
        return bytes(b[:int(m[1] * len(b))])
    if kind == "flip":
        for where, bit in m[1]:
            b[min(int(where * len(b)), len(b) - 1)] ^= 1 << bit
        return bytes(b)
    if kind == "overwrite":
        at = min(int(m[1] * len(b)), len(b) - 1)
        b[at:at + len(m[2])] = m[2]
        return bytes(b)
    return bytes(b) + m[1]


@pytest.mark.parametrize("ext", ["safetensors", "bin", "ckpt"])
def test_mutated_files_read_or_are_refused(valid, tmp_path, ext):
    path = tmp_path / f"f.{ext}"

    @FUZZ
    @given(mutation)
    def run(m):
        path.write_bytes(mutate(valid[ext], m))
        outcome(ext, lambda: read_everything(path))

    run()


header_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
              st.text(max_size=8), st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "F8_E4M3", "XX"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@given(entry=st.fixed_dictionaries({}, optional={"dtype": header_value, "shape": header_value,
                                                 "data_offsets": header_value}),
       name=st.one_of(st.text(max_size=10), st.just("a.weight")),
       depth=st.integers(0, 3000))
@FUZZ
def test_safetensors_headers_with_hostile_fields(tmp_path_factory, entry, name, depth):
    """Offsets past the end, negative or huge sizes, overlapping tensors, unknown dtypes, names that
    are not strings, JSON nested thousands deep."""
    path = tmp_path_factory.mktemp("st") / "f.safetensors"
    header = {name: entry, "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if depth > 2000:  # a header of nothing but nesting
        raw = b"[" * depth + b"]" * depth
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        path.write_bytes(_safetensors(header, bytes(64)))
    outcome("safetensors header", lambda: read_everything(path))


def test_non_utf8_and_oversized_headers(tmp_path):
    cases = {
        "non-utf8 name": struct.pack("<Q", 4) + b'{"\xff' + bytes(8),
        "header longer than the file": struct.pack("<Q", 2**40) + b"{}",
        "header length negative as signed": struct.pack("<Q", 2**64 - 1) + b"{}",
        "zero length": struct.pack("<Q", 0),
        "empty file": b"",
    }
    for why, data in cases.items():
        path = tmp_path / "f.safetensors"
        path.write_bytes(data)
        with pytest.raises(WeightportError) as e:
            read_everything(path)
        assert str(path) in str(e.value), why


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from conftest import build_hf

    return build_hf("llama3", tmp_path_factory.mktemp("fuzz-hf") / "hf")


json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(),
                                    st.text(max_size=6)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=8)


@given(key=st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                            "vocab_size", "intermediate_size", "head_dim", "tie_word_embeddings", "model_type",
                            "rope_parameters", "architectures", "torch_dtype"]),
       value=json_value)
@FUZZ
def test_config_json_with_any_value_for_a_key(hf_dir, tmp_path_factory, key, value):
    d = tmp_path_factory.mktemp("cfg") / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    outcome("config.json", lambda: api.plan_conversion(d, d.parent / "out", "litgpt").source.close())


@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.integers(1, 5000).map(lambda n: "[" * n + "]" * n), st.integers(1, 5000).map(lambda n: "{" * n)))
@FUZZ
def test_any_text_as_config_json_or_index(hf_dir, tmp_path_factory, text):
    d = tmp_path_factory.mktemp("cfg") / "hf"
    shutil.copytree(hf_dir, d)
    (d / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    outcome("config.json text", lambda: api.plan_conversion(d, d.parent / "out", "litgpt").source.close())
    (d / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    (d / "model.safetensors.index.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    outcome("safetensors index", lambda: api.plan_conversion(d, d.parent / "out", "litgpt").source.close())


@pytest.fixture(scope="module")
def lit_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-lit") / "lit"
    api.convert(hf_dir, out, "litgpt")
    return out


@given(text=st.one_of(st.text(max_size=300), st.integers(1, 3000).map(lambda n: "- " * n + "x"),
                      st.integers(1, 200).map(lambda n: "a: &a [*a]\n" if n % 2 else "n_layer: " + "9" * n)))
@FUZZ
def test_any_text_as_litgpt_yaml(lit_dir, tmp_path_factory, text):
    d = tmp_path_factory.mktemp("yaml") / "lit"
    shutil.copytree(lit_dir, d)
    (d / "model_config.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    (d / "config.json").unlink()
    outcome("model_config.yaml", lambda: api.plan_conversion(d, d.parent / "out", "hf").source.close())


@pytest.fixture(scope="module")
def nanotron_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-nt") / "nt"
    api.convert(hf_dir, out, "nanotron", tp=2)
    return out


@given(field=st.sampled_from(["unsharded_shape", "tp_rank", "local_global_slices_pairs"]), value=header_value,
       which=st.integers(0, 1000))
@FUZZ
def test_nanotron_shard_metadata_with_hostile_values(nanotron_dir, tmp_path_factory, field, value, which):
    from safetensors import safe_open

    d = tmp_path_factory.mktemp("nt") / "nt"
    shutil.copytree(nanotron_dir, d)
    shards = sorted(d.rglob("*.safetensors"))
    shard = shards[which % len(shards)]
    with safe_open(shard, "pt") as f:
        meta, tensor = dict(f.metadata()), f.get_tensor("data")
    meta[field] = json.dumps(value) if not isinstance(value, str) else value
    save_file({"data": tensor}, shard, metadata=meta)
    outcome("nanotron metadata", lambda: api.plan_conversion(d, d.parent / "out", "hf").source.close())


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    """How many examples each reader read or refused (shown with -s; docs/reliability.md records a run)."""
    yield
    print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))
