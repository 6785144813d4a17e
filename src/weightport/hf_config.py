"""Reading Hugging Face config.json fields written by transformers 4.x or 5.x.

transformers 5 moved `rope_theta`/`rope_scaling` into one `rope_parameters` dict; checkpoints
on disk carry either form, so every reader goes through these helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from .errors import WeightportError
from .paths import check_regular


def _non_finite_key(data, where: str = "", seen: set | None = None) -> str | None:
    """The dotted key of the first NaN or infinity in parsed JSON or YAML data, or None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else where or "(the top level)"
    if not isinstance(data, (dict, list)):
        return None
    seen = set() if seen is None else seen
    if id(data) in seen:  # a YAML alias back to an enclosing node
        return None
    seen.add(id(data))
    for k, v in (data.items() if isinstance(data, dict) else enumerate(data)):
        found = _non_finite_key(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k),
                                seen)
        if found:
            return found
    return None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def load_json(path: Path) -> dict:
    """A JSON object from a regular file. NaN and infinities (which Python's json reads but JSON does
    not have) are refused naming their key: no model setting is meant to be one. So is a key given
    twice, which readers resolve differently (Python keeps the last)."""
    check_regular(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise WeightportError(f"{path}: key {e.args[0]!r} is given twice; refused") from None
    except FileNotFoundError:
        raise WeightportError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightportError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise WeightportError(f"{path}: not valid JSON (nested too deep)") from None
    except OSError as e:
        raise WeightportError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise WeightportError(f"{path}: expected a JSON object")
    _refuse_non_finite(path, data)
    return data


def _refuse_non_finite(path: Path, data) -> None:
    try:
        key = _non_finite_key(data)
    except RecursionError:
        raise WeightportError(f"{path}: nested too deep") from None
    if key:
        raise WeightportError(f"{path}: {key} is not a finite number (NaN or infinity); refused")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a mapping that gives a key twice (PyYAML keeps the last; YAML says keys are
    unique). Keys a `<<` merge brings in may still be overridden, as YAML means them to be."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        raise _DuplicateKey(key)
                    seen.add(key)
                except TypeError:  # an unhashable key: the constructor says so
                    pass
        return super().construct_mapping(node, deep)


def load_yaml(path: Path, what: str = "YAML"):
    """A YAML file's data (safe_load: plain types only); bad or hostile text is one WeightportError,
    and so is a key given twice or a NaN or infinity (as in JSON configs)."""
    check_regular(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as e:
        raise WeightportError(f"{path}: key {e.args[0]!r} is given twice; refused") from None
    except FileNotFoundError:
        raise WeightportError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        raise WeightportError(f"{path}: not valid {what} ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise WeightportError(f"{path}: not valid {what} (not UTF-8: {e.reason})") from None
    except RecursionError:
        raise WeightportError(f"{path}: not valid {what} (nested too deep)") from None
    except OSError as e:
        raise WeightportError(f"{path}: cannot read ({e.strerror or e})") from None
    _refuse_non_finite(path, data)
    return data


def rope_theta(cfg: dict, default: float = 10000.0) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", default)))


def rope_scaling(cfg: dict) -> dict | None:
    """The scaling dict ({'rope_type': 'llama3', 'factor': ...}) or None for plain rotary."""
    params = cfg.get("rope_parameters")
    if params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return None
        return {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return None
    scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return scaling


def partial_rotary_factor(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))


def set_rope(cfg: dict, theta: float, scaling: dict | None) -> None:
    """Write rotary settings in both spellings, so transformers 4.x and 5.x read the same."""
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = dict(scaling) if scaling else None
    params = {"rope_theta": theta, "rope_type": "default"}
    if scaling:
        params.update(scaling)
    cfg["rope_parameters"] = params


def vision_tower_config(path: Path, family: str, what: str) -> dict:
    """The vision config in a `family` checkpoint's config.json: a `{family}_vision_model` one, or
    the `vision_config` of a whole `{family}` (image-text) model. `what` names the family in errors."""
    cfg = load_json(path)
    kind = cfg.get("model_type")
    if kind == family:
        cfg = cfg.get("vision_config") or {}
    elif kind != f"{family}_vision_model":
        raise WeightportError(f"{path}: model_type {kind!r} is not a {what} checkpoint (expected {family} or "
                              f"{family}_vision_model)")
    return cfg


def rope_parameters(cfg: dict) -> dict:
    """The rotary settings of a config.json in transformers 5.x's shape (`rope_parameters`), from
    either generation (4.x: `rope_scaling` and a top-level `rope_theta`)."""
    rope = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):
        rope.update(cfg["rope_scaling"])
    if "rope_theta" in cfg:
        rope.setdefault("rope_theta", cfg["rope_theta"])
    return rope
