"""MindFormers parameter names, one module per MindFormers model family.

Each module declares a NameSet (names, layouts, write order, yaml); the mindspore format adapter
looks the model's architecture up here and does the rest the same way for all of them.
"""

from __future__ import annotations

from ....archs import Model
from ....errors import WeightportError
from . import baichuan, cogvlm2, deepseek_v2, glm, gpt2, internlm, llama, qwen, whisper
from .base import NameSet

NAME_SETS: tuple[NameSet, ...] = (llama.NAMES, glm.NAMES, deepseek_v2.NAMES, gpt2.NAMES, qwen.NAMES, whisper.NAMES,
                                  baichuan.NAMES, internlm.INTERNLM, internlm.INTERNLM2, cogvlm2.NAMES)
BY_ARCH: dict[str, NameSet] = {a: ns for ns in NAME_SETS for a in ns.archs}
ALL_LAYOUTS: dict[str, str] = {k: v for ns in NAME_SETS for k, v in ns.layouts.items()}


def from_yaml(data: dict, where: str) -> tuple[dict, str | None]:
    """A Hugging Face config dict from a MindFormers yaml, and the layout the yaml implies (or None),
    by its arch type, else its model_config type (a yaml with neither is read as MindFormers' Llama):
    Baichuan2's model_config is a LlamaConfig, its arch says Baichuan."""
    try:
        model = data["model"]
        kinds = [(model.get("arch") or {}).get("type"), model["model_config"].get("type") or "LlamaConfig"]
    except (KeyError, TypeError, AttributeError):
        raise WeightportError(f"{where}: no model: model_config: block") from None
    for kind in kinds:
        for ns in NAME_SETS:
            if kind in ns.yaml_types:
                try:
                    return ns.from_yaml(data, where)
                except (KeyError, TypeError) as e:
                    raise WeightportError(f"{where}: missing MindFormers model_config field {e}") from None
    known = ", ".join(t for ns in NAME_SETS for t in ns.yaml_types)
    raise WeightportError(f"{where}: model_config type {kinds[1]!r} is not one weightport reads ({known}); "
                          "put the model's Hugging Face config.json beside the checkpoint")


def names_for(model: Model) -> NameSet:
    ns = BY_ARCH.get(model.arch.name)
    if ns is None:
        raise WeightportError(f"format mindspore does not support {model.arch.name} "
                              f"(supported: {', '.join(BY_ARCH)})")
    return ns


__all__ = ["ALL_LAYOUTS", "from_yaml", "BY_ARCH", "NAME_SETS", "NameSet", "names_for"]
