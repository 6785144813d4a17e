"""Architectures by name; each is declared once, in Hugging Face terms."""

from __future__ import annotations

from ..errors import WeightportError
from .base import Arch, Dims, Model
from .baichuan import BAICHUAN
from .chatglm import CHATGLM
from .cogvlm2 import ARCHS as _COGVLM2
from .deepseek_v2 import DEEPSEEK_V2
from .gpt2 import GPT2
from .idefics3 import IDEFICS3
from .internlm import INTERNLM, INTERNLM2
from .llava import LLAVA
from .llama_family import ARCHS as _LLAMA_FAMILY
from .qwen import QWEN
from .whisper import WHISPER

ARCHS: dict[str, Arch] = {a.name: a for a in (*_LLAMA_FAMILY, DEEPSEEK_V2, CHATGLM, GPT2, QWEN, WHISPER, BAICHUAN,
                                              INTERNLM, INTERNLM2, *_COGVLM2, IDEFICS3, LLAVA)}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHS.values()}


def model_from_hf_config(config: dict, where: str) -> Model:
    """The Model a Hugging Face config.json describes; `where` names the file for errors."""
    model_type = config.get("model_type")
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is None and model_type is None:
        # some remote-code configs (CogVLM2's) carry no model_type; their class names are unique
        by_class = [a for a in ARCHS.values() if a.hf_class in (config.get("architectures") or [])]
        arch = by_class[0] if len(by_class) == 1 else None
    if arch is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise WeightportError(f"{where}: unknown architecture model_type={model_type!r} (supported: {known})")
    try:
        dims = arch.dims(config)
    except (KeyError, TypeError) as e:
        raise WeightportError(f"{where}: config for {arch.name} lacks or mistypes {e}") from None
    except WeightportError as e:
        raise WeightportError(f"{where}: {e}") from None
    return Model(arch, config, dims)


__all__ = ["ARCHS", "Arch", "Dims", "Model", "model_from_hf_config"]
