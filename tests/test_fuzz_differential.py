"""Differential fuzzing (fuzz/differential.py): mutated small files go to the library that defines
each format and to our reader. The reference refuses => we refuse; the reference reads => we read
the same names, shapes, dtypes and bytes. The only exceptions are the ones listed here (and in
STRICTER / TORCH_LENIENT, which this pins). FUZZ_EXAMPLES (env) sets the examples per target
(default 150); `python fuzz/differential.py` runs many more (docs/reliability.md has a run)."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import mindspore_python

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)


def _load():
    spec = importlib.util.spec_from_file_location("differential", ROOT / "fuzz" / "differential.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["differential"] = module
    spec.loader.exec_module(module)
    return module


D = _load()

# Every file we refuse although the reference reads it, by the label of the check that refuses it.
EXPECTED_STRICTER = {
    "safetensors": ["duplicate tensor name or metadata key", "entry written as an array", "dtype written as an object",
                    "dtype weightport does not convert", "empty tensor with dims past 2^63"],
    "torch": ["not a state dict of tensors", "legacy (non-zip) torch file", "a tensor under a key that is not a string",
              "a name twice once _orig_mod. is dropped", "zip member twice", "compressed zip member",
              "zip local header disagrees with the directory", "zip member marked as a directory",
              "zip directory Python's zipfile finds corrupt"],
    "ckpt": ["field with an unexpected wire type", "top-level field other than Checkpoint.value", "record without tag",
             "record without tensor or maptensor", "tensor without tensor_content", "a tensor's records not adjacent",
             "a tensor's records disagree", "tensor and maptensor records under one tag", "Int4 (no torch dtype)",
             "tag or tensor_type over 1 MiB", "packed dims over 4 KiB"],
}
# The only files we read although torch.load(weights_only=True) refuses them: pickles whose refused
# globals all belong to these packages (or are these globals), bound to inert stand-ins.
EXPECTED_LENIENT = (("numpy", "mmengine", "deepspeed", "xtuner", "transformers", "peft", "accelerate", "argparse",
                     "torch", "collections", "enum", "datetime", "pathlib"), ("builtins.getattr",))


def test_the_exceptions_are_exactly_the_documented_ones():
    assert {t: [label for label, _ in checks] for t, checks in D.STRICTER.items()} == EXPECTED_STRICTER
    assert D.TORCH_LENIENT == EXPECTED_LENIENT


def test_the_judge_catches_each_kind_of_disagreement(tmp_path):
    """So that a disagreement cannot pass unnoticed: each direction is reported."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"")
    a = D.Outcome({"w": ((2,), "float32", "aa")})
    b = D.Outcome({"w": ((2,), "float32", "bb")})
    refused = D.Outcome(refused=f"{path}: tensor w: data_offsets [0, 8] overlap tensor v (which ends at byte 8)")
    assert D.judge("safetensors", path, a, a)[0] == "read equal by both"
    assert D.judge("safetensors", path, a, b)[0] == "disagreement"
    assert D.judge("safetensors", path, D.Outcome(refused="SafetensorError: x"), a)[0] == "disagreement"
    assert D.judge("safetensors", path, a, refused)[0] == "disagreement"
    assert D.judge("safetensors", path, D.Outcome(refused="SafetensorError: x"), refused)[0] == "refused by both"
    dup = D.Outcome(refused=f"{path}: tensor w: appears twice in the header")
    assert D.judge("safetensors", path, a, dup)[0] == "stricter: duplicate tensor name or metadata key"
    crashed = D.Outcome(refused="KeyError: w", crashed="our reader raised KeyError: w")
    assert D.judge("safetensors", path, D.Outcome(refused="SafetensorError: x"), crashed)[0] == "disagreement"


def _check(target: str, tally, counts: Counter) -> None:
    counts.update(tally.counts)
    assert not tally.failures, "\n\n".join(tally.failures[:5])


@pytest.fixture(scope="module")
def counts():
    c: Counter = Counter()
    yield c
    print("\ndifferential fuzz outcomes:", dict(sorted(c.items())))


@pytest.fixture(scope="module")
def st_seeds():
    return D.seeds_safetensors()


@pytest.fixture(scope="module")
def torch_seeds():
    return D.seeds_torch()


def test_safetensors_against_safe_open(tmp_path, st_seeds, counts):
    tally = D.Tally()
    path = tmp_path / "f.safetensors"

    @FUZZ
    @given(seed=SEEDS, which=st.integers(0, len(st_seeds) - 1))
    def run(seed, which):
        data, desc = D.mutate_safetensors(random.Random(seed), st_seeds[which])
        path.write_bytes(data)
        tally.add("safetensors", path, desc, D.ref_safetensors(path), D.ours_safetensors(path), None)
        assert not tally.failures, tally.failures[-1]

    run()
    _check("safetensors", tally, counts)
    # the mutations must reach both outcomes, or the test proves nothing
    assert tally.counts["read equal by both"] and tally.counts["refused by both"], tally.counts


def test_torch_zip_against_torch_load(tmp_path, torch_seeds, counts):
    tally = D.Tally()
    path = tmp_path / "f.bin"

    @FUZZ
    @given(seed=SEEDS, which=st.integers(0, len(torch_seeds) - 1))
    def run(seed, which):
        data, desc = D.mutate_torch(random.Random(seed), torch_seeds[which])
        path.write_bytes(data)
        tally.add("torch", path, desc, D.ref_torch(path), D.ours_torch(path), None)
        assert not tally.failures, tally.failures[-1]

    run()
    _check("torch", tally, counts)
    assert tally.counts["read equal by both"] and tally.counts["refused by both"], tally.counts


@pytest.fixture(scope="module")
def mindspore_exe():
    exe = mindspore_python()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("mindspore missing in CI (`make test` must install it into the test venv)")
        pytest.skip("mindspore not installed; run `make test` to install it")
    return exe


def test_ckpt_against_mindspore_load_checkpoint(tmp_path, mindspore_exe, counts):
    """Hypothesis draws the mutations; MindSpore then loads them all in one subprocess (importing it
    changes the process, and starting it per file would take seconds each)."""
    items = []

    @FUZZ
    @given(seed=SEEDS, which=st.integers(0, 2))
    def draw(seed, which):
        data, desc = D.mutate_ckpt(random.Random(seed), which)
        path = tmp_path / f"in-{len(items)}.ckpt"
        path.write_bytes(data)
        items.append((path, desc))

    draw()
    refs = D.ref_ckpt_batch([p for p, _ in items], mindspore_exe, tmp_path)
    assert len(refs) == len(items)
    tally = D.Tally()
    for (path, desc), ref in zip(items, refs):
        tally.add("ckpt", path, desc, ref, D.ours_ckpt(path), None)
    _check("ckpt", tally, counts)
    assert tally.counts["read equal by both"] and tally.counts["refused by both"], tally.counts
