"""LitGPT checkpoints: `lit_model.pth` + `model_config.yaml` (and the legacy lit-gpt layout).

Current LitGPT (>= 0.5.5) fuses q/k/v as plain concatenation under `attn.qkv`; lit-gpt
<= 0.5.4 stored them interleaved per query group under `attn.attn`. The key name is the only
reliable way to tell them apart (for MHA the shapes are identical), so detection uses it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ...archs import Model, model_from_hf_config
from ...archs.llama_family import NAMES as LLAMA_FAMILY
from ...errors import WeightportError
from ...hf_config import load_json, load_yaml
from ...io import open_files
from ...io.torch_file import TorchZipWriter
from ...ops import Chain, Concat, GroupInterleave, Identity, Split, Tie
from ...rules import Rule, expand, rename
from ...format import Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions
from ..common import find_side_files, write_hf_sidecar
from .config import LEGACY_KEYS, to_hf, to_litgpt

WEIGHTS = "lit_model.pth"
CONFIG = "model_config.yaml"
LEGACY_CONFIG = "lit_config.json"

L, T = "model.layers.{l}", "transformer.h.{l}"


def litgpt_rules(model: Model, legacy: bool = False) -> list[Rule]:
    """hub -> LitGPT rules for a Llama-family model (expanded for its layers and experts)."""
    d = model.dims
    qkv_sizes = (d.q_rows, d.kv_rows, d.kv_rows)
    fuse = Concat(qkv_sizes)
    fused_name = f"{T}.attn.qkv"
    if legacy:
        fuse = Chain((fuse, GroupInterleave(qkv_sizes, d.n_kv)))
        fused_name = f"{T}.attn.attn"
    rules = [
        Rule("model.embed_tokens.weight", ("transformer.wte.weight", "lm_head.weight"), Tie())
        if d.tied else rename("model.embed_tokens.weight", "transformer.wte.weight"),
        rename("lm_head.weight", "lm_head.weight"),
        rename("model.norm.weight", "transformer.ln_f.weight"),
        rename(f"{L}.input_layernorm.weight", f"{T}.norm_1.weight"),
        rename(f"{L}.post_attention_layernorm.weight", f"{T}.norm_2.weight"),
        Rule([f"{L}.self_attn.{p}_proj.weight" for p in "qkv"], f"{fused_name}.weight", fuse),
        Rule([f"{L}.self_attn.{p}_proj.bias" for p in "qkv"], f"{fused_name}.bias", fuse),
        # Phi-3 is already fused as q|k|v in Hugging Face
        Rule(f"{L}.self_attn.qkv_proj.weight", f"{fused_name}.weight",
             GroupInterleave(qkv_sizes, d.n_kv) if legacy else Identity()),
        rename(f"{L}.self_attn.o_proj.weight", f"{T}.attn.proj.weight"),
        rename(f"{L}.self_attn.o_proj.bias", f"{T}.attn.proj.bias"),
        Rule(f"{L}.mlp.gate_up_proj.weight", (f"{T}.mlp.fc_1.weight", f"{T}.mlp.fc_2.weight"),
             Split((d.intermediate, d.intermediate))),
        rename(f"{L}.block_sparse_moe.gate.weight", f"{T}.mlp.gate.weight"),
    ]
    for hf, lit in (("gate", "fc_1"), ("up", "fc_2"), ("down", "proj")):
        rules += [rename(f"{L}.mlp.{hf}_proj.weight", f"{T}.mlp.{lit}.weight"),
                  rename(f"{L}.mlp.{hf}_proj.bias", f"{T}.mlp.{lit}.bias")]
    for hf, lit in (("w1", "fc_1"), ("w3", "fc_2"), ("w2", "proj")):
        rules.append(rename(f"{L}.block_sparse_moe.experts.{{e}}.{hf}.weight", f"{T}.mlp.experts.{{e}}.{lit}.weight"))
    return expand(rules, d.n_layer, d.n_expert, set(model.hub_tensors()))


def _find(path: Path) -> tuple[Path, Path]:
    """(weights file, config file) for a LitGPT directory or a .pth file inside one."""
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / WEIGHTS
    for name in (CONFIG, LEGACY_CONFIG):
        if (directory / name).is_file():
            return weights, directory / name
    raise WeightportError(f"{directory}: no {CONFIG} (or legacy {LEGACY_CONFIG}) next to the weights")


def _read_litgpt_config(path: Path) -> dict:
    data = load_json(path) if path.suffix == ".json" else load_yaml(path)
    if not isinstance(data, dict):
        raise WeightportError(f"{path}: expected a mapping of LitGPT config fields")
    data = {LEGACY_KEYS.get(k, k): v for k, v in data.items()}
    if "org" in data and "hf_config" not in data:  # oldest lit-gpt configs
        data["hf_config"] = {"org": data.pop("org"), "name": data.get("name", "")}
    return data


def _same_dims(a: Model, b: Model) -> bool:
    return a.arch is b.arch and a.dims == b.dims


class LitGPTFormat(Format):
    name = "litgpt"
    title = "LitGPT (lit_model.pth + model_config.yaml; reads legacy lit-gpt interleaved qkv)"
    archs = LLAMA_FAMILY

    def detect(self, path: Path) -> bool:
        directory = path if path.is_dir() else path.parent
        return (directory / WEIGHTS).is_file() or (path.is_file() and path.suffix == ".pth"
                                                   and ((directory / CONFIG).is_file() or (directory / LEGACY_CONFIG).is_file()))

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        weights, config_path = _find(path)
        if not weights.is_file():
            raise WeightportError(f"{weights}: not found")
        lit = _read_litgpt_config(config_path)
        source = open_files([weights])
        try:
            names = source.tensors
            legacy = any(n.endswith(".attn.attn.weight") for n in names)
            tied = _stored_tied(source)
            generation_path = config_path.parent / "generation_config.json"
            generation = load_json(generation_path) if generation_path.is_file() else None
            try:
                hf = to_hf(lit, tied, generation)
            except KeyError as e:
                raise WeightportError(f"{config_path}: missing field {e}") from None
            model = model_from_hf_config(hf, str(config_path))
            notes = []
            # LitGPT keeps the original config.json next to its weights; it carries ids and
            # settings LitGPT has no field for, so it wins when it describes the same network
            sidecar = config_path.parent / "config.json"
            if sidecar.is_file():
                original = model_from_hf_config(load_json(sidecar), str(sidecar))
                if _same_dims(original, model):
                    model = original
                    notes.append(f"config from {sidecar.name} (matches {config_path.name})")
                else:
                    notes.append(f"ignored {sidecar.name}: it describes a different network than {config_path.name}")
            return Checkpoint(
                path=path, format=self, variant="legacy lit-gpt (interleaved attn.attn)" if legacy else "lit_model.pth",
                model=model, source=source, rules=litgpt_rules(model, legacy),
                side_files=find_side_files(config_path.parent),
                generation_config=generation, notes=notes)
        except BaseException:
            source.close()
            raise

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        return litgpt_rules(model)

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        return [OutputFile(WEIGHTS, tensors)]

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        return _LitWriter(directory / WEIGHTS)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        lit = to_litgpt(model)
        with open(directory / CONFIG, "w", encoding="utf-8") as f:
            yaml.safe_dump(lit, f)
        return [CONFIG] + write_hf_sidecar(directory, source, model)


def _stored_tied(source) -> bool:
    """Whether lm_head is the embedding: absent, or saved as the same storage."""
    if "lm_head.weight" not in source.tensors:
        return True
    return source.shares_storage("lm_head.weight", "transformer.wte.weight")


class _LitWriter(Writer):
    def __init__(self, path: Path):
        self._zip = TorchZipWriter(path)

    def write_group(self, names, tensors):
        first: dict[int, str] = {}
        for name, t in zip(names, tensors):
            if id(t) in first:  # a tied pair: one storage, as LitGPT itself saves it
                self._zip.alias(name, first[id(t)])
            else:
                self._zip.write(name, t)
                first[id(t)] = name

    def close(self):
        self._zip.close()

    def abort(self):
        self._zip.abort()


FORMAT = LitGPTFormat()
