#!/usr/bin/env python3
"""Writes one small valid file per fuzz target into fuzz/corpus/TARGET/ (the seeds libFuzzer mutates)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from weightport.formats.mindspore.ckpt import MsCkptWriter

CORPUS = Path(__file__).resolve().parent / "corpus"


def main() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.arange(5, dtype=torch.float16),
               "c": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16)}
    for target in ("safetensors", "torch", "ckpt", "config-json", "litgpt-yaml"):
        (CORPUS / target).mkdir(parents=True, exist_ok=True)
    save_file(tensors, CORPUS / "safetensors" / "seed.safetensors", metadata={"format": "pt"})
    torch.save(tensors, CORPUS / "torch" / "seed.bin")
    w = MsCkptWriter(CORPUS / "ckpt" / "seed.ckpt", crc=True)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    (CORPUS / "config-json" / "seed.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "rope_parameters": {"rope_theta": 1e4}}))
    (CORPUS / "litgpt-yaml" / "seed.yaml").write_text("name: tiny\nn_layer: 2\nn_embd: 64\nrope_base: 10000\n"
                                                      "hf_config: {org: x, name: y}\n")


if __name__ == "__main__":
    main()
