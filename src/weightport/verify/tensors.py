"""Tensor level: map two checkpoints to the hub and compare every tensor, one group at a time.

B is compared with A cast to B's dtype (torch's round-to-nearest-even `.to`), which is exactly
what `convert --dtype` does: so a correct conversion is bit-identical after that cast, and any
other difference, down to one ulp, is reported rather than absorbed by a tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..dtypes import itemsize, short_name
from ..format import Checkpoint
from ..errors import WeightportError
from ..hub import HubTensors
from ..io.source import TensorMeta
from ..plan import Step, unclaimed_tensors

# flat elements compared at a time: the temporaries (casts, int64 orderings) stay near 100 MB
CHUNK = 1 << 22
# larger tensors stored under a plain rename on both sides are compared from the files in pieces
STREAM_BYTES = 64 * 2**20
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
    """A checkpoint seen as hub tensors, like a conversion reads it, but without refusing an
    incomplete one: what cannot be produced is reported, so every missing and extra tensor is
    named at once."""

    def __init__(self, ckpt: Checkpoint):
        metas = ckpt.source.tensors
        self.missing: dict[str, str] = {}
        steps = []
        for rule in ckpt.rules:
            absent = [n for n in rule.fmt if n not in metas]
            if absent:
                self.missing.update((h, f"its stored tensor {absent[0]} is absent") for h in rule.hub)
            else:
                steps.append(Step(rule.fmt, rule.hub, rule.op, backward=True))
        self.extra = [name for name, why in unclaimed_tensors(ckpt) if not why]
        self._hub = HubTensors(ckpt.source, steps)

    @property
    def names(self) -> list[str]:
        return list(self._hub.producer)

    def stored_as(self, name: str) -> list[str]:
        step = self._hub.producer.get(name)
        return list(step.inputs) if step else []

    @property
    def source(self):
        return self._hub.source

    def take(self, name: str) -> torch.Tensor:
        return self._hub.take(name)

    def renamed_from(self, name: str) -> str | None:
        return self._hub.renamed_from(name)

    def skip(self, name: str) -> None:
        self._hub.skip(name)


def _ordered(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float bit patterns as integers that count ulps: sign-magnitude folded onto a line."""
    i = bits.to(torch.int64)
    sign = 1 << (torch.empty((), dtype=dtype).element_size() * 8 - 1)
    return torch.where(i < 0, -(i & (sign - 1)), i)


class _Differences:
    """Accumulates the comparison of B with A-cast-to-B's-dtype over flat pieces, so a tensor
    never needs to be whole (or copied as int64) to be compared."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.bits = dtype, _BITS.get(dtype)
        self.n, self.max_diff, self.max_a, self.max_ulp, self.first = 0, 0.0, 0.0, 0, None

    def add(self, start: int, pa: torch.Tensor, pb: torch.Tensor) -> None:
        ca = pa.to(self.dtype)
        if self.bits is not None:
            ia, ib = ca.view(self.bits), pb.view(self.bits)
            differ = ia != ib
        else:
            differ = ca != pb
        if pa.numel():
            self.max_a = max(self.max_a, float(pa.double().abs().nan_to_num(0.0).max()))
        count = int(differ.sum())
        if not count:
            return
        if self.first is None:
            self.first = start + int(differ.nonzero()[0, 0])
        self.n += count
        da, db = ca[differ].double(), pb[differ].double()
        self.max_diff = max(self.max_diff, float((da - db).abs().nan_to_num(float("inf")).max()))
        if self.bits is not None:
            ulps = (_ordered(ia[differ], self.dtype) - _ordered(ib[differ], self.dtype)).abs()
            self.max_ulp = max(self.max_ulp, int(ulps.max()))

    def result(self, res: TensorResult, shape: tuple[int, ...], same_dtype: bool) -> TensorResult:
        if not self.n:
            res.status = "exact" if same_dtype else "cast"
            return res
        res.status = "different"
        res.n_different, res.max_abs_diff = self.n, self.max_diff
        res.rel_err = self.max_diff / self.max_a if self.max_a else float("inf")
        res.max_ulp = self.max_ulp if self.bits is not None else None
        res.first_diff = [int(i) for i in torch.unravel_index(torch.tensor(self.first), shape)] if shape else []
        return res


def _result(name, shape_a, shape_b, dtype_a, dtype_b) -> TensorResult:
    return TensorResult(name, "exact", list(shape_a), list(shape_b), short_name(dtype_a), short_name(dtype_b))


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorResult:
    res = _result(name, a.shape, b.shape, a.dtype, b.dtype)
    if a.shape != b.shape:
        res.status = "shape"
        return res
    fa, fb = a.reshape(-1), b.reshape(-1)
    diff = _Differences(b.dtype)
    for start in range(0, fa.numel(), CHUNK):
        diff.add(start, fa[start:start + CHUNK], fb[start:start + CHUNK])
    diff.result(res, tuple(a.shape), a.dtype == b.dtype)
    if res.status == "different":
        res.note = _layout_hint(a.to(b.dtype), b)
    return res


def compare_pieces(name: str, meta_a: TensorMeta, meta_b: TensorMeta, pieces_a, pieces_b) -> TensorResult:
    """`compare` for two tensors given as flat pieces of equal element counts."""
    res = _result(name, meta_a.shape, meta_b.shape, meta_a.dtype, meta_b.dtype)
    diff = _Differences(meta_b.dtype)
    start = 0
    for pa, pb in zip(pieces_a, pieces_b):
        diff.add(start, pa, pb)
        start += pa.numel()
    return diff.result(res, meta_a.shape, meta_a.dtype == meta_b.dtype)


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


def streamed_bytes(r: TensorResult) -> int:
    n = 1
    for d in r.shape_a:
        n *= d
    return n * (itemsize(getattr(torch, r.dtype_a)) + itemsize(getattr(torch, r.dtype_b)))


def _compare_renamed(name: str, ra: HubReader, rb: HubReader) -> TensorResult | None:
    """Large tensors both sides store under a plain rename are compared piece by piece straight
    from the files: an 8B model's 1 GB embedding never sits in memory twice."""
    stored_a, stored_b = ra.renamed_from(name), rb.renamed_from(name)
    if stored_a is None or stored_b is None:
        return None
    meta_a, meta_b = ra.source.tensors[stored_a], rb.source.tensors[stored_b]
    if meta_a.nbytes <= STREAM_BYTES or meta_a.shape != meta_b.shape:
        return None
    pieces_a = ra.source.iter_chunks(stored_a, CHUNK * itemsize(meta_a.dtype))
    pieces_b = rb.source.iter_chunks(stored_b, CHUNK * itemsize(meta_b.dtype))
    if pieces_a is None or pieces_b is None:
        return None
    ra.skip(name)
    rb.skip(name)
    return compare_pieces(name, meta_a, meta_b, pieces_a, pieces_b)


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
        streamed = _compare_renamed(name, ra, rb)
        if streamed is not None:
            results.append(streamed)
            if progress:
                progress(streamed_bytes(streamed))
            continue
        try:
            ta = ra.take(name)
        except (ValueError, WeightportError) as e:
            results.append(TensorResult(name, "unreadable", note=f"A: {', '.join(ra.stored_as(name))}: {e}"))
            continue
        try:
            tb = rb.take(name)
        except (ValueError, WeightportError) as e:
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
