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
    arch = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
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
    except (ValueError, ZeroDivisionError, AttributeError) as e:
        raise WeightportError(f"{where}: config for {arch.name} has an impossible value ({e})") from None
    _check_sizes(dims, where)
    return Model(arch, config, dims)


def _check_sizes(dims: Dims, where: str) -> None:
    """Every size a positive integer (experts: zero or more), before any shape is computed from it."""
    for name, value in vars(dims).items():
        if name == "tied":
            continue
        least = 0 if name == "n_expert" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise WeightportError(f"{where}: config gives {name} = {value!r}; it must be an integer >= {least}")


__all__ = ["ARCHS", "Arch", "Dims", "Model", "model_from_hf_config"]
