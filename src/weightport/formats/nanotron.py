"""Nanotron checkpoints (Llama): <ckpt>/model/ with one safetensors file per parameter and TP shard,
model_config.json, config.yaml and checkpoint_metadata.json.

The format's tensors are Nanotron's *unsharded* parameters; cutting them into TP shards and
putting them back together is the job of io/nanotron_shards.py, so the rules below only rename,
fuse q/k/v and gate/up, and (layout "interleaved", rope_interleaved: true) permute q/k rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ..archs import Model, model_from_hf_config
from ..dtypes import short_name
from ..errors import WeightportError
from ..hf_config import load_json, rope_theta
from ..io.nanotron_shards import (VERSION, VERSIONS, NanotronSource, NanotronWriter, ShardFile, Sharding, file_name,
                                  local_shape, shard_metadata, shard_pairs)
from ..ops import Concat, Chain, Identity, Parallel, RotaryPermute
from ..rules import Rule, expand, rename
from .base import Checkpoint, Format, OutputTensor, Writer, WriteOptions, find_side_files, write_hf_sidecar, write_json
from .nanotron_config import check_representable, checkpoint_metadata, to_hf, to_nanotron, yaml_config

MODEL_CONFIG, YAML, META = "model_config.json", "config.yaml", "checkpoint_metadata.json"
LAYOUTS = ("rotate-half", "interleaved")  # rope_interleaved false / true
EMBED = "model.token_position_embeddings.pp_block.token_embedding.weight"
L, D = "model.layers.{l}", "model.decoder.{l}.pp_block"


def nanotron_rules(model: Model, interleaved: bool) -> list[Rule]:
    d = model.dims
    fuse = bias_fuse = Concat((d.q_rows, d.kv_rows, d.kv_rows))
    if interleaved:
        permute = Parallel((RotaryPermute(d.n_head, d.head_dim), RotaryPermute(d.n_kv, d.head_dim), Identity()))
        fuse, bias_fuse = Chain((permute, fuse)), Chain((permute, bias_fuse))
    rules = [
        rename("model.embed_tokens.weight", EMBED),
        rename(f"{L}.input_layernorm.weight", f"{D}.input_layernorm.weight"),
        Rule([f"{L}.self_attn.{p}_proj.weight" for p in "qkv"], f"{D}.attn.qkv_proj.weight", fuse),
        rename(f"{L}.self_attn.o_proj.weight", f"{D}.attn.o_proj.weight"),
        rename(f"{L}.post_attention_layernorm.weight", f"{D}.post_attention_layernorm.weight"),
        Rule([f"{L}.mlp.{p}_proj.weight" for p in ("gate", "up")], f"{D}.mlp.gate_up_proj.weight",
             Concat((d.intermediate, d.intermediate))),
        rename(f"{L}.mlp.down_proj.weight", f"{D}.mlp.down_proj.weight"),
        # biases are refused on writing (check_representable); the rules keep every tensor reversible
        Rule([f"{L}.self_attn.{p}_proj.bias" for p in "qkv"], f"{D}.attn.qkv_proj.bias", bias_fuse),
        rename(f"{L}.self_attn.o_proj.bias", f"{D}.attn.o_proj.bias"),
        Rule([f"{L}.mlp.{p}_proj.bias" for p in ("gate", "up")], f"{D}.mlp.gate_up_proj.bias",
             Concat((d.intermediate, d.intermediate))),
        rename(f"{L}.mlp.down_proj.bias", f"{D}.mlp.down_proj.bias"),
        rename("model.norm.weight", "model.final_layer_norm.pp_block.weight"),
        # tied: Nanotron stores the embedding once and has no lm_head files, as the hub has no lm_head
        rename("lm_head.weight", "model.lm_head.pp_block.weight"),
    ]
    return expand(rules, d.n_layer, 0, set(model.hub_tensors()))


def sharding(name: str, shape: tuple[int, ...]) -> Sharding | None:
    """Nanotron Llama's TP split of a parameter (None: replicated, one unsuffixed file)."""
    if name.endswith("qkv_proj.weight"):
        # q has hidden_size rows: Nanotron's head_dim is always hidden / heads
        kv = (shape[0] - shape[1]) // 2
        return Sharding(0, (shape[1], kv, kv))
    if name.endswith("gate_up_proj.weight"):
        return Sharding(0, (shape[0] // 2,) * 2)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return Sharding(1)
    if name in (EMBED, "model.lm_head.pp_block.weight"):
        return Sharding(0)
    return None


# what each split block of a parameter is, for the message when TP does not divide it
_WHAT = {"qkv_proj": ("its query block", "its key block", "its value block"),
         "gate_up_proj": ("its gate block", "its up block"), "o_proj": ("the attention width",),
         "down_proj": ("intermediate_size",), "token_embedding": ("vocab_size",), "lm_head": ("vocab_size",)}


def _check_divides(name: str, shape: tuple[int, ...], s: Sharding, tp: int) -> None:
    labels = next(v for k, v in _WHAT.items() if f".{k}." in name)
    for label, n in zip(labels, s.chunks or (shape[s.dim],)):
        if n % tp:
            raise WeightportError(f"--tp {tp} does not divide {label} ({n}) of {name}; "
                                  "choose a TP size that divides it")


def pp_ranks(tensors: list[OutputTensor], pp: int) -> dict[str, int]:
    """Each parameter's pipeline rank, as Nanotron's build_model balances its PipelineBlocks
    (embedding, decoder layers, final norm, lm_head, ...) by cumulative compute cost."""
    shapes = {t.name: t.shape for t in tensors}
    vocab, hidden = shapes[EMBED]
    layers = sorted({int(n.split(".")[2]) for n in shapes if n.startswith("model.decoder.")})
    inter = shapes[f"model.decoder.{layers[0]}.pp_block.mlp.gate_up_proj.weight"][0] // 2 if layers else 0
    # LlamaForTraining.get_block_compute_costs, with heads x head_dim = hidden; the lm_head block
    # exists (and costs) even when tied
    layer_cost = 4 * hidden * hidden + 3 * inter * hidden
    blocks = [("model.token_position_embeddings.", 0)] + [(f"model.decoder.{l}.", layer_cost) for l in layers]
    blocks += [("model.final_layer_norm.", 0), ("model.lm_head.", vocab * hidden)]
    total = sum(c for _, c in blocks)
    thresholds = [total * ((r + 1) / pp) for r in range(pp)]
    ranks, rank, cumulative = {}, 0, 0
    for prefix, cost in blocks:
        cumulative += cost
        ranks[prefix] = rank
        if cumulative > thresholds[rank]:
            rank += 1
    return {n: next(r for p, r in ranks.items() if n.startswith(p)) for n in shapes}


def _final_path(directory: Path) -> Path:
    # execute writes into .<name>.weightport-partial-<pid> and renames it; config.yaml names the final path
    name = directory.name
    if name.startswith(".") and ".weightport-partial-" in name:
        name = name[1:].rsplit(".weightport-partial-", 1)[0]
    return (directory.parent / name).resolve()


class NanotronFormat(Format):
    name = "nanotron"
    title = "Nanotron (model/ tree of per-parameter TP shards, model_config.json, config.yaml; Llama)"
    archs = ("llama",)
    layouts = LAYOUTS
    # takes WriteOptions.tp and .pp
    tensor_parallel = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "model").is_dir() and any((path / n).is_file() for n in (MODEL_CONFIG, YAML))

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        if not path.is_dir():
            raise WeightportError(f"{path}: a Nanotron checkpoint is a directory")
        model, interleaved, notes = _read_config(path)
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
            return Checkpoint(path=path, format=self, variant=f"{sizes}, {LAYOUTS[interleaved]} rotary", model=model,
                              source=source, rules=nanotron_rules(model, interleaved), notes=notes,
                              side_files=find_side_files(path),
                              generation_config=load_json(generation) if generation.is_file() else None)
        except BaseException:
            source.close()
            raise

    def check_write(self, model: Model, options: WriteOptions) -> list[str]:
        if options.nanotron_version not in (None, *VERSIONS):
            raise WeightportError(f"--nanotron-version {options.nanotron_version} is not one of {', '.join(VERSIONS)}")
        warnings = check_representable(model, options.allow_approximate)
        d = model.dims
        for what, n in (("num_attention_heads", d.n_head), ("num_key_value_heads", d.n_kv)):
            if n % options.tp:
                raise WeightportError(f"--tp {options.tp} does not divide {what} ({n}): Nanotron gives each TP rank "
                                      "whole heads; choose a TP size that divides both head counts")
        if options.pp > d.n_layer:
            raise WeightportError(f"--pp {options.pp} is more pipeline stages than the {d.n_layer} decoder layers")
        return warnings

    def target_rules(self, model: Model, layout: str | None = None) -> list[Rule]:
        return nanotron_rules(model, layout == "interleaved")

    def layout(self, tensors: list[OutputTensor], options: WriteOptions) -> list[ShardFile]:
        tp = options.tp
        stage = pp_ranks(tensors, options.pp)
        files = []
        for t in tensors:
            s = sharding(t.name, t.shape)
            if s is None:
                files.append(ShardFile(file_name(t.name, None), [t]))
                continue
            _check_divides(t.name, t.shape, s, tp)
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
        nt = to_nanotron(model, options.layout == "interleaved", options.allow_approximate)
        (directory / MODEL_CONFIG).write_text(json.dumps(nt))
        init = str(_final_path(directory))
        full = yaml_config(nt, tp, pp, short_name(dtype), init, model.config.get("_name_or_path"))
        with open(directory / YAML, "w", encoding="utf-8") as f:
            yaml.safe_dump(full, f)
        write_json(directory / META, checkpoint_metadata(tp, options.nanotron_version or VERSION))
        # config.json keeps what LlamaConfig has no field for (pad id, rope details), so reading back is exact
        return [MODEL_CONFIG, YAML, META] + write_hf_sidecar(directory, source, model)


def _read_config(path: Path) -> tuple[Model, bool | None, list[str]]:
    if (path / MODEL_CONFIG).is_file():
        where, nt = path / MODEL_CONFIG, load_json(path / MODEL_CONFIG)
    elif (path / YAML).is_file():
        where = path / YAML
        try:
            with open(where, encoding="utf-8") as f:
                nt = ((yaml.safe_load(f) or {}).get("model") or {}).get("model_config")
        except (yaml.YAMLError, AttributeError) as e:
            raise WeightportError(f"{where}: not a Nanotron config ({str(e).splitlines()[0]})") from None
    else:
        raise WeightportError(f"{path}: no {MODEL_CONFIG} or {YAML}")
    hf, interleaved, notes = to_hf(nt, str(where))
    model = model_from_hf_config(hf, str(where))
    sidecar = path / "config.json"
    if sidecar.is_file():
        original = model_from_hf_config(load_json(sidecar), str(sidecar))
        same = original.arch is model.arch and original.dims == model.dims and not notes and all(
            original.config.get(k, hf[k]) == hf[k] for k in ("rms_norm_eps", "hidden_act")) \
            and rope_theta(original.config) == rope_theta(hf)
        if same:
            notes.append(f"config from {sidecar.name} (matches {where.name})")
            return original, interleaved, notes
        notes.append(f"ignored {sidecar.name}: it describes a different network than {where.name}")
    return model, interleaved, notes


FORMAT = NanotronFormat()
