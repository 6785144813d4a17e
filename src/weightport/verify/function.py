"""Function level: compare the logits two models produced on the same inputs.

The verdict uses a tolerance per dtype, the lower precision of the two models deciding. Each
position's difference is max over the vocabulary of |logits_B - logits_A|; the judged difference
is the largest of them in float32, and the 90th percentile over positions in reduced precision,
where a mixture-of-experts router may legitimately pick another expert for a near-tie
(docs/verify.md has the measurements). It must be <= atol + rtol * max |logits_A|, and top-1
agreement must reach a floor. Bit-identical weights run by one runtime give exactly 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .inputs import Inputs

# dtype: (atol, rtol, percentile of per-position differences judged, minimum top-1 agreement)
TOLERANCES = {
    "float32": (1e-5, 1e-6, 100, 0.999),
    "float16": (1e-2, 1e-2, 90, 0.95),
    "bfloat16": (5e-2, 5e-2, 90, 0.9),
}
_PRECISION = ["float32", "float16", "bfloat16"]


def lower_precision(a: str, b: str) -> str:
    known = [d for d in (a, b) if d in _PRECISION]
    return max(known, key=_PRECISION.index) if known else "float32"


@dataclass
class Scores:
    loss: float
    top1: float
    tokens: int


@dataclass
class FunctionResult:
    runtime_a: str
    runtime_b: str
    dtype: str
    inputs: str
    sequences: int
    max_abs_diff: float
    judged_diff: float
    max_abs_logit: float
    top1_agreement: float
    a: Scores
    b: Scores
    tolerance: dict

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (self.judged_diff <= t["atol"] + t["rtol"] * self.max_abs_logit
                and self.top1_agreement >= t["min_top1_agreement"])

    def to_json(self) -> dict:
        return asdict(self) | {"equivalent": self.ok}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def sample_scores(logits: np.ndarray, ids: list[int], scored: list[int]) -> tuple[float, int, int]:
    """(summed caption-token loss, correct top-1 predictions, scored tokens) of one sequence."""
    if not scored:
        return 0.0, 0, 0
    pos = np.array(scored)
    labels = np.array(ids)[pos + 1]
    logp = _log_softmax(logits[pos])
    loss = -logp[np.arange(len(pos)), labels].sum()
    correct = int((logits[pos].argmax(-1) == labels).sum())
    return float(loss), correct, len(pos)


def scores(logits_dir: Path, inputs: Inputs, vocab: int) -> Scores:
    """Mean over sequences of each one's mean caption-token loss (the seed's mean of batch means,
    batch size 1), and top-1 accuracy over all scored tokens."""
    losses, correct, total = [], 0, 0
    for i, ids in enumerate(inputs.sequences):
        logits = np.load(logits_dir / f"{i}.npy", allow_pickle=False)[:, :vocab]
        loss, ok, n = sample_scores(logits, ids, inputs.scored[i])
        if n:
            losses.append(loss / n)
        correct += ok
        total += n
    return Scores(float(np.mean(losses)) if losses else float("nan"), correct / total if total else float("nan"), total)


def compare_logits(dir_a: Path, dir_b: Path, inputs: Inputs, vocab: int, dtype: str,
                   runtime_a: str, runtime_b: str) -> FunctionResult:
    per_position, max_logit, agree = [], 0.0, 0
    for i in range(len(inputs.sequences)):
        # LitGPT pads the vocabulary; the padded columns are not the model's
        la = np.load(dir_a / f"{i}.npy", allow_pickle=False)[:, :vocab]
        lb = np.load(dir_b / f"{i}.npy", allow_pickle=False)[:, :vocab]
        per_position.append(np.abs(la.astype(np.float64) - lb).max(axis=-1))
        max_logit = max(max_logit, float(np.abs(la).max()))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
    diffs = np.concatenate(per_position) if per_position else np.zeros(1)
    atol, rtol, percentile, top1 = TOLERANCES[dtype]
    return FunctionResult(runtime_a, runtime_b, dtype, inputs.description, len(inputs.sequences),
                          float(diffs.max()), float(np.percentile(diffs, percentile)), max_logit,
                          agree / len(diffs), scores(dir_a, inputs, vocab), scores(dir_b, inputs, vocab),
                          {"atol": atol, "rtol": rtol, "percentile": percentile, "min_top1_agreement": top1})
