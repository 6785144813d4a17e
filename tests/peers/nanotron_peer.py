#!/usr/bin/env python
"""Nanotron reference peer for weightport tests: Nanotron's own Llama, its own save_weights and
load_weights, on CPU, in a gloo process group of TP x PP processes on this machine.

Run with a Python that has `nanotron` (PyPI 0.4, CHECKPOINT_VERSION 1.2) and `dacite`:

    python tests/peers/nanotron_peer.py JOB_JSON RESULT_JSON

JOB_JSON is {"tp": T, "pp": P, "ops": [op, ...]}. One process per rank (T*P of them; with one
rank the job runs in this process, otherwise `torch.multiprocessing.spawn` starts them), and every
rank runs every op. RESULT_JSON gets {"nanotron", "checkpoint_version", "results": [one per op]};
an op that raises on any rank gives {"error": "<Type>: <message>"} (the first rank's that raised)
instead of stopping the job, so a test can expect Nanotron to refuse a checkpoint.

Each op builds a fresh model the way Nanotron 0.4's DistributedTrainer does (`init_model`,
`_init_model`): the vocabulary padded by `helpers._vocab_size_with_padding` for the TP size,
`LlamaForTraining` through `models.build_model` (PipelineBlocks placed on PP ranks by Nanotron's
cost balance), `trainer.mark_tied_parameters` (embedding <-> lm_head tie when
tie_word_embeddings, every unsharded parameter tied across its TP group) and
`parameters.sanity_check`. Ops:

load {"ckpt", "model_config": {...}, "dtype", "out"}
    `nanotron.serialize.load_weights(model, parallel_context, Path(ckpt))`, as the trainer does
    for `model.init_method: {path: ckpt}`, into a model whose parameters were first set to NaN.
    Then every parameter is written to the safetensors file `out`, UNSHARDED: each rank's local
    tensor is placed into the parameter's
    `unsharded_shape` by the (local, global) slice pairs of the parameter's own ShardedInfo
    (what Nanotron's create_sharded_parameter_from_config computed for this TP size, not what the
    files say), and every element must be covered exactly once. Unsharded parameters must hold the
    same bits on every rank that has them. Keys are the model's state_dict names; a tied lm_head
    appears under its own name too (same values as the embedding). For TP > 1 each rank's local
    shard of a sharded parameter is also written, as "<name>@tp<r>".
    Result {"params": {name: info}, "ignored_config_keys": [...]} where info is {"shape" (unsharded),
    "dtype", "sharded", "tied": the tie's name or null, "tie_ranks", "pp_rank", and for a sharded
    parameter "metadata": {TP rank: the {version, local_global_slices_pairs, unsharded_shape}
    strings Nanotron's own TensorMetadata.to_str_dict gives for that rank's shard}}.
save {"model_config", "dtype", "seed", "out_dir", "out"}
    A randomly initialised model saved as the trainer saves one. The weights come from
    `LlamaForTraining.init_model_randomly` (config.model.init_method = RandomInit(std)), as the
    trainer's RandomInit path, followed by its all-reduce (AVG) of every tied parameter over its
    tie group. Two deliberate differences from the trainer, so the comparison is meaningful:
    each rank seeds torch with seed + 1000 * world rank (the trainer seeds every rank alike, so
    two TP shards would hold equal values and a misplaced shard would go unnoticed), and the
    RMSNorm weights, which Nanotron initialises to exactly 1, get 1 + 0.2 * N(0,1) from a
    generator seeded by (seed, parameter name), identical on all ranks (so a swapped norm shows).
    Then into out_dir: `serialize.save_weights` (model/), `serialize.metadata.save_meta`
    (checkpoint_metadata.json, with the trainer's {"last_train_step", "consumed_train_samples"}),
    `Config.save_as_yaml` (config.yaml; general, parallelism, model and tokenizer sections, as the
    trainer would have them) and model_config.json as the trainer writes it
    (json.dumps(asdict(model_config))). `out` gets the unsharded parameters as for load.
config {"path"}
    `nanotron.config.get_config_from_file(path)` (strict dacite parse of a config.yaml).
    Result {"ok": true, "model_config": {...}} or an error.

JSON turns the TP ranks keying "metadata" into strings. "model_config" is a dict of Nanotron
LlamaConfig fields (a model_config.json); keys 0.4's
LlamaConfig does not have are dropped and listed in "ignored_config_keys" (Nanotron 0.4 has no
rope_theta nor rope_interleaved: its rotary is always the interleaved, GPT-J pairing with theta
10000). "dtype" is a torch dtype name (default "float32").

Patches applied before Nanotron runs on a machine without CUDA (none changes what is loaded or
saved): the PyPI wheel's circular import is broken as upstream later fixed it (_import_nanotron);
TORCHDYNAMO_DISABLE=1; `flash_attn` is replaced by a stub module whose functions raise
(models/llama.py and nn/layer_norm.py import it at import time; no forward pass is run);
the gloo process group is started here, so ParallelContext skips its CUDA-only
initialize_torch_distributed; ParallelContext.set_device is a no-op; the pipeline P2P helper
allocates its metadata buffers on CPU instead of "cuda"; build_model gets device=cpu; the rotary
buffers (non-persistent, never saved) are not initialised.
"""

