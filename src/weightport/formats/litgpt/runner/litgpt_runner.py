"""Run a LitGPT checkpoint in LitGPT itself and save its logits, for `weightport verify --runtime litgpt`.

This file runs as a script in whichever Python has litgpt (LitGPT 0.5 pins a huggingface_hub
that transformers 5 cannot share, so it often lives in its own virtual environment). It imports
only the standard library, torch, numpy and litgpt, never weightport.

    python litgpt_runner.py CHECKPOINT_DIR TOKENS_JSON OUT_DIR

TOKENS_JSON is a list of token-id lists; OUT_DIR/<i>.npy gets sample i's float32 logits
[seq, padded_vocab]. The model runs in the dtype its weights are stored in.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def main(ckpt_dir: str, tokens_json: str, out_dir: str) -> None:
    from litgpt import GPT, Config

    ckpt = Path(ckpt_dir)
    config = Config.from_file(ckpt / "model_config.yaml")
    # as litgpt's own loaders do: mmap'd weights-only load, "model" wrapper unwrapped
    state = torch.load(str(ckpt / "lit_model.pth"), weights_only=True, mmap=True)
    state = state.get("model", state)
    dtypes = Counter(t.dtype for t in state.values() if t.is_floating_point())
    dtype = dtypes.most_common(1)[0][0] if dtypes else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = GPT(config)
    finally:
        torch.set_default_dtype(previous)
    model.load_state_dict(state, strict=True)
    model.eval()
    sequences = json.loads(Path(tokens_json).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for i, ids in enumerate(sequences):
            logits = model(torch.tensor([ids], dtype=torch.long))[0]
            np.save(out / f"{i}.npy", logits.float().numpy())


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
