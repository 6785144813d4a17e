"""The Python API: `convert`, `inspect` and `support_matrix`, as the CLI uses them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import adapters, bridges, formats
from .formats.litgpt import lora as lora_litgpt
from .formats.peft import export
from .archs import ARCHS
from .dtypes import parse_dtype, parse_size, short_name
from .errors import WeightportError
from .execute import execute
from .format import Checkpoint, WriteOptions
from .paths import check_input_tree, check_output
from .plan import Plan, build_plan


def open_checkpoint(path: str | Path, fmt: str | None = None, layout: str | None = None,
                    bases: dict[str, str | Path] | None = None, lora_alpha: float | None = None) -> Checkpoint:
    """`bases`: base checkpoints that complete a partial one ({"llm": DIR, "visual_encoder": DIR})."""
    path = Path(path)
    adapter = formats.get(fmt) if fmt else formats.detect(path)
    if not path.exists():
        raise WeightportError(f"{path}: no such file or directory")
    _check_choice(adapter, "layout", layout, adapter.layouts)
    bases = {k: Path(v) for k, v in (bases or {}).items() if v is not None}
    if lora_alpha is not None and adapter.name != "xtuner":
        raise WeightportError(f"--lora-alpha: only for xtuner training checkpoints that hold LoRA weights, not "
                              f"format {adapter.name}")
    if not bases:
        return adapter.open(path, layout, lora_alpha=lora_alpha) if lora_alpha is not None else adapter.open(path, layout)
    if not getattr(adapter, "takes_bases", False):
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in bases)
        raise WeightportError(f"{flags}: only for LLaVA checkpoints that lack a part (xtuner, xtuner-llava, llava), "
                              f"not format {adapter.name}")
    for k, v in bases.items():
        if not v.is_dir():
            raise WeightportError(f"{v}: no such directory (--{k.replace('_', '-')})")
    if adapter.name == "xtuner":
        return adapter.open(path, layout, bases=bases, lora_alpha=lora_alpha)
    return adapter.open(path, layout, bases=bases)


def _check_choice(adapter, kind: str, value: str | None, choices: tuple[str, ...], model=None) -> None:
    """A --layout or --container the format (for this model, when given) has."""
    if value is not None and value not in choices:
        what = f"choose one of {', '.join(choices)}" if choices else "it has only one"
        scope = f" for {model.arch.name}" if model is not None and choices else ""
        raise WeightportError(f"format {adapter.name} has no {kind} {value!r}{scope} ({what})")


def check_inputs(inputs: dict[str, str | Path | None]) -> None:
    """Every input of a run exists and holds only regular files (and directories)."""
    for flag, path in inputs.items():
        if path is None:
            continue
        if not Path(path).exists():
            raise WeightportError(f"{path}: no such file or directory" + ("" if flag == "SRC" else f" ({flag})"))
        check_input_tree(path, flag)


def check_supports(target, model) -> None:
    if model.arch.name not in target.archs:
        able = [f.name for f in formats.FORMATS.values() if model.arch.name in f.archs]
        raise WeightportError(f"format {target.name} does not support {model.arch.name} "
                              f"(formats that do: {', '.join(able)})")


def check_parallel(target, tp: int, pp: int) -> None:
    """--tp / --pp: positive, and only for a format that writes per-rank files."""
    for flag, n in (("--tp", tp), ("--pp", pp)):
        if not isinstance(n, int) or n < 1:
            raise WeightportError(f"{flag} must be a positive integer, got {n!r}")
        if n != 1 and not getattr(target, "tensor_parallel", False):
            raise WeightportError(f"format {target.name} has no per-rank files; {flag} applies to nanotron")


def plan_conversion(src: str | Path, out: str | Path, to: str, *, source_format: str | None = None,
                    dtype: str | torch.dtype | None = "auto", max_shard_size: str | int = "5GB",
                    layout: str | None = None, source_layout: str | None = None,
                    container: str | None = None, tp: int = 1, pp: int = 1,
                    allow_approximate: bool = False, nanotron_version: str | None = None,
                    llm: str | Path | None = None, visual_encoder: str | Path | None = None,
                    to_arch: str | None = None, merge_lora: str | Path | None = None,
                    lora_scale: float = 1.0, lora_alpha: float | None = None, with_past: bool = False) -> Plan:
    target = formats.get(to)
    check_parallel(target, tp, pp)
    if nanotron_version is not None and target.name != "nanotron":
        raise WeightportError(f"--nanotron-version applies to nanotron, not {target.name}")
    if with_past and target.name != "onnx":
        raise WeightportError(f"--with-past applies to onnx, not {target.name}")
    _check_choice(target, "container", container, target.containers)
    ckpt = open_checkpoint(src, source_format, source_layout, {"llm": llm, "visual_encoder": visual_encoder}, lora_alpha)
    try:
        if isinstance(dtype, str):
            dtype = parse_dtype(dtype)
        size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
        if merge_lora is not None:  # on the source's own architecture, before any change of it
            ckpt = adapters.merge(ckpt, formats.read_adapter(Path(merge_lora), ckpt.model), lora_scale)
        elif lora_scale != 1.0:
            raise WeightportError("--lora-scale applies with --merge-lora")
        if to_arch is not None:
            ckpt = bridges.to_arch(ckpt, to_arch, allow_approximate)
        check_supports(target, ckpt.model)
        _check_choice(target, "layout", layout, target.layouts_for(ckpt.model), ckpt.model)
        options = WriteOptions(max_shard_size=size, layout=layout, container=container, tp=tp, pp=pp,
                               allow_approximate=allow_approximate, nanotron_version=nanotron_version,
                               with_past=with_past)
        ckpt = target.prepare(ckpt, options)
        return build_plan(ckpt, target, Path(out), dtype, options)
    except BaseException:
        ckpt.close()
        raise


def convert(src: str | Path, out: str | Path, to: str, *, source_format: str | None = None,
            dtype: str | torch.dtype | None = "auto", max_shard_size: str | int = "5GB", force: bool = False,
            allow_overflow: bool = False, dry_run: bool = False, progress: bool = False,
            layout: str | None = None, source_layout: str | None = None, container: str | None = None,
            tp: int = 1, pp: int = 1, allow_approximate: bool = False,
            nanotron_version: str | None = None, llm: str | Path | None = None,
            visual_encoder: str | Path | None = None, to_arch: str | None = None,
            merge_lora: str | Path | None = None, lora_scale: float = 1.0, lora_alpha: float | None = None,
            with_past: bool = False, manifest: bool = True, delete_existing: bool = False,
            allow_nan: bool = False) -> Plan:
    """Convert the checkpoint at `src` into format `to` at `out`; returns the executed plan.
    `manifest=False` writes no weightport-manifest.json and hashes nothing. An existing `out` is
    replaced with `force` only when weightport wrote it; `delete_existing` replaces it whatever it is."""
    src, out = Path(src), Path(out)
    inputs = {"SRC": src, "--merge-lora": merge_lora, "--llm": llm, "--visual-encoder": visual_encoder}
    check_inputs(inputs)
    check_output(out, inputs, force=force, delete_existing=delete_existing)
    if to == "peft":
        raise WeightportError("--to peft converts a LitGPT LoRA checkpoint; use convert_adapter()")
    plan = plan_conversion(src, out, to, source_format=source_format, dtype=dtype, max_shard_size=max_shard_size,
                           layout=layout, source_layout=source_layout, container=container,
                           tp=tp, pp=pp, allow_approximate=allow_approximate, nanotron_version=nanotron_version,
                           llm=llm, visual_encoder=visual_encoder, to_arch=to_arch, merge_lora=merge_lora,
                           lora_scale=lora_scale, lora_alpha=lora_alpha, with_past=with_past)
    try:
        if not dry_run:
            execute(plan, force=force, delete_existing=delete_existing, allow_overflow=allow_overflow, allow_nan=allow_nan,
                    progress=progress, manifest=manifest)
    finally:
        plan.source.close()
    return plan


@dataclass
class Inspection:
    path: Path
    format: str
    variant: str
    arch: str
    hf_class: str
    config: dict
    parameters: int
    dtypes: dict[str, int]
    tensors: list[tuple[str, tuple[int, ...], str]]
    notes: list[str]

    def render(self, tensors: bool = False) -> str:
        d = self.config
        lines = [
            f"path:        {self.path}",
            f"format:      {self.format} ({self.variant})",
            f"arch:        {self.arch} ({self.hf_class})",
            f"parameters:  {self.parameters:,}",
            "dtypes:      " + ", ".join(f"{k} ({v} tensors)" for k, v in self.dtypes.items()),
            "config:      " + ", ".join(f"{k}={d[k]}" for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "num_local_experts", "tie_word_embeddings") if d.get(k) is not None),
        ]
        lines += [f"note:        {n}" for n in self.notes]
        if tensors:
            lines.append(f"tensors ({len(self.tensors)}):")
            lines += [f"  {n}  {list(s)}  {dt}" for n, s, dt in self.tensors]
        return "\n".join(lines)


def inspect(path: str | Path, fmt: str | None = None) -> Inspection:
    """Describe a checkpoint from its headers and config; no tensor data is read."""
    ckpt = open_checkpoint(path, fmt)
    try:
        metas = ckpt.source.tensors
        dtypes = Counter(short_name(m.dtype) for m in metas.values())
        params = 0
        for m in metas.values():
            n = 1
            for x in m.shape:
                n *= x
            params += n
        if ckpt.model.dims.tied and "lm_head.weight" in metas:  # stored twice, one parameter
            params -= ckpt.model.dims.vocab * ckpt.model.dims.hidden
        m = ckpt.model
        return Inspection(Path(path), ckpt.format.name, ckpt.variant, m.arch.name, m.arch.hf_class,
                          dict(m.config, head_dim=m.dims.head_dim), params, dict(dtypes),
                          [(n, t.shape, short_name(t.dtype)) for n, t in metas.items()], ckpt.notes)
    finally:
        ckpt.close()


def support_matrix() -> list[tuple[str, str, str, str]]:
    """(format, architecture, read, write) rows."""
    rows = []
    for f in formats.FORMATS.values():
        for a in ARCHS.values():
            read, write = a.name in f.archs + f.read_only_archs, a.name in f.archs
            rows.append((f.name, f"{a.name} — {a.title}", "yes" if read else "no", "yes" if write else "no"))
    return rows


def convert_adapter(src: str | Path, out: str | Path, to: str = "peft", force: bool = False,
                    delete_existing: bool = False) -> list[str]:
    """A LitGPT LoRA checkpoint (`litgpt finetune_lora`'s output) as a PEFT adapter directory at
    `out`; returns the adapted modules."""
    src, out = Path(src), Path(out)
    if to != "peft":
        raise WeightportError(f"adapters convert to peft only, not {to}")
    check_inputs({"SRC": src})
    if not lora_litgpt.is_litgpt_lora(src):
        raise WeightportError(f"{src}: --to peft takes a LitGPT LoRA checkpoint (lit_model.pth.lora with "
                              "hyperparameters.yaml and model_config.yaml)")
    check_output(out, {"SRC": src}, force=force, delete_existing=delete_existing)
    return export.litgpt_lora_to_peft(src, out, force, delete_existing)
