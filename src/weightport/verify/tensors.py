"""Tensor level: map two checkpoints to the hub and compare every tensor, one group at a time.

B is compared with A cast to B's dtype (torch's round-to-nearest-even `.to`), which is exactly
what `convert --dtype` does: so a correct conversion is bit-identical after that cast, and any
other difference, down to one ulp, is reported rather than absorbed by a tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..dtypes import short_name
from ..formats.base import Checkpoint
from ..ops import Identity
from ..plan import Step, unclaimed_tensors

# flat elements compared at a time: the temporaries (casts, int64 orderings) stay near 100 MB
CHUNK = 1 << 22
# differences this small are rounding-level: worth a separate word, never a pass
ROUNDING_ULPS = 4
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}


@dataclass
class TensorResult:
    name: str
    status: str  # exact | cast | different | shape | missing | extra | unreadable
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    n_different: int = 0
    max_abs_diff: float | None = None
    rel_err: float | None = None
    max_ulp: int | None = None
    first_diff: list[int] | None = None
    b_source: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("exact", "cast")

    def describe(self) -> str:
        if self.status == "exact":
            return "bit-identical"
        if self.status == "cast":
            return f"equal after the cast {self.dtype_a} -> {self.dtype_b}"
        if self.status == "shape":
            return f"shape {self.shape_a} in A, {self.shape_b} in B"
        if self.status in ("missing", "extra", "unreadable"):
            return self.note
        total = 1
        for d in self.shape_b or []:
            total *= d
        level = (f"rounding-level: max {self.max_ulp} ulp in {self.dtype_b}"
                 if self.max_ulp is not None and self.max_ulp <= ROUNDING_ULPS else
                 f"max {self.max_ulp} ulp" if self.max_ulp is not None else "")
        parts = [f"{self.n_different} of {total} values differ", level,
                 f"max abs diff {self.max_abs_diff:.3g}", f"rel err {self.rel_err:.3g}",
                 f"first at {self.first_diff}"]
        if self.note:
            parts.append(self.note)
        return ", ".join(p for p in parts if p)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", [])} | {"name": self.name,
                                                                                   "status": self.status}


class HubReader:
    """A checkpoint seen as hub tensors, produced group by group on demand.

    Unlike a plan, it does not refuse an incomplete checkpoint: what cannot be produced is
    reported, so a verification can name every missing and extra tensor at once."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        metas = ckpt.source.tensors
        self.missing: dict[str, str] = {}
        self._producer: dict[str, Step] = {}
        for rule in ckpt.rules:
            absent = [n for n in rule.fmt if n not in metas]
            if absent:
                for h in rule.hub:
                    self.missing[h] = f"its stored tensor {absent[0]} is absent"
                continue
            step = Step(rule.fmt, rule.hub, rule.op, backward=True)
            for h in rule.hub:
                self._producer[h] = step
        self.extra = [name for name, droppable in unclaimed_tensors(ckpt) if not droppable]
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self._producer)

    def stored_as(self, name: str) -> list[str]:
        step = self._producer.get(name)
        return list(step.inputs) if step else []

    def layout_changed(self, name: str) -> bool:
        step = self._producer.get(name)
        return step is not None and not isinstance(step.op, Identity)

    def take(self, name: str) -> torch.Tensor:
        """The hub tensor, read once: later groups never wait behind this one in memory."""
        if name not in self._cache:
            step = self._producer[name]
            outs = step.run([self.ckpt.source.load(n) for n in step.inputs])
            self._cache.update(zip(step.outputs, outs))
        return self._cache.pop(name)


