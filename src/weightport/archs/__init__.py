"""Architectures by name; each is declared once, in Hugging Face terms."""

from __future__ import annotations

from ..errors import WeightportError
from .base import Arch, Dims, Model
from .chatglm import CHATGLM
from .deepseek_v2 import DEEPSEEK_V2
from .gpt2 import GPT2
from .llama_family import ARCHS as _LLAMA_FAMILY

ARCHS: dict[str, Arch] = {a.name: a for a in (*_LLAMA_FAMILY, DEEPSEEK_V2, CHATGLM, GPT2)}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHS.values()}


def model_from_hf_config(config: dict, where: str) -> Model:
    """The Model a Hugging Face config.json describes; `where` names the file for errors."""
    model_type = config.get("model_type")
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise WeightportError(f"{where}: unknown architecture model_type={model_type!r} (supported: {known})")
    try:
        dims = arch.dims(config)
    except (KeyError, TypeError) as e:
        raise WeightportError(f"{where}: config for {arch.name} lacks or mistypes {e}") from None
    return Model(arch, config, dims)


__all__ = ["ARCHS", "Arch", "Dims", "Model", "model_from_hf_config"]
