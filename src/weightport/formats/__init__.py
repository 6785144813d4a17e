"""Format adapters by name, and detection of a path's format."""

from __future__ import annotations

from pathlib import Path

from ..adapters import Adapter
from ..archs import Model
from ..errors import WeightportError
from ..format import Format
from . import hf, litgpt, mindspore, nanotron, onnx, peft
from .llava import llava_hf, xtuner_llava, xtuner_pth
from .llava import official as llava_official

FORMATS: dict[str, Format] = {f.name: f for f in (hf.FORMAT, litgpt.FORMAT, mindspore.FORMAT, nanotron.FORMAT,
                                                  xtuner_llava.FORMAT, llava_official.FORMAT, llava_hf.FORMAT,
                                                  xtuner_pth.FORMAT, onnx.FORMAT)}
# detection takes the first that claims a path: the LLaVA layouts before the plain hf they contain
_DETECTION_ORDER = ("onnx", "xtuner", "xtuner-llava", "llava", "llava-hf", "hf", "litgpt", "mindspore", "nanotron")


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise WeightportError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


def detect(path: Path) -> Format:
    if not path.exists():
        raise WeightportError(f"{path}: no such file or directory")
    found = [FORMATS[n] for n in _DETECTION_ORDER if FORMATS[n].detect(path)]
    if not found:
        raise WeightportError(f"{path}: not a checkpoint in any known format ({', '.join(FORMATS)}); "
                              "pass --from to say which it is")
    return found[0]


def read_adapter(path: Path, base: Model) -> Adapter:
    """The LoRA adapter at `path` (--merge-lora), read by the format it is in."""
    if not path.exists():
        raise WeightportError(f"{path}: no such file or directory (--merge-lora)")
    if peft.read.is_peft_adapter(path):
        return peft.read.read_peft(path)
    if litgpt.lora.is_litgpt_lora(path):
        return litgpt.lora.read_litgpt(path, base)
    raise WeightportError(f"{path}: not a LoRA adapter weightport reads (a PEFT directory with adapter_config.json, "
                          "or LitGPT's lit_model.pth.lora with hyperparameters.yaml)")


__all__ = ["FORMATS", "detect", "get", "read_adapter"]
