"""Build a small random Llama with transformers, convert it HF -> LitGPT -> HF with the
weightport CLI, verify the LitGPT copy with `weightport verify`, and check the round trip:
tensors bit-identical, logits equal."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig


def weightport(*args: str) -> None:
    cmd = [sys.executable, "-m", "weightport", *args]
    print("$ weightport " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="weightport-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, lit, back = work / "llama-hf", work / "llama-litgpt", work / "llama-hf-again"

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(hf)
    print(f"built a random Llama-3-style model ({sum(p.numel() for p in model.parameters()):,} parameters) in {hf}\n")

    weightport("inspect", str(hf))
    print()
    weightport("convert", str(hf), str(lit), "--to", "litgpt", "--force")
    print()
    weightport("verify", str(hf), str(lit), "--samples", "8")
    print()
    weightport("convert", str(lit), str(back), "--to", "hf", "--force")
    print()

    a, b = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, config.vocab_size, (1, 32))
    with torch.no_grad():
        before = model(tokens).logits
        after = AutoModelForCausalLM.from_pretrained(back).eval()(tokens).logits
    diff = (before - after).abs().max().item()
    print(f"check: {len(a)} tensors bit-identical after HF -> LitGPT -> HF: {same}")
    print(f"check: max |logits difference| of the reloaded model: {diff:.3g}")
    ok = same and diff == 0.0
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
