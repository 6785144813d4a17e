"""Nanotron checkpoints (Llama, Idefics3): <ckpt>/model/ with one safetensors file per parameter and
TP shard, model_config.json, config.yaml and checkpoint_metadata.json.

The format's tensors are Nanotron's *unsharded* parameters; cutting them into TP shards and
putting them back together is the job of shards.py. What differs by architecture
(rules, which parameters are split how, the config's fields) lives in one module each: llama.py
and idefics3.py; this adapter finds the files and the config the same way for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ...archs import Model, model_from_hf_config
from ...dtypes import short_name
from ...errors import WeightportError
from ...hf_config import load_json, load_yaml
from .shards import (VERSION, VERSIONS, NanotronSource, NanotronWriter, ShardFile, Sharding,
                                   file_name, local_shape, shard_metadata, shard_pairs)
from ...rules import Rule
from ...format import Checkpoint, Format, OutputTensor, Writer, WriteOptions
from ..common import find_side_files, write_hf_sidecar, write_json
from ...staging import final_dir
from . import idefics3, llama

MODEL_CONFIG, YAML, META = "model_config.json", "config.yaml", "checkpoint_metadata.json"
LAYOUTS = ("rotate-half", "interleaved")  # rope_interleaved false / true
# per architecture: rules, vocab_rows, sharding, WHAT, pp_ranks, check_write, write_notes, to_nanotron, detects,
# to_hf, same_network
ARCHS = {m.NAME: m for m in (llama, idefics3)}


def _check_divides(arch, name: str, shape: tuple[int, ...], s: Sharding, tp: int) -> None:
    labels = next(v for k, v in arch.WHAT.items() if f".{k}." in name)
    for label, n in zip(labels, s.chunks or (shape[s.dim],)):
        if n % tp:
            raise WeightportError(f"--tp {tp} does not divide {label} ({n}) of {name}; "
                                  "choose a TP size that divides it")


class NanotronFormat(Format):
    name = "nanotron"
    title = "Nanotron (model/ tree of per-parameter TP shards, model_config.json, config.yaml; Llama, Idefics3)"
    archs = tuple(ARCHS)
    layouts = LAYOUTS
    # takes WriteOptions.tp and .pp
    tensor_parallel = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "model").is_dir() and any((path / n).is_file() for n in (MODEL_CONFIG, YAML))

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        if not path.is_dir():
            raise WeightportError(f"{path}: a Nanotron checkpoint is a directory")
        model, rows, interleaved, notes = _read_config(path)
        if interleaved is None and layout is None:
            raise WeightportError(f"{path}: the config does not record rope_interleaved (Nanotron's fork defaults it "
                                  "to true, upstream to false); pass --from-layout interleaved or rotate-half")
        if layout is not None and interleaved is not None and (layout == "interleaved") != interleaved:
            raise WeightportError(f"{path}: config says rope_interleaved={str(interleaved).lower()}, "
                                  f"which is not layout {layout!r}")
        interleaved = layout == "interleaved" if interleaved is None else interleaved
        source = NanotronSource(path / "model")
        try:
            sizes = ", ".join(f"TP={t} PP={p}" for t, p in sorted(source.parallel_sizes())) or "unsharded"
            generation = path / "generation_config.json"
            rules = ARCHS[model.arch.name].rules(model, interleaved, rows)
            return Checkpoint(path=path, format=self, variant=f"{sizes}, {LAYOUTS[interleaved]} rotary", model=model,
                              source=source, rules=rules, notes=notes, side_files=find_side_files(path),
                              generation_config=load_json(generation) if generation.is_file() else None)
        except BaseException:
            source.close()
            raise

    def check_write(self, model: Model, options: WriteOptions) -> list[str]:
        if options.nanotron_version not in (None, *VERSIONS):
            raise WeightportError(f"--nanotron-version {options.nanotron_version} is not one of {', '.join(VERSIONS)}")
        return ARCHS[model.arch.name].check_write(model, options)

    def write_notes(self, model: Model, options: WriteOptions) -> list[str]:
        return ARCHS[model.arch.name].write_notes(model, options)

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        arch = ARCHS[model.arch.name]
        return arch.rules(model, layout == "interleaved", arch.vocab_rows(model, tp))

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[ShardFile]:
        tp = options.tp
        # layout is not given the model; the text embedding's name tells the two module trees apart
        arch = idefics3 if any(t.name == idefics3.EMBED for t in tensors) else llama
        stage = arch.pp_ranks(tensors, options.pp)
        files = []
        for t in tensors:
            s = arch.sharding(t.name, t.shape)
            if s is None:
                files.append(ShardFile(file_name(t.name, None), [t]))
                continue
            _check_divides(arch, t.name, t.shape, s, tp)
            shard = OutputTensor(t.name, local_shape(t.shape, s, tp), t.dtype)
            for r in range(tp):
                pairs = shard_pairs(t.shape, s, r, tp)
                name = file_name(t.name, (r, tp), (stage[t.name], options.pp))
                files.append(ShardFile(name, [shard], pairs,
                                       shard_metadata(t.shape, pairs, options.nanotron_version or VERSION)))
        return files

    def writer(self, directory: Path, files: list[ShardFile]) -> Writer:
        return NanotronWriter(directory, files)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        tp, pp = options.tp, options.pp
        nt = ARCHS[model.arch.name].to_nanotron(model, options)
        (directory / MODEL_CONFIG).write_text(json.dumps(nt))
        init = str(final_dir(directory))
        full = yaml_config(nt, tp, pp, short_name(dtype), init, model.config.get("_name_or_path"))
        with open(directory / YAML, "w", encoding="utf-8") as f:
            yaml.safe_dump(full, f)
        write_json(directory / META, checkpoint_metadata(tp, options.nanotron_version or VERSION))
        # config.json keeps what Nanotron's configs have no field for (pad id, rope details, the true
        # vocabulary size, tying), so reading back is exact
        return [MODEL_CONFIG, YAML, META] + write_hf_sidecar(directory, source, model)


def _read_config(path: Path) -> tuple[Model, int, bool | None, list[str]]:
    """The model, the vocabulary rows stored, rope_interleaved (None: not recorded) and notes."""
    if (path / MODEL_CONFIG).is_file():
        where, nt = path / MODEL_CONFIG, load_json(path / MODEL_CONFIG)
    elif (path / YAML).is_file():
        where = path / YAML
        try:
            nt = ((load_yaml(where, "Nanotron config") or {}).get("model") or {}).get("model_config")
        except AttributeError as e:
            raise WeightportError(f"{where}: not a Nanotron config ({str(e).splitlines()[0]})") from None
    else:
        raise WeightportError(f"{path}: no {MODEL_CONFIG} or {YAML}")
    arch = idefics3 if idefics3.detects(nt) else llama
    hf, interleaved, notes = arch.to_hf(nt, str(where))
    model = model_from_hf_config(hf, str(where))
    rows = model.dims.vocab
    sidecar = path / "config.json"
    if sidecar.is_file():
        original = model_from_hf_config(load_json(sidecar), str(sidecar))
        if not notes and arch.same_network(original, model):
            notes.append(f"config from {sidecar.name} (matches {where.name})")
            if original.dims.vocab != rows:
                notes.append(f"vocabulary padding undone: {rows} stored rows, {original.dims.vocab} in {sidecar.name}")
            return original, rows, interleaved, notes
        notes.append(f"ignored {sidecar.name}: it describes a different network than {where.name}")
    if arch is idefics3:
        notes.append(f"vocabulary kept as stored ({rows} rows, padding included): no {sidecar.name} beside "
                     "the weights records the Hugging Face vocabulary size")
    return model, rows, interleaved, notes


def yaml_config(model_config: dict, tp: int, pp: int, dtype: str, init_path: str, tokenizer: str | None) -> dict:
    """The full Nanotron Config a converted checkpoint carries (as Nanotron's tools write it)."""
    return {
        "general": {"benchmark_csv_path": None, "consumed_train_samples": None, "ignore_sanity_checks": True,
                    "project": "weightport", "run": "converted", "seed": 42, "step": None},
        "parallelism": {"dp": 1, "expert_parallel_size": 1, "pp": pp, "pp_engine": "1f1b", "tp": tp,
                        "tp_linear_async_communication": False, "tp_mode": "ALL_REDUCE"},
        "model": {"ddp_bucket_cap_mb": 25, "dtype": dtype, "init_method": {"path": init_path},
                  "make_vocab_size_divisible_by": 1, "model_config": model_config},
        "tokenizer": {"tokenizer_max_length": None, "tokenizer_name_or_path": tokenizer, "tokenizer_revision": None},
        **{k: None for k in ("checkpoints", "data_stages", "lighteval", "logging", "optimizer", "profiler", "tokens")},
    }


def checkpoint_metadata(tp: int, version: str) -> dict:
    stage = {"consumed_train_samples": 0, "name": "Empty", "start_training_step": 0}
    return {"custom_metas": None, "dp": 1, "tp": tp, "version": version,
            "metas": {"consumed_train_samples": 0, "data_stages": [stage], "last_stage_idx": None,
                      "last_train_step": 0}}


FORMAT = NanotronFormat()
