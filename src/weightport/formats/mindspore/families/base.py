"""What one MindFormers model family declares: its parameter names and layouts, as rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ....archs import Model
from ....errors import WeightportError
from ....rules import Rule


# compute_dtype / param_init_type in MindFormers yamls
MS_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class NameSet:
    """MindFormers' names for one or more Hugging Face architectures.

    `rules(model, layout, stored)` gives the expanded hub -> MindFormers rules; `stored` is the set
    of names in the file on read (some tensors are optional, e.g. a tied lm_head) and None on
    write. Layouts are tensor arrangements with the same names or not; the first is written by
    default, and `read_preference` orders the ones whose names are identical (a file cannot say).
    """

    title: str
    archs: tuple[str, ...]
    # MindFormers convert_weight.py --model keys this name set serves
    keys: tuple[str, ...]
    layouts: dict[str, str]
    rules: Callable[[Model, str, "set[str] | None"], list[Rule]]
    # sort key of a stored name in a layout: the order MindFormers' converter writes, so files can match
    write_order: Callable[[str, str], tuple]
    check: Callable[[Model], None]
    to_yaml: Callable[[Model, torch.dtype, str], dict]
    read_preference: tuple[str, ...] = ()
    # a --model key that accepts only some of `archs` (MindFormers' `qwen2` is not for Llama files)
    key_archs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # MindFormers yaml model_config types this name set reads, and how: (config.json dict, layout or None)
    yaml_types: tuple[str, ...] = ()
    from_yaml: "Callable[[dict, str], tuple[dict, str | None]] | None" = None

    def layouts_matching(self, model: Model, stored: dict[str, tuple[int, ...]]) -> list[str]:
        """Layouts whose every tensor is stored, with its shape, most preferred first."""
        order = list(self.read_preference) + [l for l in self.layouts if l not in self.read_preference]
        hub = model.hub_tensors()
        return [l for l in order if _fits(self, model, l, hub, stored)]


def _fits(names: NameSet, model: Model, layout: str, hub: dict, stored: dict) -> bool:
    try:
        for rule in names.rules(model, layout, set(stored)):
            shapes = rule.op.forward_shapes([hub[h] for h in rule.hub])
            if any(stored.get(n) != tuple(s) for n, s in zip(rule.fmt, shapes)):
                return False
    except (ValueError, WeightportError):
        return False
    return True