def _ordered(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float bit patterns as integers that count ulps: sign-magnitude folded onto a line."""
    i = bits.to(torch.int64)
    sign = 1 << (torch.empty((), dtype=dtype).element_size() * 8 - 1)
    return torch.where(i < 0, -(i & (sign - 1)), i)


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorResult:
    res = TensorResult(name, "exact", list(a.shape), list(b.shape), short_name(a.dtype), short_name(b.dtype))
    if a.shape != b.shape:
        res.status = "shape"
        return res
    fa, fb = a.reshape(-1), b.reshape(-1)
    bits = _BITS.get(b.dtype)
    n_diff, max_diff, max_a, max_ulp, first = 0, 0.0, 0.0, 0, None
    for start in range(0, fa.numel(), CHUNK):
        ca = fa[start:start + CHUNK].to(b.dtype)
        cb = fb[start:start + CHUNK]
        if bits is not None:
            ia, ib = ca.view(bits), cb.view(bits)
            differ = ia != ib
        else:
            differ = ca != cb
        if ca.is_floating_point() or ca.is_complex():
            max_a = max(max_a, float(fa[start:start + CHUNK].double().abs().nan_to_num(0.0).max()))
        elif ca.numel():
            max_a = max(max_a, float(ca.double().abs().max()))
        count = int(differ.sum())
        if not count:
            continue
        if first is None:
            first = start + int(differ.nonzero()[0, 0])
        n_diff += count
        da, db = ca[differ].double(), cb[differ].double()
        max_diff = max(max_diff, float((da - db).abs().nan_to_num(float("inf")).max()))
        if bits is not None:
            ulps = (_ordered(ia[differ], b.dtype) - _ordered(ib[differ], b.dtype)).abs()
            max_ulp = max(max_ulp, int(ulps.max()))
    if not n_diff:
        res.status = "exact" if a.dtype == b.dtype else "cast"
        return res
    res.status = "different"
    res.n_different = n_diff
    res.max_abs_diff = max_diff
    res.rel_err = max_diff / max_a if max_a else float("inf")
    res.max_ulp = max_ulp if bits is not None else None
    res.first_diff = list(torch.unravel_index(torch.tensor(first), a.shape)) if a.dim() else []
    res.first_diff = [int(i) for i in res.first_diff]
    res.note = _layout_hint(a.to(b.dtype), b)
    return res


def _layout_hint(a: torch.Tensor, b: torch.Tensor) -> str:
    """Most conversion bugs move values rather than change them; say so when that is what happened."""
    if a.numel() > 1 << 26:
        return ""
    if a.dim() == 2 and a.shape[0] == a.shape[1] and torch.equal(a.T, b):
        return "B holds A transposed"
    if a.dim() >= 1 and torch.equal(a.flatten().sort().values, b.flatten().sort().values):
        if a.dim() == 2 and torch.equal(a.sort(dim=1).values.sort(dim=0).values, b.sort(dim=1).values.sort(dim=0).values):
            return "same rows in another order (a row permutation)"
        return "same values in other positions (a layout error)"
    return ""


@dataclass
class TensorReport:
    results: list[TensorResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def compare_checkpoints(a: Checkpoint, b: Checkpoint, progress=None) -> TensorReport:
    ra, rb = HubReader(a), HubReader(b)
    results = []
    b_names = set(rb.names)
    for name in ra.names:
        if name not in b_names:
            why = rb.missing.get(name, "B's model has no such tensor")
            results.append(TensorResult(name, "missing", note=f"missing in B ({why})"))
            ra.take(name)
            continue
        b_names.discard(name)
        src = rb.stored_as(name)
        try:
            ta = ra.take(name)
        except ValueError as e:
            results.append(TensorResult(name, "unreadable", note=f"A: {', '.join(ra.stored_as(name))}: {e}"))
            continue
        try:
            tb = rb.take(name)
        except ValueError as e:
            results.append(TensorResult(name, "unreadable", b_source=src, note=f"B: {', '.join(src)}: {e}"))
            continue
        r = compare(name, ta, tb)
        r.b_source = src if src != [name] else []
        results.append(r)
        if progress:
            progress(ta.nbytes + tb.nbytes)
        del ta, tb
    for name in ra.missing:
        b_names.discard(name)
        results.append(TensorResult(name, "missing", note=f"missing in A ({ra.missing[name]})"))
    for name in sorted(b_names):
        results.append(TensorResult(name, "extra", note="in B only: A's model has no such tensor"))
    for name in rb.extra:
        results.append(TensorResult(name, "extra", note="stored in B but not part of its model (unmapped extra tensor)"))
    for name in ra.extra:
        results.append(TensorResult(name, "extra", note="stored in A but not part of its model (unmapped extra tensor)"))
    return TensorReport(results)
