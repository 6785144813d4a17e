"""`weightport verify`: prove two checkpoints are the same model, from tensors to logits.

Three levels, each streaming or one model at a time: config settings, every hub tensor
(bit-exact or exact after the documented cast), and the function (logits and caption loss,
within a per-dtype tolerance), optionally with B run in its own framework.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..dtypes import short_name
from ..errors import WeightportError
from ..paths import REPORT_TOOL
from .configs import compare_configs
from .function import FunctionResult, Scores, lower_precision, scores
from .tensors import TensorReport, compare_checkpoints

DEFAULT_SAMPLES = 32


@dataclass
class Side:
    path: str
    format: str
    arch: str
    dtype: str

    def label(self) -> str:
        return f"{self.path}  [{self.format}, {self.arch}, {self.dtype}]"


@dataclass
class VerifyReport:
    a: Side
    b: Side
    config: list[dict]
    tensors: TensorReport
    function: FunctionResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return not self.config and self.tensors.ok and (self.function is None or self.function.ok)

    @property
    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "NOT equivalent"

    def to_json(self) -> dict:
        return {
            "verdict": "equivalent" if self.equivalent else "not equivalent",
            "a": vars(self.a), "b": vars(self.b),
            "config_differences": self.config,
            "tensors": {"counts": self.tensors.counts(), "items": [r.to_json() for r in self.tensors.results]},
            "function": self.function.to_json() if self.function else None,
            "notes": self.notes,
        }

    def render(self, all_tensors: bool = False, limit: int = 25) -> str:
        lines = [f"A: {self.a.label()}", f"B: {self.b.label()}", ""]
        lines.append("config:   " + ("same settings" if not self.config else f"{len(self.config)} difference(s)"))
        for d in self.config:
            lines.append(f"  {d['key']}: A {d['a']!r}, B {d['b']!r}")
        counts = self.tensors.counts()
        lines.append("tensors:  " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        shown = [r for r in self.tensors.results if all_tensors or not r.ok]
        width = max((len(r.name) for r in shown[:limit]), default=0)
        for r in shown[:limit]:
            via = f"  (B: {', '.join(r.b_source)})" if r.b_source and not r.ok else ""
            lines.append(f"  {r.status:10} {r.name:{width}}  {r.describe()}{via}")
        if len(shown) > limit:
            lines.append(f"  ... and {len(shown) - limit} more (see the JSON report)")
        f = self.function
        if f:
            tol = f.tolerance
            lines += [
                f"function: {f.sequences} sequences, {f.inputs}",
                f"  runtimes         A: {f.runtime_a}, B: {f.runtime_b}",
                f"  max |logit diff| {f.max_abs_diff:.3g}" + (
                    "" if tol["percentile"] == 100 else f", {tol['percentile']}th percentile over positions "
                                                        f"{f.judged_diff:.3g}"),
                f"  tolerance        {tol['atol']:g} + {tol['rtol']:g} x max|logit| {f.max_abs_logit:.3g} "
                f"= {tol['atol'] + tol['rtol'] * f.max_abs_logit:.3g}  ({f.dtype})",
                f"  top-1 agreement  {f.top1_agreement:.4f}  (at least {tol['min_top1_agreement']:g})",
                f"  loss             A {f.a.loss:.6f}, B {f.b.loss:.6f}  (mean over sequences, scored tokens)",
                f"  top-1 accuracy   A {f.a.top1:.4f}, B {f.b.top1:.4f}  ({f.a.tokens} scored tokens)",
            ]
        lines += [f"note:     {n}" for n in self.notes]
        lines.append(f"verdict:  {self.verdict}")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        write_json(path, self.to_json())


def write_json(path: str | Path, data) -> None:
    """Strict JSON: inf and nan (an infinite relative error, a loss with no scored token) as strings."""
    def strict(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    data = {"tool": REPORT_TOOL, **data} if isinstance(data, dict) else data
    Path(path).write_text(json.dumps(strict(data), indent=2, default=str, allow_nan=False) + "\n")


def _dtype_of(ckpt) -> str:
    counts = Counter()
    for m in ckpt.source.tensors.values():
        if m.dtype.is_floating_point:
            counts[m.dtype] += m.nbytes
    return short_name(counts.most_common(1)[0][0]) if counts else "float32"


def _side(path: Path, ckpt) -> Side:
    return Side(str(path), ckpt.format.name, ckpt.model.arch.name, _dtype_of(ckpt))


def verify(a: str | Path, b: str | Path, *, format_a: str | None = None, format_b: str | None = None,
           data: str | Path | None = None, samples: int = DEFAULT_SAMPLES, runtime: str | None = None,
           runtime_python: str | None = None, tokenizer: str | Path | None = None, tensors_only: bool = False,
           progress: bool = False) -> VerifyReport:
    """Compare checkpoint B with checkpoint A (B is taken to be the conversion of A)."""
    from ..api import open_checkpoint
    from .runtimes import PLANNED_RUNTIMES, RUNTIMES, transformers_available

    if runtime in PLANNED_RUNTIMES:
        raise WeightportError(f"--runtime {runtime}: weightport cannot write the {PLANNED_RUNTIMES[runtime]} "
                              "format yet, so it has no such checkpoint to run")
    if runtime is not None and runtime not in RUNTIMES:
        raise WeightportError(f"--runtime {runtime}: unknown; choose one of {', '.join(RUNTIMES)}")
    a, b = Path(a), Path(b)
    ckpt_a = open_checkpoint(a, format_a)
    try:
        ckpt_b = open_checkpoint(b, format_b)
    except BaseException:
        ckpt_a.close()
        raise
    try:
        if runtime == "litgpt" and ckpt_b.format.name != "litgpt":
            raise WeightportError(f"--runtime litgpt runs B in LitGPT, but {b} is a {ckpt_b.format.name} checkpoint")
        side_a, side_b = _side(a, ckpt_a), _side(b, ckpt_b)
        config = compare_configs(ckpt_a.model, ckpt_b.model)
        total = sum(m.nbytes for c in (ckpt_a, ckpt_b) for m in c.source.tensors.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="comparing tensors", disable=not progress,
                  leave=False, dynamic_ncols=True) as bar:
            tensors = compare_checkpoints(ckpt_a, ckpt_b, progress=bar.update)
        vocab = min(ckpt_a.model.dims.vocab, ckpt_b.model.dims.vocab)
        arch = ckpt_a.model.arch
    finally:
        ckpt_a.close()
        ckpt_b.close()
    report = VerifyReport(side_a, side_b, config, tensors)
    if tensors_only:
        return report
    if not transformers_available():
        report.notes.append("function level not run: transformers is not installed (pip install transformers)")
        return report
    import transformers

    if not arch.causal_lm or getattr(transformers, arch.hf_class, None) is None:
        why = "is not a causal LM taking token ids" if arch.causal_lm is False else "is not part of transformers"
        report.notes.append(f"function level not run: {arch.hf_class} {why}")
        return report
    try:
        report.function = _run_function_level(report, a, b, data, samples, runtime or "transformers",
                                              runtime_python, tokenizer, vocab)
    except WeightportError as e:
        if runtime:  # asked for explicitly: its failure is the answer
            raise
        report.notes.append(f"function level not run: {e}")
    return report


def _hub_dir(path: Path, side: Side, work: Path, name: str) -> Path:
    """A directory transformers can load: the checkpoint itself, or its conversion to hf."""
    if side.format == "hf":
        return path
    from ..api import convert

    out = work / name
    convert(path, out, "hf", source_format=side.format)
    return out


def _inputs(a: Path, b: Path, data, samples: int, tokenizer, vocab: int):
    from .inputs import caption_inputs, find_tokenizer, random_inputs

    tok_dir = Path(tokenizer) if tokenizer else find_tokenizer(a, b)
    if tok_dir is None:
        if data is not None:
            raise WeightportError(f"--data {data}: captions need a tokenizer, and neither checkpoint has one; "
                                  "pass --tokenizer DIR")
        return random_inputs(vocab, samples)
    return caption_inputs(tok_dir, data, samples, vocab)


def _run_function_level(report: VerifyReport, a: Path, b: Path, data, samples, runtime, runtime_python,
                        tokenizer, vocab) -> FunctionResult:
    from .function import compare_logits
    from ..formats.litgpt.runtime import litgpt_python, run_litgpt
    from .runtimes import run_transformers

    inputs = _inputs(a, b, data, samples, tokenizer, vocab)
    python = litgpt_python(runtime_python) if runtime == "litgpt" else None
    with tempfile.TemporaryDirectory(prefix="weightport-verify-") as tmp:
        work = Path(tmp)
        run_transformers(_hub_dir(a, report.a, work, "a-hf"), inputs, work / "logits-a")
        if runtime == "litgpt":
            run_litgpt(b if b.is_dir() else b.parent, inputs.sequences, work / "logits-b", python)
        else:
            run_transformers(_hub_dir(b, report.b, work, "b-hf"), inputs, work / "logits-b")
        return compare_logits(work / "logits-a", work / "logits-b", inputs, vocab,
                              lower_precision(report.a.dtype, report.b.dtype), "transformers", runtime)


@dataclass
class CaptionEval:
    path: str
    format: str
    inputs: str
    scores: Scores

    def render(self) -> str:
        return (f"model:    {self.path}  [{self.format}]\ninputs:   {self.inputs}\n"
                f"loss:     {self.scores.loss:.6f}  (mean over captions of the mean caption-token loss)\n"
                f"top-1:    {self.scores.top1:.4f}  over {self.scores.tokens} caption tokens")


def eval_captions(model: str | Path, *, source_format: str | None = None, data: str | Path | None = None,
                  samples: int = 100, tokenizer: str | Path | None = None) -> CaptionEval:
    """Loss and top-1 accuracy on caption tokens only, for a checkpoint in any supported format."""
    from ..api import open_checkpoint
    from .inputs import caption_inputs, find_tokenizer
    from .runtimes import run_transformers, transformers_available

    if not transformers_available():
        raise WeightportError("eval-captions runs the model in transformers: pip install transformers")
    model = Path(model)
    ckpt = open_checkpoint(model, source_format)
    side, vocab = _side(model, ckpt), ckpt.model.dims.vocab
    ckpt.close()
    tok_dir = Path(tokenizer) if tokenizer else find_tokenizer(model)
    if tok_dir is None:
        raise WeightportError(f"{model}: has no tokenizer files; pass --tokenizer DIR")
    inputs = caption_inputs(tok_dir, data, samples, vocab)
    with tempfile.TemporaryDirectory(prefix="weightport-eval-") as tmp:
        work = Path(tmp)
        run_transformers(_hub_dir(model, side, work, "hf"), inputs, work / "logits")
        return CaptionEval(str(model), side.format, inputs.description, scores(work / "logits", inputs, vocab))
