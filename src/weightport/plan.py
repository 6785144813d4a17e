"""Plan a conversion from file headers alone, and check its coverage before writing.

Source rules are applied backwards (format -> hub) and target rules forwards (hub -> format).
The plan proves, with shapes only, that every source tensor is used or dropped on purpose,
that every hub tensor the architecture needs is produced with the shape its config implies,
and that every target tensor has a producer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .dtypes import FLOAT16_MAX, short_name
from .errors import WeightportError
from .format import Checkpoint, Format, OutputFile, OutputTensor, WriteOptions
from .ops import Identity, Op, Tie


@dataclass(frozen=True)
class Step:
    """One rule application: `op` forward (hub -> format) or backward (format -> hub)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    op: Op
    backward: bool

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.op.inverse(tensors) if self.backward else self.op.forward(tensors)

    def describe(self) -> str:
        op = str(self.op)
        if self.backward and not isinstance(self.op, Identity):
            op = f"inverse of {op}"
        return f"{', '.join(self.inputs)} -> {', '.join(self.outputs)}  [{op}]"


@dataclass
class Plan:
    source: Checkpoint
    target: Format
    out_dir: Path
    read_steps: list[Step]
    write_steps: list[Step]
    files: list[OutputFile]
    dtype: torch.dtype | None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    # what it was asked for, with the format's default layout filled in
    options: WriteOptions = field(default_factory=WriteOptions)
    # what --allow-approximate let through
    warnings: list[str] = field(default_factory=list)
    # what the target format does to the output that a reader should know (e.g. padding it adds)
    notes: list[str] = field(default_factory=list)

    @property
    def layout(self) -> str | None:
        return self.options.layout

    @property
    def outputs(self) -> list[OutputTensor]:
        return [t for f in self.files for t in f.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def read_bytes(self) -> int:
        return sum(m.nbytes for m in self.source.source.tensors.values())

    def render(self, verbose: bool = True) -> str:
        s, m = self.source, self.source.model
        lines = [
            f"source:  {s.path}  [{s.format.name}: {s.variant}]",
            f"model:   {m.arch.name} ({m.arch.hf_class}), {m.dims.n_layer} layers, hidden {m.dims.hidden}, "
            f"{m.dims.n_head} heads / {m.dims.n_kv} kv, vocab {m.dims.vocab}"
            + (f", {m.dims.n_expert} experts" if m.dims.n_expert else "") + (", tied embeddings" if m.dims.tied else ""),
            f"target:  {self.out_dir}  [{self.target.name}"
            + (f", {self.layout} layout" if self.layout else "") + "]",
            f"dtype:   {'keep source' if self.dtype is None else short_name(self.dtype)}",
            f"reads:   {len(s.source.tensors)} tensors, {_human(self.read_bytes)} from {len(s.source.files)} file(s)",
            f"writes:  {len(self.outputs)} tensors, {_human(self.total_bytes)} in {len(self.files)} file(s)",
            "coverage: every source tensor used" + (f" or dropped ({len(self.dropped)})" if self.dropped else "")
            + ", every target tensor produced",
        ]
        for note in s.notes + self.notes:
            lines.append(f"note:    {note}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        for name, why in self.dropped:
            lines.append(f"drop:    {name} ({why})")
        lines.append("files:")
        for f in self.files:
            lines.append(f"  {f.name}  {len(f.tensors)} tensors, {_human(f.nbytes)}")
        if verbose:
            changed = [st for st in self.read_steps + self.write_steps if not isinstance(st.op, Identity)]
            renames = sum(isinstance(st.op, Identity) for st in self.write_steps)
            lines.append(f"ops:     {renames} renames, {len(changed)} layout changes")
            for st in changed:
                lines.append(f"  {st.describe()}")
            lines.append("tensors:")
            for t in self.outputs:
                tied = "  (tied: stored once with the tensor above)" if t.alias else ""
                lines.append(f"  {t.name}  {list(t.shape)}  {short_name(t.dtype)}{tied}")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def _fail(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise WeightportError(problems[0] + more)


def unclaimed_tensors(source: Checkpoint) -> list[tuple[str, str | None]]:
    """Stored tensors no rule reads, each with why it is dropped on purpose (None: it is not)."""
    claimed = {n for r in source.rules for n in r.fmt}
    out = []
    for name in source.source.tensors:
        if name in claimed:
            continue
        why = source.dropped.get(name)
        if why is None and source.model.arch.is_droppable(name):
            why = "recomputed by the model"
        out.append((name, why))
    return out


def build_plan(source: Checkpoint, target: Format, out_dir: Path, dtype: torch.dtype | None,
               options: WriteOptions) -> Plan:
    metas = source.source.tensors
    model = source.model
    options = replace(options, layout=options.layout or target.default_layout(model))
    warnings = source.warnings + target.check_write(model, options)
    expected = model.hub_tensors()
    problems: list[str] = []

    # 1. every source tensor is claimed by a rule, or droppable by design
    dropped = []
    for name, why in unclaimed_tensors(source):
        meta = metas[name]
        if why:
            dropped.append((name, why))
        else:
            problems.append(f"{meta.file}: tensor {name} is not part of a {model.arch.name} model "
                            f"with this config (unmapped extra tensor)")
    for rule in source.rules:
        for n in rule.fmt:
            if n not in metas:
                problems.append(f"{source.path}: tensor {n} is missing (the {model.arch.name} config needs it)")
    _fail(problems)

    # 2. shapes through the source rules must give the hub shapes the config implies
    hub_dtype: dict[str, torch.dtype] = {}
    read_steps = []
    for rule in source.rules:
        shapes = [metas[n].shape for n in rule.fmt]
        where = metas[rule.fmt[0]].file
        try:
            hub_shapes = rule.op.inverse_shapes(shapes)
        except ValueError as e:
            problems.append(f"{where}: tensor {rule.fmt[0]} {list(shapes[0])} does not fit the config ({e})")
            continue
        for h, s in zip(rule.hub, hub_shapes):
            if tuple(s) != tuple(expected[h]):
                via = "" if rule.fmt == (h,) else f" for {h}"
                problems.append(f"{where}: tensor {rule.fmt[0]} has shape {list(shapes[0])}, but the config "
                                f"implies {list(expected[h])}{via} (config disagrees with tensor shapes)")
            hub_dtype[h] = metas[rule.fmt[0]].dtype
        read_steps.append(Step(rule.fmt, rule.hub, rule.op, backward=True))
    _fail(problems)
    missing_hub = [h for h in expected if h not in hub_dtype]
    if missing_hub:
        raise WeightportError(f"{source.path}: no tensor provides {missing_hub[0]}")

    # 3. target rules: every hub tensor consumed, every output produced with a known shape
    write_rules = target.target_rules(model, options.layout, options.tp)
    consumed = {h for r in write_rules for h in r.hub}
    unconsumed = [h for h in expected if h not in consumed]
    if unconsumed:
        raise WeightportError(f"format {target.name} has no place for {unconsumed[0]} of {model.arch.name}")
    outputs, write_steps = [], []
    for rule in write_rules:
        shapes = rule.op.forward_shapes([tuple(expected[h]) for h in rule.hub])
        for i, (name, shape) in enumerate(zip(rule.fmt, shapes)):
            src_dtype = hub_dtype[rule.hub[0]]
            out_dtype = dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype
            outputs.append(OutputTensor(name, tuple(shape), out_dtype, alias=isinstance(rule.op, Tie) and i > 0))
        write_steps.append(Step(rule.hub, rule.fmt, rule.op, backward=False))
    return Plan(source, target, out_dir, read_steps, write_steps, target.files(outputs, options), dtype, dropped,
                options, warnings, target.write_notes(model, options))


def check_float16(name: str, tensor: torch.Tensor, allow_overflow: bool = False, allow_nan: bool = False) -> None:
    """A tensor about to be cast to float16 holds nothing the cast would silently make worse or hide:
    finite values beyond float16's range (they would become inf), inf or NaN already in the source."""
    if not (tensor.is_floating_point() and tensor.numel()):
        return
    # one pass in the usual case: max() propagates NaN, so a NaN-free peak settles all three
    peak = tensor.detach().abs().max().item()
    if math.isnan(peak):
        if not allow_nan:
            raise WeightportError(f"tensor {name}: the source holds NaN values; pass --allow-nan to cast it to "
                                  "float16 anyway (they stay NaN)")
        peak = tensor.detach().abs().nan_to_num(nan=0.0, posinf=math.inf).max().item()
    if allow_overflow:
        return
    if math.isinf(peak):
        raise WeightportError(f"tensor {name}: the source holds infinite values; pass --allow-overflow to cast it "
                              "to float16 anyway (they stay infinite)")
    if peak > FLOAT16_MAX:
        raise WeightportError(
            f"tensor {name} has values up to {peak:.6g}, beyond float16's ±{FLOAT16_MAX:g}; "
            "pass --allow-overflow to cast anyway (they become inf)")
