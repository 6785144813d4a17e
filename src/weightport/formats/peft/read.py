"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors` / `.bin`), read
into what a merge needs: per adapted module its A and B tensors and its scale, and the full tensors
the adapter replaces (modules_to_save, trained biases, an embedding saved with added tokens).

Scale per module, as PEFT computes it: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora,
where `rank_pattern` / `alpha_pattern` override r and alpha for modules whose name ends in a key
(a regular expression). The rank is also checked against lora_A's rows, so a config that does
not describe its tensors is refused rather than merged with the wrong scale.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ...errors import WeightportError
from ...hf_config import load_json
from ...adapters import Adapter, Delta
from ...io import TensorSource, open_files

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# lora_A / lora_B of a Linear, with or without the adapter name ("default") that xtuner keeps
_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")
UNSUPPORTED = {"lora_magnitude_vector": "DoRA (use_dora)", "lora_B.bias": "lora_bias",
               "lora_A.bias": "lora_bias"}


def is_peft_adapter(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def _pattern(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


def read_peft(path: Path) -> Adapter:
    cfg_path = path / CONFIG
    cfg = load_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise WeightportError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are merged")
    if cfg.get("use_dora"):
        raise WeightportError(f"{cfg_path}: a DoRA adapter (use_dora); weightport merges plain LoRA only")
    weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise WeightportError(f"{path}: no {' or '.join(WEIGHTS)}")
    source = open_files([weights])
    try:
        return Adapter(path, source, *_parse(cfg, cfg_path, weights, source))
    except BaseException:
        source.close()
        raise


def _parse(cfg: dict, cfg_path: Path, weights: Path,
           source: TensorSource) -> tuple[list[Delta], dict[str, str], dict[str, str]]:
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    pairs: dict[tuple[str, bool], dict[str, str]] = {}
    replaced: dict[str, str] = {}
    unused: dict[str, str] = {}
    for name in source.tensors:
        bad = next((why for k, why in UNSUPPORTED.items() if f".{k}" in name), None)
        if bad:
            raise WeightportError(f"{weights}: tensor {name} belongs to {bad}; weightport merges plain LoRA only")
        own = name.removeprefix(PREFIX)
        m = _LINEAR.match(own) or _EMBEDDING.match(own)
        if m:
            pairs.setdefault((m["module"], m.re is _EMBEDDING), {})[m["ab"]] = name
            continue
        # a full tensor the adapter trained or saved: modules_to_save, a bias, an embedding with added
        # tokens. PEFT may save a module three ways; the trained copy wins, the original is not used.
        if ".original_module." in own:
            unused[name] = "PEFT's copy of the module before training"
            continue
        trained = ".modules_to_save." in own
        own = re.sub(r"\.modules_to_save(\.default)?\.|\.base_layer\.", ".", own)
        if trained and own in replaced:
            unused[replaced[own]] = "superseded by the adapter's trained modules_to_save copy"
        if trained or own not in replaced:
            replaced[own] = name
        else:
            unused[name] = "superseded by the adapter's trained modules_to_save copy"
    deltas = []
    for (module, embedding), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise WeightportError(f"{weights}: {module} has lora_{'embedding_' if embedding else ''}"
                                  f"{'AB'.replace(missing, '')} but no lora_{missing}")
        rank = _pattern(cfg.get("rank_pattern"), module, r)
        stored = source.tensors[ab["A"]].shape[0]
        if stored != rank:
            raise WeightportError(f"{weights}: {ab['A']} has rank {stored}, but {cfg_path.name} gives {module} rank "
                                  f"{rank} (r / rank_pattern); the config does not describe these weights")
        a = _pattern(cfg.get("alpha_pattern"), module, alpha)
        scale = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
        deltas.append(Delta(module, ab["A"], ab["B"], scale, transpose=embedding or fan_in_fan_out))
    if not deltas and not replaced:
        raise WeightportError(f"{weights}: holds no LoRA tensors")
    return deltas, replaced, unused