import datetime
import json
import os
import sys
import tempfile
import traceback
from dataclasses import asdict, fields
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402


def _stub_flash_attn() -> None:
    try:
        import flash_attn  # noqa: F401
        return
    except ImportError:
        pass
    import types

    def unavailable(*args, **kwargs):
        raise RuntimeError("flash_attn is stubbed in this peer: no forward pass on CPU")

    class RotaryEmbedding(torch.nn.Module):
        def __init__(self, dim, base=10000.0, interleaved=False, *args, **kwargs):
            super().__init__()
            self.dim, self.base, self.interleaved = dim, base, interleaved

        forward = unavailable

    names = {
        "flash_attn": {},
        "flash_attn.bert_padding": {"pad_input": unavailable, "unpad_input": unavailable,
                                    "index_first_axis": unavailable},
        "flash_attn.flash_attn_interface": {"flash_attn_varlen_func": unavailable,
                                            "flash_attn_with_kvcache": unavailable,
                                            "flash_attn_func": unavailable},
        "flash_attn.layers": {},
        "flash_attn.layers.rotary": {"RotaryEmbedding": RotaryEmbedding},
        "flash_attn.ops": {},
        "flash_attn.ops.triton": {},
        "flash_attn.ops.triton.layer_norm": {"layer_norm_fn": unavailable},
    }
    for name, attrs in names.items():
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], leaf, mod)


def _import_nanotron() -> None:
    """Import nanotron 0.4, whose PyPI wheel cannot be imported as shipped: nanotron.logging
    imports nanotron.config.config (for a type annotation), which through config.utils_config and
    parallel.pipeline_parallel.engine imports nanotron.logging again (huggingface/nanotron issues
    #191, #235; fixed upstream in cd4d5ed7 "fix circular import in logging" by making that import
    TYPE_CHECKING-only). The same fix is applied here at import time: nanotron/logging.py is
    executed from the installed file without that one import line, and LoggingArgs is bound once
    nanotron.config has loaded. Nothing else of Nanotron's code is changed."""
    import importlib.util

    import nanotron

    if "nanotron.logging" not in sys.modules:
        spec = importlib.util.find_spec("nanotron.logging")
        source = Path(spec.origin).read_text(encoding="utf-8")
        edge = "from nanotron.config.config import LoggingArgs\n"
        if edge in source:
            module = importlib.util.module_from_spec(spec)
            module.LoggingArgs = "LoggingArgs"  # only an annotation until nanotron.config is loaded
            sys.modules["nanotron.logging"] = module
            try:
                exec(compile(source.replace(edge, "\n"), spec.origin, "exec"), module.__dict__)
            except BaseException:
                del sys.modules["nanotron.logging"]
                raise
            nanotron.logging = module
    from nanotron.config.config import LoggingArgs

    sys.modules["nanotron.logging"].LoggingArgs = LoggingArgs


def _patch_nanotron() -> None:
    _import_nanotron()
    from nanotron.parallel import ParallelContext
    from nanotron.parallel.pipeline_parallel import p2p

    ParallelContext.set_device = lambda self: None
    original = p2p.P2P.__init__

    def cpu_p2p(self, pg, device):
        original(self, pg, torch.device("cpu"))

    p2p.P2P.__init__ = cpu_p2p


def _dtype(name: str | None) -> torch.dtype:
    return getattr(torch, name or "float32")


def _llama_config(raw: dict):
    from nanotron.config import LlamaConfig

    known = {f.name for f in fields(LlamaConfig)}
    return LlamaConfig(**{k: v for k, v in raw.items() if k in known}), sorted(set(raw) - known)


def _build(op: dict, pc, tp: int, pp: int):
    """The model as DistributedTrainer.init_model / _init_model builds it, on CPU."""
    from nanotron.config import ParallelismArgs
    from nanotron.helpers import _vocab_size_with_padding
    from nanotron.models import build_model
    from nanotron.models.llama import LlamaForTraining
    from nanotron.parallel.parameters import sanity_check
    from nanotron.trainer import mark_tied_parameters

    config, ignored = _llama_config(op["model_config"])
    config.vocab_size = _vocab_size_with_padding(config.vocab_size, pg_size=tp, make_vocab_size_divisible_by=1)
    parallelism = ParallelismArgs(dp=1, pp=pp, tp=tp)
    model = build_model(
        model_builder=lambda: LlamaForTraining(config=config, parallel_context=pc, parallel_config=parallelism,
                                               random_states=None),
        parallel_context=pc, dtype=_dtype(op.get("dtype")), device=torch.device("cpu"))
    mark_tied_parameters(model=model, parallel_context=pc, parallel_config=parallelism)
    sanity_check(root_module=model)
    return model, config, parallelism, ignored


