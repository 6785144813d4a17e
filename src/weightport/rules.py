"""Rules: which hub tensors a format stores under which names, through which op.

A rule is data: hub name templates, format name templates and one reversible op. Templates
use `{l}` for the layer and `{e}` for the expert index. Applying a rule forward goes
hub -> format; applying it backward goes format -> hub. Optional tensors (biases, a separate
lm_head) need no special casing: a rule whose hub tensors the model does not have is dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .ops import Identity, Op


@dataclass(frozen=True)
class Rule:
    hub: tuple[str, ...]
    fmt: tuple[str, ...]
    op: Op = Identity()

    def __post_init__(self):
        object.__setattr__(self, "hub", _tuple(self.hub))
        object.__setattr__(self, "fmt", _tuple(self.fmt))


def _tuple(x) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


def rename(hub: str, fmt: str) -> Rule:
    return Rule(hub, fmt)


def renames(pairs: dict[str, str]) -> list[Rule]:
    return [Rule(h, f) for h, f in pairs.items()]


def expand(rules: list[Rule], n_layer: int, n_expert: int, hub_names: set[str]) -> list[Rule]:
    """Instantiate templates for every layer/expert, keeping rules whose hub tensors exist.

    A rule with only some of its hub tensors present is a mismatch between an architecture
    and a format declaration, so it raises instead of silently dropping data.
    """
    out = []
    for rule in rules:
        text = " ".join(rule.hub + rule.fmt)
        layers = range(n_layer) if "{l}" in text else [None]
        experts = range(n_expert) if "{e}" in text else [None]
        for l, e in itertools.product(layers, experts):
            sub = {"l": l, "e": e}
            hub = tuple(_fill(t, sub) for t in rule.hub)
            present = [h in hub_names for h in hub]
            if not any(present):
                continue
            if not all(present):
                missing = [h for h, p in zip(hub, present) if not p]
                raise ValueError(f"rule {rule.hub} -> {rule.fmt}: model lacks {missing}")
            out.append(Rule(hub, tuple(_fill(t, sub) for t in rule.fmt), rule.op))
    return out


def _fill(template: str, sub: dict) -> str:
    return template.format(**{k: v for k, v in sub.items() if v is not None})


def identity_rules(hub_names: list[str]) -> list[Rule]:
    return [Rule(n, n) for n in hub_names]
