"""`weightport build`: a new model assembled from parts of existing checkpoints, written in any
format, streamed like a conversion (the parts become one source; new tensors are made on demand)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .. import formats
from ..api import check_inputs, check_parallel, open_checkpoint
from ..dtypes import parse_dtype, parse_size
from ..errors import WeightportError
from ..execute import execute
from ..format import WriteOptions
from ..paths import check_output
from ..plan import Plan, build_plan
from . import idefics3

KINDS = ("idefics3",)


def build(kind: str, out: str | Path, *, text: str | Path, vision: str | Path, to: str = "hf",
          text_format: str | None = None, seed: int = 0, scale_factor: int = 2,
          dtype: str | torch.dtype | None = "auto", max_shard_size: str | int = "5GB", tp: int = 1, pp: int = 1,
          force: bool = False, delete_existing: bool = False, dry_run: bool = False, progress: bool = False) -> Plan:
    """Assemble a `kind` model from its parts into `out` (format `to`); returns the executed plan."""
    if kind not in KINDS:
        raise WeightportError(f"cannot build {kind!r} (choose one of {', '.join(KINDS)})")
    text, vision, out = Path(text), Path(vision), Path(out)
    inputs = {"--text": text, "--vision": vision}
    check_inputs(inputs)
    check_output(out, inputs, force=force, delete_existing=delete_existing)
    target = formats.get(to)
    check_parallel(target, tp, pp)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    text_ckpt = open_checkpoint(text, text_format)
    # the extended tokenizer and processor configs live here until execute copies them beside the weights
    with tempfile.TemporaryDirectory(prefix="weightport-build-") as workdir:
        try:
            ckpt = idefics3.assemble(text_ckpt, vision, Path(workdir), seed=seed, scale_factor=scale_factor)
        except BaseException:
            text_ckpt.close()
            raise
        try:
            if ckpt.model.arch.name not in target.archs:
                raise WeightportError(f"format {target.name} does not support {ckpt.model.arch.name}")
            plan = build_plan(ckpt, target, out, dtype, WriteOptions(max_shard_size=size, tp=tp, pp=pp))
            if not dry_run:
                execute(plan, force=force, delete_existing=delete_existing, progress=progress)
        finally:
            ckpt.close()
    return plan