def _local_view(model, pc) -> dict:
    """name -> (local tensor, info) for every parameter this rank holds."""
    from nanotron import distributed as dist
    from nanotron.constants import CHECKPOINT_VERSION
    from nanotron.serialize.metadata import TensorMetadata

    module_id_to_prefix = {id(m): f"{n}." for n, m in model.named_modules()}
    module_id_to_prefix[id(model)] = ""
    tp_rank, pp_rank = dist.get_rank(pc.tp_pg), dist.get_rank(pc.pp_pg)
    out = {}
    for name, tensor in model.state_dict().items():
        param = model.get_parameter(name)
        info = {"tied": None, "tie_ranks": None, "sharded": bool(param.is_sharded), "pp_rank": pp_rank,
                "tp_rank": tp_rank, "dtype": str(tensor.dtype).removeprefix("torch.")}
        if param.is_tied:
            tied = param.get_tied_info()
            info["tied"] = tied.get_full_name_from_module_id_to_prefix(module_id_to_prefix=module_id_to_prefix)
            info["tie_ranks"] = [int(r) for r in tied.global_ranks]
        if param.is_sharded:
            sharded = param.get_sharded_info()
            info["unsharded_shape"] = [int(d) for d in sharded.unsharded_shape]
            info["pairs"] = [[[tuple(None if x is None else int(x) for x in (s.start, s.stop, s.step)) for s in side]
                              for side in (pair.local_slices, pair.global_slices)]
                             for pair in sharded.local_global_slices_pairs]
            # the three metadata strings Nanotron's save_weights would write for this shard
            info["metadata"] = TensorMetadata(version=CHECKPOINT_VERSION,
                                              local_global_slices_pairs=sharded.local_global_slices_pairs,
                                              unsharded_shape=sharded.unsharded_shape).to_str_dict()
        out[name] = (tensor.detach().clone(), info)
    return out


def _assemble(views: list[dict], tp: int) -> tuple[dict, dict]:
    """Every rank's local tensors -> unsharded tensors (+ "<name>@tp<r>" local shards), infos."""
    tensors, infos = {}, {}
    names = sorted({n for v in views for n in v})
    for name in names:
        held = [v[name] for v in views if name in v]
        first = held[0][1]
        info = {k: first[k] for k in ("dtype", "sharded", "tied", "tie_ranks", "pp_rank")}
        if not first["sharded"]:
            value = held[0][0]
            for other, _ in held[1:]:
                if not torch.equal(other, value):
                    raise AssertionError(f"{name}: replicas differ across ranks")
            tensors[name] = value
            info["shape"] = list(value.shape)
            infos[name] = info
            continue
        shape = first["unsharded_shape"]
        full = torch.empty(shape, dtype=held[0][0].dtype)
        covered = torch.zeros(shape, dtype=torch.int32)
        info["metadata"] = {}
        for local, meta in sorted(held, key=lambda h: h[1]["tp_rank"]):
            if meta["tp_rank"] in info["metadata"]:
                raise AssertionError(f"{name}: held twice by TP rank {meta['tp_rank']}")
            info["metadata"][meta["tp_rank"]] = meta["metadata"]
            for loc, glob in meta["pairs"]:
                loc_s = tuple(slice(*s) for s in loc)
                glob_s = tuple(slice(*s) for s in glob)
                full[glob_s] = local[loc_s]
                covered[glob_s] += 1
            if tp > 1:
                tensors[f"{name}@tp{meta['tp_rank']}"] = local
        if not bool((covered == 1).all()):
            raise AssertionError(f"{name}: the TP shards do not cover {shape} exactly once")
        tensors[name] = full
        info["shape"] = shape
        infos[name] = info
    return tensors, infos


