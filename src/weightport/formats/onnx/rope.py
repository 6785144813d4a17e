"""Rotary frequencies as transformers computes them (modeling_rope_utils), baked into the graph
as a constant: the graph then only multiplies them by the positions it is given."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import WeightportError
from ...hf_config import rope_parameters

EXACT = ("default", "linear", "llama3")


def rotary(cfg: dict, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32 (these rope types scale cos and sin by 1)."""
    rope = rope_parameters(cfg)
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind not in EXACT:
        raise WeightportError(f"ONNX export: rope_type {kind!r} is not implemented ({', '.join(EXACT)} are); "
                              "its frequencies depend on the sequence length")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise WeightportError(f"ONNX export: partial_rotary_factor {partial} is not implemented")
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if kind == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, rope)
    return inv_freq.numpy().astype(np.float32)


def _llama3(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
