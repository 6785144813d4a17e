"""Run a model on the verification inputs and leave its logits as one .npy file per sequence.

Each runtime runs the model in the dtype its weights are stored in, as its users would. Logits
go to disk so only one model is ever in memory, however large the two are.
"""

from __future__ import annotations

import importlib.util
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
