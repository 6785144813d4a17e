"""MindFormers parameter names, one module per MindFormers model family.

Each module declares a NameSet (names, layouts, write order, yaml); the mindspore format adapter
looks the model's architecture up here and does the rest the same way for all of them.
"""

from __future__ import annotations

from ...archs import Model
from ...errors import WeightportError
from . import llama
from .base import NameSet

NAME_SETS: tuple[NameSet, ...] = (llama.NAMES,)
BY_ARCH: dict[str, NameSet] = {a: ns for ns in NAME_SETS for a in ns.archs}
ALL_LAYOUTS: dict[str, str] = {k: v for ns in NAME_SETS for k, v in ns.layouts.items()}


def names_for(model: Model) -> NameSet:
    ns = BY_ARCH.get(model.arch.name)
    if ns is None:
        raise WeightportError(f"format mindspore does not support {model.arch.name} "
                              f"(supported: {', '.join(BY_ARCH)})")
    return ns


__all__ = ["ALL_LAYOUTS", "BY_ARCH", "NAME_SETS", "NameSet", "names_for"]
