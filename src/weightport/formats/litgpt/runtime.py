"""LitGPT as a `verify --runtime`: B runs in LitGPT itself, in a Python that has it (LitGPT pins what
transformers 5 cannot share, so it often lives in its own virtual environment), and leaves its
logits as one .npy file per sequence (runner/litgpt_runner.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ...errors import WeightportError


def litgpt_python(explicit: str | None) -> str:
    """The Python to run LitGPT with: --runtime-python, then $WEIGHTPORT_LITGPT_PYTHON, then our own."""
    for exe in (explicit, os.environ.get("WEIGHTPORT_LITGPT_PYTHON")):
        if exe:
            if not Path(exe).exists():
                raise WeightportError(f"{exe}: no such Python for the litgpt runtime")
            return exe
    probe = subprocess.run([sys.executable, "-c", "import litgpt"], capture_output=True)
    if probe.returncode != 0:
        raise WeightportError("--runtime litgpt: litgpt is not importable here; install it, or pass "
                              "--runtime-python PATH (or set WEIGHTPORT_LITGPT_PYTHON) to a Python that has it")
    return sys.executable


def run_litgpt(ckpt_dir: Path, sequences: list[list[int]], out_dir: Path, python: str) -> None:
    tokens = out_dir.parent / f"{out_dir.name}-tokens.json"
    tokens.write_text(json.dumps(sequences))
    runner = Path(__file__).parent / "runner" / "litgpt_runner.py"
    proc = subprocess.run([python, str(runner), str(ckpt_dir), str(tokens), str(out_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise WeightportError(f"{ckpt_dir}: LitGPT could not run it ({last})")
