"""Run a model on the verification inputs and leave its logits as one .npy file per sequence.

Each runtime runs the model in the dtype its weights are stored in, as its users would. Logits
go to disk so only one model is ever in memory, however large the two are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import WeightportError
from .inputs import Inputs

RUNTIMES = ("transformers", "litgpt")
# formats whose runtimes are still to come, so their names give a clear answer rather than argparse's
PLANNED_RUNTIMES = {"mindspore": "mindspore", "onnxruntime": "onnx"}


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def run_transformers(hf_dir: Path, inputs: Inputs, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype="auto", attn_implementation="eager")
    except Exception as e:  # a checkpoint transformers cannot load is a finding, not a crash
        raise WeightportError(f"{hf_dir}: transformers cannot load it ({str(e).splitlines()[0]})") from None
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for i, ids in enumerate(inputs.sequences):
            logits = model(torch.tensor([ids])).logits[0]
            np.save(out_dir / f"{i}.npy", logits.float().numpy())
    del model


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


def run_litgpt(ckpt_dir: Path, inputs: Inputs, out_dir: Path, python: str) -> None:
    tokens = out_dir.parent / f"{out_dir.name}-tokens.json"
    tokens.write_text(json.dumps(inputs.sequences))
    runner = Path(__file__).with_name("litgpt_runner.py")
    proc = subprocess.run([python, str(runner), str(ckpt_dir), str(tokens), str(out_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise WeightportError(f"{ckpt_dir}: LitGPT could not run it ({last})")
