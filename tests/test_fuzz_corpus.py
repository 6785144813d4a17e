"""Replays the corpus coverage-guided fuzzing (fuzz/fuzz_readers.py, atheris) found: every input
must still read or be refused with WeightportError, as it was when the fuzzer kept it."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus"
INPUTS = sorted((d.name, f) for d in CORPUS.iterdir() if d.is_dir() for f in sorted(d.iterdir()) if f.is_file())


@pytest.fixture(scope="module")
def fuzz_module():
    """fuzz_readers.py without atheris (its checks only, no instrumentation)."""
    sys.modules.setdefault("atheris", types.SimpleNamespace(instrument_imports=lambda **_: _Null()))
    spec = importlib.util.spec_from_file_location("fuzz_readers", CORPUS.parent / "fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_corpus_is_there():
    counts = {t: sum(1 for name, _ in INPUTS if name == t) for t in ("safetensors", "torch", "ckpt", "config-json",
                                                                      "litgpt-yaml")}
    assert all(n >= 1 for n in counts.values()), counts


@pytest.mark.parametrize("target, path", INPUTS, ids=[f"{t}/{p.name[:12]}" for t, p in INPUTS])
def test_every_kept_input_reads_or_is_refused(fuzz_module, target, path):
    assert fuzz_module.check(target, path.read_bytes()) in ("read", "refused")
