#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris / libFuzzer) of weightport's readers, one target per reader.

    python fuzz/fuzz_readers.py TARGET [libFuzzer options] [CORPUS_DIR ...]
    make fuzz                       # every target for FUZZ_SECONDS (default 60) each

TARGET is one of safetensors, torch, ckpt, config-json, litgpt-yaml. An input passes when the
reader reads it or refuses it with WeightportError; anything else (another exception, a crash)
is a finding, which libFuzzer saves as crash-*. The corpus each run grows is kept in
fuzz/corpus/TARGET/, and tests/test_fuzz_corpus.py replays it in every test run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["weightport"]):
    from weightport.errors import WeightportError
    from weightport.hf_config import load_json, load_yaml
    from weightport.formats.mindspore import open_weights
    from weightport.io import open_files

HERE = Path(__file__).resolve().parent
SUFFIX = {"safetensors": ".safetensors", "torch": ".bin", "ckpt": ".ckpt", "config-json": ".json",
          "litgpt-yaml": ".yaml"}
_SCRATCH = Path(tempfile.mkdtemp(prefix="weightport-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def read(target: str, path: Path) -> None:
    """What weightport does with such a file: parse it, then load every tensor it lists."""
    if target == "config-json":
        load_json(path)
    elif target == "litgpt-yaml":
        load_yaml(path)
    else:
        with (open_weights(path) if target == "ckpt" else open_files([path])) as source:  # MindSpore's codec
            for name in source.tensors:
                source.load(name)


def check(target: str, data: bytes) -> str:
    """'read' or 'refused'; raises on anything else."""
    path = _SCRATCH / f"input{SUFFIX[target]}"
    path.write_bytes(data)
    try:
        read(target, path)
        return "read"
    except WeightportError:
        return "refused"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SUFFIX:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(SUFFIX)}}} [libFuzzer options] [corpus dirs]")
    target = sys.argv.pop(1)
    atheris.Setup(sys.argv, lambda data: check(target, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