def _write(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def _load(op, pc, tp, pp):
    from nanotron.serialize import load_weights

    model, _, _, ignored = _build(op, pc, tp, pp)
    with torch.no_grad():  # whatever load_weights does not fill stays NaN and cannot compare equal
        for param in model.parameters():
            param.fill_(float("nan"))
    load_weights(model=model, parallel_context=pc, root_folder=Path(op["ckpt"]))
    return model, {"ignored_config_keys": ignored}


def _save(op, pc, tp, pp):
    from nanotron import distributed as dist
    from nanotron.config import Config, GeneralArgs, ModelArgs, RandomInit, TokenizerArgs
    from nanotron.nn.layer_norm import TritonRMSNorm
    from nanotron.parallel.tied_parameters import get_tied_id_to_param
    from nanotron.serialize import save_weights
    from nanotron.serialize.metadata import save_meta

    seed = int(op.get("seed", 0))
    torch.manual_seed(seed + 1000 * dist.get_rank(pc.world_pg))
    model, config, parallelism, ignored = _build(op, pc, tp, pp)
    full_config = Config(general=GeneralArgs(project="weightport-peer", run="save", seed=seed),
                         parallelism=parallelism,
                         model=ModelArgs(model_config=config, init_method=RandomInit(std=float(op.get("std", 0.02))),
                                         dtype=_dtype(op.get("dtype"))),
                         tokenizer=TokenizerArgs())
    model.init_model_randomly(config=full_config)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, TritonRMSNorm):
                g = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, module_name)) * 31 + len(module_name))
                noise = torch.randn(module.weight.shape, generator=g, dtype=torch.float32)
                module.weight.copy_((1.0 + 0.2 * noise).to(module.weight.dtype))
        # as the trainer's RandomInit path: sync every tied parameter over its tie group
        for (_, group_ranks), param in sorted(get_tied_id_to_param(parameters=model.parameters(), root_module=model)
                                              .items(), key=lambda x: x[0]):
            dist.all_reduce(param, op=dist.ReduceOp.AVG, group=pc.world_ranks_to_pg[group_ranks])
    out = Path(op["out_dir"])
    if dist.get_rank(pc.world_pg) == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier(group=pc.world_pg)
    save_weights(model=model, parallel_context=pc, root_folder=out)
    save_meta(parallel_context=pc, root_folder=out,
              checkpoint_metadata={"last_train_step": 0, "consumed_train_samples": 0})
    if dist.get_rank(pc.world_pg) == 0:
        full_config.save_as_yaml(out / "config.yaml")
        (out / "model_config.json").write_text(json.dumps(asdict(config)))
    return model, {"ignored_config_keys": ignored}


def _config(op, pc, tp, pp):
    from nanotron.config import get_config_from_file

    config = get_config_from_file(op["path"])
    return None, {"ok": True, "model_config": asdict(config.model.model_config)}


OPS = {"load": _load, "save": _save, "config": _config}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def worker(rank: int, world: int, tp: int, pp: int, init_file: str, job: dict, result_path: str) -> None:
    from nanotron import distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=300))
    from nanotron.parallel import ParallelContext

    pc = ParallelContext(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=1)
    results = []
    for op in job["ops"]:
        model, result, error = None, None, None
        try:  # local work: no collective may be left half-done by a failure here
            model, result = OPS[op["op"]](op, pc, tp, pp)
        except Exception as e:  # noqa: BLE001 - reported per op
            error = _error(e) + ("\n" + traceback.format_exc() if os.environ.get("NANOTRON_PEER_TRACE") else "")
        errors = [None] * world
        dist.all_gather_object(errors, error, group=pc.world_pg)
        failed = next((e for e in errors if e), None)
        if failed:
            results.append({"error": failed})
            continue
        if model is not None:
            views = [None] * world
            dist.all_gather_object(views, _local_view(model, pc), group=pc.world_pg)
            if rank == 0:
                try:
                    tensors, infos = _assemble(views, tp)
                    _write(tensors, op["out"])
                    result = dict(result, params=infos)
                except Exception as e:  # noqa: BLE001
                    result = {"error": _error(e)}
        results.append(result)
    if rank == 0:
        import nanotron
        from nanotron.constants import CHECKPOINT_VERSION

        with open(result_path, "w", encoding="utf-8") as f:
            json.dump({"nanotron": nanotron.__version__, "checkpoint_version": str(CHECKPOINT_VERSION),
                       "tp": tp, "pp": pp, "results": results}, f)
    dist.barrier(group=pc.world_pg)
    tdist.destroy_process_group()


def _spawned(rank, *args):
    _stub_flash_attn()
    _patch_nanotron()
    worker(rank, *args)


def main() -> None:
    job_path, result_path = sys.argv[1:3]
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    tp, pp = int(job.get("tp", 1)), int(job.get("pp", 1))
    world = tp * pp
    with tempfile.TemporaryDirectory(prefix="nanotron-peer-") as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        args = (world, tp, pp, init_file, job, result_path)
        if world == 1:
            _spawned(0, *args)
        else:
            import torch.multiprocessing as mp

            mp.spawn(_spawned, args=args, nprocs=world, join=True)


if __name__ == "__main__":
    main()
