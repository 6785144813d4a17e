"""Merging a LoRA adapter into a checkpoint while converting (`--merge-lora`), one tensor at a time.
An `Adapter` is what a format's adapter reader (formats/peft, formats/litgpt) gives: per adapted
module its A and B tensors and scale, and the tensors it replaces whole; this module names no format.

The adapter becomes a second part of the source: every adapted weight is read through its format's
own rule and MergeLora adds scale * (B @ A) in float32; tensors the adapter replaces whole
(modules_to_save, trained biases, an embedding saved with added tokens) are read from the adapter
instead. Nothing else changes, so the plan, its coverage checks and the writers are those of a plain
conversion, and peak memory stays one weight plus its two small LoRA matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .archs import model_from_hf_config
from .errors import WeightportError
from .format import Checkpoint
from .io.parts import PartsSource
from .ops import Identity, MergeLora
from .io import TensorSource
from .rules import Rule

LORA = "lora/"


@dataclass(frozen=True)
class Delta:
    """W <- W + scale * (B @ A) for the weight of `module` (transposed for embeddings and
    fan_in_fan_out weights)."""

    module: str
    a: str
    b: str
    scale: float
    transpose: bool


@dataclass
class Adapter:
    path: Path
    source: TensorSource
    deltas: list[Delta]
    # hub tensor name -> the adapter's full tensor that replaces it
    replaced: dict[str, str] = field(default_factory=dict)
    # adapter tensors a merge does not use, with why
    unused: dict[str, str] = field(default_factory=dict)


def merge(ckpt: Checkpoint, adapter: Adapter, lora_scale: float = 1.0,
          prefix: str | Callable[[str], str] = "") -> Checkpoint:
    """`ckpt` with `adapter` merged into it, scaled by `lora_scale` on top of the adapter's own
    alpha / r. `prefix`: where the adapted model sits among the hub names (an xtuner LLaVA's LLM
    adapter adapts `language_model.`), or a function giving it per module name. The adapter's
    files are closed if the merge is refused."""
    try:
        return _merge(ckpt, adapter, lora_scale, prefix)
    except BaseException:
        adapter.source.close()
        raise


def _merge(ckpt: Checkpoint, adapter: Adapter, lora_scale: float, prefix: str | Callable[[str], str] = "") -> Checkpoint:
    place = prefix if callable(prefix) else (lambda module: prefix + module)
    model = ckpt.model
    where = adapter.path
    hub = model.hub_tensors()
    shapes = adapter.source.tensors
    # an adapter that resized the vocabulary (added tokens) brings the new embedding / lm_head
    replaced = {place(h): s for h, s in adapter.replaced.items()}
    vocab = {shapes[s].shape[0] for h, s in adapter.replaced.items()
             if h in ("model.embed_tokens.weight", "lm_head.weight")}
    if vocab and place("") != "":
        raise WeightportError(f"{where}: the adapter resizes the vocabulary of a part of {model.arch.name}; "
                              "merge it into the language model alone first")
    if vocab and vocab != {model.dims.vocab}:
        if len(vocab) > 1 or (not model.dims.tied and not {"model.embed_tokens.weight", "lm_head.weight"}
                              <= adapter.replaced.keys()):
            raise WeightportError(f"{where}: the adapter resizes the vocabulary to {sorted(vocab)} rows but does not "
                                  "carry both embed_tokens and lm_head at that size")
        model = model_from_hf_config(dict(model.config, vocab_size=vocab.pop()), f"{ckpt.path} + {where}")
        hub = model.hub_tensors()
    by_hub = {h: r for r in ckpt.rules for h in r.hub}
    rules: dict[str, Rule] = {}
    for h, stored in replaced.items():
        if h not in hub:
            raise WeightportError(f"{where}: the adapter carries {stored}, but the base model has no {h} "
                                  "(an adapter for another base model?)")
        rules[h] = Rule(h, LORA + stored)
    notes = []
    for d in adapter.deltas:
        h = place(f"{d.module}.weight")
        if h not in hub:
            raise WeightportError(f"{where}: the adapter targets {d.module}, which the base model does not have "
                                  "(an adapter for another base model?)")
        a, b = shapes[d.a].shape, shapes[d.b].shape
        delta = (a[1], b[0]) if d.transpose else (b[0], a[1])
        if delta != tuple(hub[h]) or a[0] != b[1]:
            raise WeightportError(f"{where}: LoRA of {d.module} is B {list(b)} @ A {list(a)}, which does not fit its "
                                  f"weight {list(hub[h])} (an adapter for another base model?)")
        if h in rules:
            base, inner = rules[h].fmt, Identity()
        else:
            rule = by_hub[h]
            if len(rule.hub) != 1:
                raise WeightportError(f"{ckpt.path}: {h} is stored fused with {', '.join(x for x in rule.hub if x != h)}"
                                      "; convert the base to hf first, then merge")
            base, inner = rule.fmt, rule.op
        rules[h] = Rule(h, (*base, LORA + d.a, LORA + d.b),
                        MergeLora(d.scale * lora_scale, inner, len(base), d.transpose))
    partial = next((r for r in ckpt.rules if set(r.hub) & rules.keys() and set(r.hub) - rules.keys()), None)
    if partial is not None:
        raise WeightportError(f"{ckpt.path}: the adapter changes {', '.join(sorted(set(partial.hub) & rules.keys()))}, "
                              f"which the format stores together with {', '.join(sorted(set(partial.hub) - rules.keys()))}"
                              "; convert the base to hf first, then merge")
    kept = [r for r in ckpt.rules if not set(r.hub) & rules.keys()]
    source = PartsSource({"": ckpt.source, LORA: adapter.source}, {})
    unread = {f for r in ckpt.rules if set(r.hub) & rules.keys() for f in r.fmt} - \
             {f for r in list(rules.values()) + kept for f in r.fmt}
    source.hide(unread)
    notes.append(f"LoRA from {where}: {len(adapter.deltas)} weights merged (W + scale * B @ A in float32)"
                 + (f", {len(adapter.replaced)} replaced by the adapter's own" if adapter.replaced else "")
                 + (f", scale x{lora_scale:g}" if lora_scale != 1.0 else ""))
    dropped = dict(ckpt.dropped, **{LORA + n: why for n, why in adapter.unused.items()})
    return replace(ckpt, model=model, source=source, rules=kept + list(rules.values()),
                   notes=ckpt.notes + notes, dropped=dropped)
