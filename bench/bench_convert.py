#!/usr/bin/env python3
"""End-to-end conversion benchmark: weightport vs ``cp -r`` vs LitGPT's own converters.

One run of this script

1. writes a random (not zero) bf16 Hugging Face checkpoint shaped like Meta-Llama-3-8B
   (~16 GB of sharded safetensors + ``model.safetensors.index.json`` + a transformers
   ``config.json``), one tensor at a time so the generator itself stays small;
2. measures, each in its own subprocess and with the input checkpoint evicted from the page
   cache, wall time and peak RSS of

   ===================  ========================================  =========================================
   direction            baseline                                  contenders
   ===================  ========================================  =========================================
   HF -> LitGPT         ``cp -r HF_DIR X``                        ``weightport convert HF_DIR LIT --to litgpt``,
                                                                  LitGPT ``convert_hf_checkpoint``
   LitGPT -> HF         ``cp -r LIT_DIR Y``                       ``weightport convert LIT HF_BACK --to hf``,
                                                                  LitGPT ``convert_lit_checkpoint``
   HF -> MindSpore      ``cp -r HF_DIR X``                        ``weightport convert HF_DIR MS --to mindspore``,
                                                                  MindFormers' llama ``convert_pt_to_ms``
   MindSpore -> HF      ``cp -r MS Y``                            ``weightport convert MS HF_BACK --to hf``
   HF -> Nanotron TP=2  ``cp -r HF_DIR X``                        ``weightport convert HF_DIR NT --to nanotron --tp 2``
   Nanotron -> HF       ``cp -r NT Y``                            ``weightport convert NT HF_BACK --to hf``
   ===================  ========================================  =========================================

   (Nanotron's own converter, ``examples/llama/convert_hf_to_nanotron.py``, needs ``torchrun``, CUDA
   and flash-attn, so it is not run; the report says so.)

3. checks with ``weightport verify --tensors-only`` (timed and measured too) that the converted
   tensors are bit-identical to the source / to LitGPT's output (``--no-verify`` skips it), and
4. writes a Markdown report (default ``docs/benchmarks.md``) with the targets marked met/missed.

Usage (from the repository root)::

    python3 bench/bench_convert.py --scale small            # ~1 minute smoke test (tiny Llama)
    python3 bench/bench_convert.py --scale medium           # real 8B widths, 4 layers (~3.9 GB)
    python3 bench/bench_convert.py                          # the real thing: full Llama-3-8B (~16 GB)

Useful options: ``--workdir DIR`` (default ``bench-work/``, git-ignored), ``--keep`` (keep the
generated checkpoint and outputs; a kept checkpoint is reused by the next run),
``--skip-litgpt``, ``--skip-mindspore``, ``--skip-nanotron``, ``--skip-weightport``, ``--weightport-cmd "..."`` (or env ``WEIGHTPORT_CMD``),
``--output FILE`` for the report.

Why the design is the way it is
-------------------------------
* **The parent process imports no torch.** On Linux a child's ``ru_maxrss`` starts from the RSS
  high-water mark of the process that forked it (``exec`` keeps the old mm's hiwater in
  ``signal->maxrss``): a 3 GB parent makes ``/bin/true`` report 3 GB. So everything that needs
  torch (generating, verifying, running LitGPT) runs in a child of its own and this process stays
  at a few MB, which is then also the measurement floor.
* **Cold input, warm code.** Before every measured command we ``sync`` and evict the input
  checkpoint's files from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (works
  without root, unlike ``/proc/sys/vm/drop_caches``), so each tool reads its input from disk.
  The tool's own code is deliberately *warm*: right before the measured run an unmeasured
  "prime" command imports the same libraries (``import torch`` alone takes ~4 s here, LitGPT's
  imports ~10 s, and up to +4 s more from a cold cache), because writing 16 GB can push them out
  of the cache and we want to compare converters, not disk reads of ``libtorch``. Import time
  itself is still measured, as a user pays it too. ``--warm`` skips the eviction.
* **Time until durable.** After a command exits we time a ``sync``: tools that leave gigabytes of
  dirty pages behind and tools that ``fsync`` are then compared fairly. The ratios use
  ``wall + sync``; the plain process wall time is reported too.
* **Peak RSS** is the child's ``ru_maxrss`` from ``os.wait4`` (it includes file pages the tool
  has mapped and touched, e.g. through ``mmap``, because that is what the kernel counts). A
  10 Hz sampler of ``/proc/PID/status`` additionally reports the peak anonymous RSS, to tell the
  two apart.
* **Disk.** At most three model-sized trees exist at once (source, one kept intermediate, one
  output under test); every output is deleted as soon as it has been measured (and verified),
  and the script refuses to start (and re-checks before each step) when there is not room.

Only the standard library is used here; the ``_generate`` sub-command (run with the
weightport venv's Python) uses torch + safetensors; ``_litgpt_*`` run inside the LitGPT venv.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
GIB = 1024**3

# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------

#: ``full`` must match LitGPT's built-in "Llama-3-8B" entry (litgpt/config.py: hf_config
#: meta-llama/Meta-Llama-3-8B, padded_vocab_size 128256, n_query_groups 8, intermediate 14336,
#: rope_base 500000), because LitGPT's converter takes the config from the directory name.
#: The other scales are not in LitGPT's table; their LitGPT Config is registered in the LitGPT
#: child before the unmodified converter runs (see ``_litgpt_hf2lit``).
SCALES = {
    "full": dict(
        org="meta-llama", name="Meta-Llama-3-8B", litgpt_builtin=True,
        hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
        tokenizer_vocab=128000, max_pos=8192, shard_bytes=5_000_000_000,
    ),
    # Real 8B widths (so per-tensor sizes, incl. the 1 GB embedding, are realistic) but 4 layers:
    # ~3.9 GB, about a quarter of the full run. Good to extrapolate the full run's duration.
    "medium": dict(
        org="weightport-bench", name="weightport-bench-llama3-8b-4layers", litgpt_builtin=False,
        hidden=4096, layers=4, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
        tokenizer_vocab=128000, max_pos=8192, shard_bytes=1_000_000_000,
    ),
    # Llama-3.2-1B widths (untied head, so 1.5 B parameters), for bench_onnx.py
    "1b": dict(
        org="weightport-bench", name="weightport-bench-llama3-1b", litgpt_builtin=False,
        hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
        tokenizer_vocab=128000, max_pos=8192, shard_bytes=5_000_000_000,
    ),
    # Tiny smoke test; small shards so that sharding (and q/k/v split across shards) is exercised.
    "small": dict(
        org="weightport-bench", name="weightport-bench-tiny-llama", litgpt_builtin=False,
        hidden=256, layers=2, heads=8, kv_heads=2, intermediate=512, vocab=1024,
        tokenizer_vocab=1000, max_pos=2048, shard_bytes=1_000_000,
    ),
}
ROPE_THETA = 500000.0
RMS_EPS = 1e-5
SEED = 1234


def llama_tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF LlamaForCausalLM parameter names and shapes, in ``model.state_dict()`` order (which is
    the order ``save_pretrained`` assigns tensors to shards)."""
    e, i, v = s["hidden"], s["intermediate"], s["vocab"]
    hd = e // s["heads"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, e))]
    for l in range(s["layers"]):
        p = f"model.layers.{l}."
        out += [
            (p + "self_attn.q_proj.weight", (s["heads"] * hd, e)),
            (p + "self_attn.k_proj.weight", (s["kv_heads"] * hd, e)),
            (p + "self_attn.v_proj.weight", (s["kv_heads"] * hd, e)),
            (p + "self_attn.o_proj.weight", (e, s["heads"] * hd)),
            (p + "mlp.gate_proj.weight", (i, e)),
            (p + "mlp.up_proj.weight", (i, e)),
            (p + "mlp.down_proj.weight", (e, i)),
            (p + "input_layernorm.weight", (e,)),
            (p + "post_attention_layernorm.weight", (e,)),
        ]
    out += [("model.norm.weight", (e,)), ("lm_head.weight", (v, e))]  # untied lm_head
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_bytes(s: dict) -> int:
    return sum(2 * numel(sh) for _, sh in llama_tensors(s))


def plan_shards(s: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split like transformers' ``max_shard_size``: start a new shard when the next tensor
    would overflow the current one (a tensor larger than the limit gets a shard of its own).
    As in the real Llama-3-8B checkpoint, one layer's q/k/v can end up in different shards."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in llama_tensors(s):
        nbytes = 2 * numel(shape)
        if shards[-1] and size + nbytes > s["shard_bytes"]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def hf_config(s: dict) -> dict:
    """A transformers ``config.json`` for LlamaForCausalLM (the real Meta-Llama-3-8B one for
    ``full``). Both ``torch_dtype`` (transformers < 4.56) and ``dtype`` (newer) are written."""
    big = s["vocab"] > 128001
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000 if big else 1,
        "eos_token_id": 128001 if big else 2,
        "head_dim": s["hidden"] // s["heads"],
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "max_position_embeddings": s["max_pos"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_EPS,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "transformers_version": "4.40.0",
        "use_cache": True,
        "vocab_size": s["vocab"],
    }


def litgpt_config(s: dict) -> dict:
    """LitGPT Config kwargs for the non-built-in scales, mirroring the built-in Llama-3-8B entry."""
    return dict(
        name=s["name"], hf_config=dict(org=s["org"], name=s["name"]),
        block_size=s["max_pos"], vocab_size=s["tokenizer_vocab"], padded_vocab_size=s["vocab"],
        n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"], n_query_groups=s["kv_heads"],
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
        norm_eps=RMS_EPS, mlp_class_name="LLaMAMLP", intermediate_size=s["intermediate"],
        rope_base=int(ROPE_THETA),
    )


# Placeholder side files. LitGPT's converters do not need a tokenizer, but a downloaded HF repo
# has these and a converter is expected to carry them over, so they are present (tiny, valid).
def side_files(s: dict) -> dict[str, object]:
    cfg = hf_config(s)
    return {
        "generation_config.json": {
            "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
            "transformers_version": cfg["transformers_version"],
        },
        "tokenizer_config.json": {
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "model_max_length": s["max_pos"], "tokenizer_class": "PreTrainedTokenizerFast",
            "comment": "placeholder written by weightport bench/bench_convert.py",
        },
        # A minimal but valid `tokenizers` WordLevel tokenizer (the real one is ~9 MB).
        "tokenizer.json": {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3},
                      "unk_token": "<unk>"},
        },
    }


# --------------------------------------------------------------------------------------------
# Sub-command _generate (torch venv): stream a random HF checkpoint to disk
# --------------------------------------------------------------------------------------------

def _generate(scale: str, out_dir: Path) -> None:
    import concurrent.futures

    import torch

    s = SCALES[scale]
    shards = plan_shards(s)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    chunk_elems = 16 * 1024 * 1024  # 32 MB of bf16 per generated chunk: keeps RSS ~100 MB
    # Writing a chunk (a syscall that releases the GIL) overlaps generating the next one.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pending = None
    t0 = time.perf_counter()
    for k, tensors in enumerate(shards):
        fname = shard_name(k, len(shards))
        # Same layout as the safetensors library writes: data in name order, contiguous offsets.
        tensors = sorted(tensors)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in tensors:
            nbytes = 2 * numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[name] = fname
        total += off
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)  # pad to 8 bytes, as the library does
        with open(out_dir / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for name, shape in tensors:
                # A seed per tensor (from its name): reproducible whatever the sharding.
                g = torch.Generator().manual_seed(SEED ^ zlib.crc32(name.encode()))
                n = numel(shape)
                # RMSNorm weights ~ 1 (as in a trained model), everything else ~ N(0, 0.02).
                mean = 1.0 if name.endswith("norm.weight") else 0.0
                for start in range(0, n, chunk_elems):
                    buf = torch.empty(min(chunk_elems, n - start), dtype=torch.bfloat16)
                    buf.normal_(mean, 0.02, generator=g)
                    raw = buf.view(torch.int16).numpy()  # little-endian bf16 bytes (x86)
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(f.write, raw)
            if pending is not None:
                pending.result()
                pending = None
        print(f"  wrote {fname} ({off / 1e9:.2f} GB, {len(tensors)} tensors) "
              f"t={time.perf_counter() - t0:.0f}s", flush=True)
    pool.shutdown()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(hf_config(s), indent=2) + "\n")
    for fname, content in side_files(s).items():
        (out_dir / fname).write_text(json.dumps(content, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Sub-commands _litgpt_* (LitGPT venv): LitGPT's own converters, unmodified
# --------------------------------------------------------------------------------------------

def _litgpt_hf2lit(ckpt_dir: Path, extra_config_json: str) -> None:
    # Non-built-in shapes: register the Config in the table Config.from_name looks at first, then
    # call the converter exactly as `litgpt convert_to_litgpt` does (name = directory name).
    extra = json.loads(extra_config_json)
    if extra:
        import litgpt.config

        litgpt.config.name_to_config[extra["name"]] = extra
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    convert_hf_checkpoint(checkpoint_dir=ckpt_dir)


def _litgpt_lit2hf(ckpt_dir: Path, out_dir: Path) -> None:
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    convert_lit_checkpoint(checkpoint_dir=ckpt_dir, output_dir=out_dir)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evict(path: Path) -> int:
    """Drop the (clean, after sync) page-cache pages of every file under ``path``, following
    symlinks to their targets. Returns the number of bytes advised."""
    os.sync()
    files = [path] if not path.is_dir() else [Path(r) / f for r, _d, fs in os.walk(path) for f in fs]
    total = 0
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)  # follows symlinks
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def dir_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(p):  # does not follow symlinked dirs; lstat on files
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def rm(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


class Sampler(threading.Thread):
    """Polls /proc/PID/status at 10 Hz for the peak anonymous / file-backed RSS of the direct
    child. (ru_maxrss is exact but cannot tell an anonymous buffer from a touched mmap page.)"""

    def __init__(self, pid: int, limit_kib: int | None = None):
        super().__init__(daemon=True)
        self.pid, self.stop, self.anon_kib, self.file_kib = pid, threading.Event(), 0, 0
        # a tool that would exhaust the machine is stopped here and reported, not left to the OOM killer
        self.limit_kib, self.killed = limit_kib, False

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self.stop.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.anon_kib = max(self.anon_kib, int(line.split()[1]))
                        elif line.startswith("RssFile:"):
                            self.file_kib = max(self.file_kib, int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                pass
            if self.limit_kib and self.anon_kib > self.limit_kib and not self.killed:
                self.killed = True
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
            self.stop.wait(0.1)


class Runner:
    def __init__(self, workdir: Path, cold: bool, disk_margin: int, repeat: int):
        self.repeat = repeat
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cold = cold
        self.margin = disk_margin
        self.workdir = workdir

    def need_space(self, nbytes: int, what: str) -> None:
        free = shutil.disk_usage(self.workdir).free
        if free < nbytes + self.margin:
            raise SystemExit(
                f"error: not enough free disk in {self.workdir} for {what}: need "
                f"{(nbytes + self.margin) / GIB:.1f} GiB (incl. {self.margin / GIB:.1f} GiB margin), "
                f"have {free / GIB:.1f} GiB. Free some space or use --workdir on a bigger disk.")

    def measure(self, label: str, argv: list[str], inputs, prime: list[list[str]], output: Path,
                limit_kib: int | None = None) -> dict:
        """Run argv ``--repeat`` times (deleting ``output`` between runs). Returns the run with the
        median wall+sync time, with the peak RSS of the worst run, and all runs under "runs"."""
        runs: list[dict] = []
        for k in range(self.repeat):
            if k:
                rm(output)
            runs.append(self._once(label + (f" #{k + 1}" if self.repeat > 1 else ""), argv, inputs, prime, limit_kib))
            if runs[-1]["rc"] != 0:
                return dict(runs[-1], runs=runs)
        med = sorted(runs, key=lambda r: r["total"])[(len(runs) - 1) // 2]
        return dict(med, runs=runs, **{k: max(r[k] for r in runs) for k in ("maxrss_kib", "anon_kib", "file_kib")})

    def _once(self, label: str, argv: list[str], inputs, prime: list[list[str]], limit_kib: int | None = None) -> dict:
        """Run argv once with ``inputs`` evicted from the page cache and the tool's code primed
        by the (unmeasured) ``prime`` commands; return wall/sync time, peak RSS, exit status."""
        logf = self.logs / (label.replace(" ", "_").replace("/", "-").replace("#", "") + ".log")
        for cmd in prime:  # failures do not matter here; the measured run will show them
            subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        if self.cold:
            for path in inputs if isinstance(inputs, list) else [inputs]:
                evict(path)
        else:
            os.sync()
        log(f"{label}: {shlex.join(argv)}")
        with open(logf, "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            sampler = Sampler(proc.pid, limit_kib)
            sampler.start()
            _pid, status, ru = os.wait4(proc.pid, 0)
            t1 = time.perf_counter()
            sampler.stop.set()
            proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
            os.sync()  # time until the output is durable (see module docstring)
            t2 = time.perf_counter()
        sampler.join()
        r = dict(label=label, argv=argv, rc=proc.returncode, wall=t1 - t0, sync=t2 - t1,
                 load1_end=float(open("/proc/loadavg").read().split()[0]),
                 total=t2 - t0, maxrss_kib=ru.ru_maxrss, anon_kib=sampler.anon_kib,
                 file_kib=sampler.file_kib, user=ru.ru_utime, sys=ru.ru_stime, log=str(logf),
                 killed_at_limit=sampler.killed)
        msg = (f"  -> rc={r['rc']} wall={r['wall']:.2f}s +sync {r['sync']:.2f}s "
               f"peak RSS {r['maxrss_kib'] / 2**20:.2f} GiB (anon {r['anon_kib'] / 2**20:.2f} GiB)")
        log(msg)
        if r["rc"] != 0:
            tail = logf.read_text(errors="replace").strip().splitlines()[-15:]
            log("  FAILED; last lines of " + str(logf) + ":\n      " + "\n      ".join(tail))
        return r

    def helper(self, label: str, argv: list[str]) -> str:
        """Run an unmeasured helper (generator / verifier); return its stdout, raise on failure."""
        logf = self.logs / (label + ".log")
        log(f"{label}: {shlex.join(argv)}")
        with open(logf, "wb") as out:
            rc = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        text = logf.read_text(errors="replace")
        if rc != 0:
            raise RuntimeError(f"{label} failed (rc={rc}); see {logf}:\n" + "\n".join(text.splitlines()[-20:]))
        return text


def convert_cmd(wp: list[str], args, *rest: str) -> list[str]:
    """A measured `weightport convert`, with --weightport-extra."""
    return wp + ["convert", *shlex.split(args.weightport_extra), *rest]


def verify(runner: Runner, wp: list[str], prime: list[list[str]], label: str, a: Path, b: Path,
           formats: tuple[str, str]) -> dict:
    """`weightport verify A B --tensors-only`, measured like a conversion: every tensor through the
    hub, bit for bit. Exit code 0 means equivalent; the JSON report says what differed."""
    report = runner.workdir / "logs" / f"verify-{label}.json"
    argv = wp + ["verify", str(a), str(b), "--from-a", formats[0], "--from-b", formats[1], "--tensors-only",
                 "--report", str(report)]
    m = runner.measure("verify " + label, argv, [a, b], prime, report)
    try:
        data = json.loads(report.read_text())
        m.update(ok=m["rc"] == 0, counts=data["tensors"]["counts"],
                 differing=[i for i in data["tensors"]["items"] if i["status"] not in ("exact", "cast")][:5])
    except (OSError, ValueError, KeyError) as e:  # no report: the failure is in the log
        m.update(ok=False, error=str(e).splitlines()[0][:300])
    log(f"  verify {label}: {'equivalent' if m['ok'] else 'NOT EQUIVALENT/ERROR'} {m.get('counts', '')}")
    return m


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def shebang_python(exe: str) -> str | None:
    """The interpreter of a Python console script (to prime its imports), if it is one."""
    path = shutil.which(exe) or exe
    try:
        with open(path, "rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        return shlex.split(first[2:])[0]
    return None


def capture(argv: list[str]) -> str:
    """stdout of a quick informational command, or "" if it fails."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        return r.stdout.strip() if r.returncode == 0 else ""
    except Exception:
        return ""


def weightport_source(args) -> dict:
    """Where the measured weightport is imported from and its git commit. Dirty means the checkout's
    src/ differs from that commit (this script itself may be newer; it does not change what is measured)."""
    if args.skip_weightport:
        return {"weightport_git": "", "weightport_file": ""}
    wp = shlex.split(args.weightport_cmd)
    py = wp[0] if Path(wp[0]).name.startswith("python") else shebang_python(wp[0])
    where = capture([py, "-c", "import weightport; print(weightport.__file__)"]) if py else ""
    git = ""
    if where:
        d = str(Path(where).parent)
        commit = capture(["git", "-C", d, "rev-parse", "--short", "HEAD"])
        if commit:
            top = capture(["git", "-C", d, "rev-parse", "--show-toplevel"])
            dirty = capture(["git", "-C", top, "status", "--porcelain", "--", "src"]) if top else ""
            git = commit + ("-dirty (src/ has uncommitted changes)" if dirty else "")
    return {"weightport_git": git, "weightport_file": where}


def machine_facts(args, cold: bool) -> dict:
    dirty = {k: open(f"/proc/sys/vm/{k}").read().strip() for k in ("dirty_ratio", "dirty_background_ratio")}
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    wp_ver = capture(shlex.split(args.weightport_cmd) + ["--version"]) if not args.skip_weightport else ""
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(), "cpu": cpu, "ram_gib": mem_kib / 2**20,
        "kernel": platform.release(), "python": platform.python_version(),
        "torch": capture([args.torch_python, "-c", "import torch; print(torch.__version__)"]),
        "safetensors": capture([args.torch_python, "-c", "import safetensors; print(safetensors.__version__)"]),
        "litgpt": capture([args.litgpt_python, "-c", "import importlib.metadata as m; print(m.version('litgpt'))"]),
        "litgpt_torch": capture([args.litgpt_python, "-c", "import torch; print(torch.__version__)"]),
        "weightport": wp_ver.splitlines()[0] if wp_ver else "",
        **weightport_source(args),
        "cp": capture(["cp", "--version"]).splitlines()[0] if capture(["cp", "--version"]) else "",
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "cache": ("input cold: `sync` + `posix_fadvise(DONTNEED)` on every input file before each measured "
                  "command; tool code warm (an unmeasured import/`--help` of the same tool just before)"
                  if cold else "NOT evicted (--warm): `sync` only before each command; the input may be "
                  "partly in the page cache"),
        "dirty": f"vm.dirty_ratio {dirty['dirty_ratio']}, vm.dirty_background_ratio {dirty['dirty_background_ratio']}",
        "disk_free_gib": shutil.disk_usage(args.workdir).free / GIB,
    }


def run_benchmark(args) -> None:
    s = SCALES[args.scale]
    mbytes = model_bytes(s)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cold = not args.warm
    rm(workdir / "logs")  # logs of the previous run
    runner = Runner(workdir, cold, disk_margin=max(GIB, int(0.03 * mbytes)), repeat=args.repeat)
    py = args.torch_python
    wp = shlex.split(args.weightport_cmd)
    # Unmeasured commands that load each tool's code into the page cache (see docstring).
    prime_cp = [["cp", "--version"]]
    prime_wp = [shlex.split(args.weightport_cmd) + ["--help"]]
    wp_py = wp[0] if Path(wp[0]).name.startswith("python") else shebang_python(wp[0])
    if wp_py:
        prime_wp.append([wp_py, "-c", "import torch, safetensors"])
    prime_lit = [[args.litgpt_python, "-c",
                  "import litgpt.scripts.convert_hf_checkpoint, litgpt.scripts.convert_lit_checkpoint"]]

    # Layout. The HF directory name is what LitGPT resolves the config from.
    hf_dir = workdir / "hf" / s["org"] / s["name"]
    stamp = hf_dir / ".bench-complete"
    out = workdir / "out"  # everything under here is temporary
    lit_wp = out / "lit-weightport"  # weightport's LitGPT output, kept as the Lit->HF input
    lit_ref = out / "litgpt-hf2lit" / s["org"] / s["name"]  # symlinks to HF + LitGPT's output
    saved_yaml = out / "litgpt-model_config.yaml"

    # Disk: source + kept LitGPT checkpoint + one output under test, at most, at any time.
    have_hf = stamp.is_file() and stamp.read_text().strip() == args.scale
    if out.exists():
        rm(out)
    runner.need_space((0 if have_hf else mbytes) + 2 * mbytes, "the whole run (3 model-sized trees)")
    facts = machine_facts(args, cold)
    log(f"scale={args.scale}: {len(llama_tensors(s))} tensors, {human(mbytes)} in "
        f"{len(plan_shards(s))} shards; workdir {workdir}; cache {'cold' if cold else 'warm'}; "
        f"{facts['disk_free_gib']:.1f} GiB free")
    out.mkdir(parents=True)
    results: dict = {"scale": args.scale, "repeat": args.repeat, "model_bytes": mbytes, "facts": facts, "hf2lit": {},
                     "lit2hf": {}, "ms": {}, "nt": {}, "lora": {}, "verify": {}, "notes": []}
    try:
        # 1. The source checkpoint (reused if a previous --keep run left a complete one).
        if have_hf:
            log(f"reusing {hf_dir}")
        else:
            rm(hf_dir)
            t = time.perf_counter()
            runner.helper("generate", [py, str(THIS), "_generate", args.scale, str(hf_dir)])
            stamp.write_text(args.scale + "\n")
            os.sync()
            log(f"generated {hf_dir} in {time.perf_counter() - t:.0f}s")
            results["generate_s"] = time.perf_counter() - t

        # 2. HF -> LitGPT
        r = results["hf2lit"]
        runner.need_space(mbytes, "cp -r of the HF checkpoint")
        r["cp"] = runner.measure("hf2lit cp", ["cp", "-r", str(hf_dir), str(out / "cp-hf")], hf_dir, prime_cp, out / "cp-hf")
        rm(out / "cp-hf")

        if not args.skip_weightport:
            runner.need_space(mbytes, "weightport's LitGPT output")
            r["weightport"] = runner.measure("hf2lit weightport",
                                             convert_cmd(wp, args, str(hf_dir), str(lit_wp), "--to", "litgpt"), hf_dir, prime_wp, lit_wp)
            if r["weightport"]["rc"] != 0:
                rm(lit_wp)

        if not args.skip_litgpt:
            # LitGPT writes lit_model.pth and model_config.yaml INTO the checkpoint dir: give it a
            # directory (with the same name, for the config lookup) of symlinks to the source files.
            lit_ref.mkdir(parents=True)
            for f in hf_dir.iterdir():
                if not f.name.startswith("."):
                    os.symlink(f, lit_ref / f.name)
            runner.need_space(mbytes, "LitGPT's lit_model.pth")
            extra = "{}" if s["litgpt_builtin"] else json.dumps(litgpt_config(s))
            r["litgpt"] = runner.measure("hf2lit litgpt", [args.litgpt_python, str(THIS), "_litgpt_hf2lit",
                                                           str(lit_ref), extra], hf_dir, prime_lit,
                                   lit_ref / "lit_model.pth")
            if (lit_ref / "model_config.yaml").is_file():
                shutil.copy(lit_ref / "model_config.yaml", saved_yaml)
            if args.verify and r["litgpt"]["rc"] == 0 and (lit_wp / "lit_model.pth").is_file():
                results["verify"]["weightport's LitGPT output vs LitGPT's"] = verify(
                    runner, wp, prime_wp, "hf2lit", lit_ref, lit_wp, ("litgpt", "litgpt"))

        # The LitGPT checkpoint both tools convert back: weightport's output when there is one
        # (that round trip is the point of the tool), else LitGPT's own.
        if (lit_wp / "lit_model.pth").is_file():
            lit_dir = lit_wp
            if lit_ref.exists():
                rm(lit_ref.parent.parent)
        elif (lit_ref / "lit_model.pth").is_file():
            lit_dir = out / "lit-litgpt"
            lit_dir.mkdir()
            for f in lit_ref.iterdir():  # keep only real files (drop the symlinks to the HF files)
                if not f.is_symlink():
                    f.rename(lit_dir / f.name)
            rm(lit_ref.parent.parent)
            results["notes"].append("LitGPT -> HF input is LitGPT's own lit_model.pth (no weightport output).")
        else:
            lit_dir = None
            results["notes"].append("No LitGPT checkpoint was produced, so LitGPT -> HF was not run.")
        results["lit2hf_input"] = str(lit_dir)

        # 3. LitGPT -> HF
        if lit_dir is not None:
            r = results["lit2hf"]
            lit_bytes = dir_bytes(lit_dir)
            runner.need_space(lit_bytes, "cp -r of the LitGPT checkpoint")
            r["cp"] = runner.measure("lit2hf cp", ["cp", "-r", str(lit_dir), str(out / "cp-lit")], lit_dir, prime_cp, out / "cp-lit")
            rm(out / "cp-lit")

            if not args.skip_weightport:
                runner.need_space(lit_bytes, "weightport's HF output")
                hf_back = out / "hf-weightport"
                r["weightport"] = runner.measure("lit2hf weightport",
                                                 convert_cmd(wp, args, str(lit_dir), str(hf_back), "--to", "hf"), lit_dir, prime_wp, hf_back)
                if args.verify and r["weightport"]["rc"] == 0:
                    results["verify"]["weightport's HF output vs the source HF"] = verify(
                        runner, wp, prime_wp, "lit2hf-wp", hf_dir, hf_back, ("hf", "hf"))
                rm(hf_back)

            if not args.skip_litgpt:
                # convert_lit_checkpoint needs model_config.yaml next to lit_model.pth. Use
                # LitGPT's own yaml when we have it, else the one in the input directory.
                lit_in = out / "litgpt-lit2hf-in"
                lit_in.mkdir()
                os.symlink(lit_dir / "lit_model.pth", lit_in / "lit_model.pth")
                yaml_src = saved_yaml if saved_yaml.is_file() else lit_dir / "model_config.yaml"
                if yaml_src.is_file():
                    shutil.copy(yaml_src, lit_in / "model_config.yaml")
                runner.need_space(lit_bytes, "LitGPT's model.pth")
                lit_back = out / "hf-litgpt"
                r["litgpt"] = runner.measure("lit2hf litgpt", [args.litgpt_python, str(THIS), "_litgpt_lit2hf",
                                                               str(lit_in), str(lit_back)], lit_in, prime_lit, lit_back)
                if args.verify and r["litgpt"]["rc"] == 0:
                    # LitGPT writes a flat HF-named state dict as model.pth with no config: give it
                    # the names transformers would look for, so weightport reads it as hf
                    (lit_back / "model.pth").rename(lit_back / "pytorch_model.bin")
                    shutil.copy(hf_dir / "config.json", lit_back / "config.json")
                    results["verify"]["LitGPT's HF output vs the source HF"] = verify(
                        runner, wp, prime_wp, "lit2hf-litgpt", hf_dir, lit_back, ("hf", "hf"))
                rm(lit_back)
                rm(lit_in)

        # 4. HF -> MindSpore .ckpt (weightport, MindFormers' own converter) -> HF (weightport)
        if not args.skip_mindspore:
            if lit_dir is not None:
                rm(lit_dir)  # done with it; the disk is needed for two .ckpt files
            run_mindspore(runner, args, results, hf_dir, out, wp, prime_wp, mbytes)

        # 5. HF -> Nanotron (TP=2) -> HF (weightport; Nanotron's own converter cannot run here)
        if not args.skip_nanotron and not args.skip_weightport:
            if lit_dir is not None:
                rm(lit_dir)
            run_nanotron(runner, args, results, hf_dir, out, wp, prime_wp, mbytes)

        # 6. HF + a rank-64 PEFT LoRA adapter -> merged HF (weightport; PEFT's own merge_and_unload)
        if not args.skip_lora and not args.skip_weightport:
            if lit_dir is not None:
                rm(lit_dir)
            run_lora(runner, args, results, hf_dir, out, wp, prime_wp, mbytes)
    finally:
        results["facts"]["disk_free_gib_end"] = shutil.disk_usage(workdir).free / GIB
        results["facts"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        if not args.keep:
            rm(out)
            rm(workdir / "hf")
        (workdir / f"results-{args.scale}.json").write_text(json.dumps(results, indent=2) + "\n")

    report = render_report(results, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log(f"wrote {args.output} (raw numbers: {workdir / f'results-{args.scale}.json'})")
    print(report)


# MindFormers' converter holds the whole model at least twice; past this it is stopped and
# reported instead of pushing the machine into the OOM killer
MEMORY_GUARD_KIB = 20 * 2**20


def run_mindspore(runner: Runner, args, results: dict, hf_dir: Path, out: Path, wp: list[str],
                  prime_wp: list[list[str]], mbytes: int) -> None:
    r = results["ms"]
    py = args.torch_python
    ms_wp, back = out / "ms-weightport", out / "hf-from-ms"
    if not args.skip_weightport:
        runner.need_space(mbytes, "weightport's .ckpt")
        r["hf2ms weightport"] = runner.measure("hf2ms weightport", convert_cmd(wp, args, str(hf_dir), str(ms_wp), "--to",
                                                                          "mindspore"), hf_dir, prime_wp, ms_wp)
    if not args.skip_mindformers:
        ref_dir = out / "ms-mindformers"
        ref_dir.mkdir()
        runner.need_space(mbytes, "MindFormers' .ckpt")
        peer = [py, str(REPO / "tests" / "peers" / "mindformers_peer.py"), "convert-llama", str(hf_dir),
                str(ref_dir / "model.ckpt")]
        r["hf2ms mindformers"] = runner.measure("hf2ms mindformers", peer, hf_dir,
                                                [[py, "-c", "import mindspore, transformers"]], ref_dir / "model.ckpt",
                                                limit_kib=MEMORY_GUARD_KIB)
        ok = r["hf2ms mindformers"]["rc"] == 0 and (ms_wp / "model.ckpt").is_file()
        if args.verify and ok:
            shutil.copy(hf_dir / "config.json", ref_dir / "config.json")  # MindFormers writes the .ckpt alone
            results["verify"]["weightport's .ckpt vs MindFormers'"] = verify(
                runner, wp, prime_wp, "hf2ms-mindformers", ref_dir, ms_wp, ("mindspore", "mindspore"))
        rm(ref_dir)
    if not (ms_wp / "model.ckpt").is_file():
        return
    if args.verify:
        results["verify"]["weightport's .ckpt vs the source HF"] = verify(
            runner, wp, prime_wp, "hf2ms", hf_dir, ms_wp, ("hf", "mindspore"))
    runner.need_space(mbytes, "cp -r of the .ckpt directory")
    r["cp .ckpt"] = runner.measure("ms2hf cp", ["cp", "-r", str(ms_wp), str(out / "cp-ms")], ms_wp, [["cp", "--version"]],
                                   out / "cp-ms")
    rm(out / "cp-ms")
    runner.need_space(mbytes, "weightport's HF output from the .ckpt")
    r["ms2hf weightport"] = runner.measure("ms2hf weightport", convert_cmd(wp, args, str(ms_wp), str(back), "--to", "hf"),
                                           ms_wp, prime_wp, back)
    if args.verify and r["ms2hf weightport"]["rc"] == 0:
        results["verify"]["weightport's HF output from the .ckpt vs the source HF"] = verify(
            runner, wp, prime_wp, "ms2hf", hf_dir, back, ("hf", "hf"))
    rm(back)
    rm(ms_wp)


NANOTRON_TP = 2
NANOTRON_PEER_NOTE = ("not run: needs `torchrun`, CUDA and flash-attn (this machine has no GPU)")


def run_nanotron(runner: Runner, args, results: dict, hf_dir: Path, out: Path, wp: list[str],
                 prime_wp: list[list[str]], mbytes: int) -> None:
    """weightport HF -> Nanotron at TP=2 and that Nanotron checkpoint back to HF, each against `cp -r`
    of its own input, with the round trip (and the Nanotron checkpoint itself) verified against the
    source. Nanotron's converter (examples/llama/convert_hf_to_nanotron.py) builds the model under
    torchrun with CUDA and flash-attn, so it has no row with a number."""
    r = results["nt"]
    nt_wp, back = out / "nanotron-weightport", out / "hf-from-nanotron"
    runner.need_space(mbytes, "weightport's Nanotron checkpoint")
    r["hf2nt weightport"] = runner.measure(
        "hf2nt weightport", convert_cmd(wp, args, str(hf_dir), str(nt_wp), "--to", "nanotron", "--tp", str(NANOTRON_TP)),
        hf_dir, prime_wp, nt_wp)
    if r["hf2nt weightport"]["rc"] != 0 or not (nt_wp / "model").is_dir():
        rm(nt_wp)
        return
    r["nt_files"] = sum(1 for _r, _d, fs in os.walk(nt_wp / "model") for f in fs if f.endswith(".safetensors"))
    r["nt_bytes"] = dir_bytes(nt_wp)
    if args.verify:
        results["verify"][f"weightport's Nanotron (TP={NANOTRON_TP}) vs the source HF"] = verify(
            runner, wp, prime_wp, "hf2nt", hf_dir, nt_wp, ("hf", "nanotron"))
    runner.need_space(r["nt_bytes"], "cp -r of the Nanotron directory")
    r["cp nanotron"] = runner.measure("nt2hf cp", ["cp", "-r", str(nt_wp), str(out / "cp-nt")], nt_wp,
                                      [["cp", "--version"]], out / "cp-nt")
    rm(out / "cp-nt")
    runner.need_space(mbytes, "weightport's HF output from the Nanotron checkpoint")
    r["nt2hf weightport"] = runner.measure("nt2hf weightport", convert_cmd(wp, args, str(nt_wp), str(back), "--to", "hf"),
                                           nt_wp, prime_wp, back)
    if args.verify and r["nt2hf weightport"]["rc"] == 0:
        results["verify"]["weightport's HF output from the Nanotron checkpoint vs the source HF"] = verify(
            runner, wp, prime_wp, "nt2hf", hf_dir, back, ("hf", "hf"))
    rm(back)
    rm(nt_wp)


LORA_RANK, LORA_ALPHA = 64, 128
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_lora(runner: Runner, args, results: dict, hf_dir: Path, out: Path, wp: list[str],
             prime_wp: list[list[str]], mbytes: int) -> None:
    """weightport merging a rank-64 PEFT adapter on every linear layer while converting HF -> HF,
    against `cp -r` of the base, and PEFT's own merge_and_unload (transformers loads the whole model)."""
    r = results["lora"]
    adapter = out / "lora-adapter"
    runner.helper("lora adapter", [args.torch_python, str(THIS), "_lora_adapter", args.scale, str(adapter)])
    r["adapter_bytes"] = dir_bytes(adapter)
    merged = out / "hf-merged-weightport"
    runner.need_space(mbytes, "weightport's merged output")
    r["weightport"] = runner.measure("lora weightport", convert_cmd(wp, args, str(hf_dir), str(merged), "--to", "hf",
                                                             "--merge-lora", str(adapter)),
                                     [hf_dir, adapter], prime_wp, merged)
    rm(merged)
    if not args.skip_peft:
        theirs = out / "hf-merged-peft"
        runner.need_space(mbytes, "PEFT's merged output")
        r["peft"] = runner.measure("lora peft", [args.torch_python, str(THIS), "_peft_merge", str(hf_dir), str(adapter),
                                                 str(theirs)], [hf_dir, adapter],
                                   [[args.torch_python, "-c", "import peft, transformers"]], theirs,
                                   limit_kib=MEMORY_GUARD_KIB)
        rm(theirs)
    rm(adapter)


def _lora_adapter(scale: str, out_dir: Path) -> None:
    """A PEFT adapter (adapter_config.json + adapter_model.safetensors, bf16) of rank LORA_RANK on
    every linear layer of the benchmark model, A and B both ~ N(0, 0.02)."""
    import torch
    from safetensors.torch import save_file

    s = SCALES[scale]
    H, I, kv = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
    shapes = {"q_proj": (H, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, H),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    g = torch.Generator().manual_seed(SEED)
    tensors = {}
    for layer in range(s["layers"]):
        for proj in LORA_TARGETS:
            out_f, in_f = shapes[proj]
            mod = f"base_model.model.model.layers.{layer}.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}"
            tensors[f"{mod}.lora_A.weight"] = (0.02 * torch.randn(LORA_RANK, in_f, generator=g)).bfloat16()
            tensors[f"{mod}.lora_B.weight"] = (0.02 * torch.randn(out_f, LORA_RANK, generator=g)).bfloat16()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": list(LORA_TARGETS),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "task_type": "CAUSAL_LM", "base_model_name_or_path": None}, indent=2))


def _peft_merge(base: Path, adapter: Path, out_dir: Path) -> None:
    """PEFT's own way: load the base with transformers, apply the adapter, merge_and_unload, save."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


TARGETS = dict(time_vs_cp=1.5, rss_gib=2.0, speedup_vs_litgpt=2.0, rss_vs_litgpt=5.0)


def render_report(res: dict, args) -> str:
    s, f = SCALES[res["scale"]], res["facts"]
    gib = lambda kib: kib / 2**20  # noqa: E731
    L: list[str] = []
    L.append("# Conversion benchmark: weightport vs `cp -r` and the peers' own converters (LitGPT, MindFormers)\n")
    L.append(f"Generated by `bench/bench_convert.py --scale {res['scale']}` on {f['date']}. "
             "Re-run with `python3 bench/bench_convert.py` (see its docstring).\n")
    if res["scale"] == "small":
        L.append("> **Scale `small` is a smoke test, not the benchmark.** Start-up costs "
                 "(Python + torch imports) dominate at this size, so the ratios and target verdicts "
                 "below say nothing about a real model. Run `--scale full` for the real numbers.\n")
    elif res["scale"] != "full":
        L.append(f"> **Scale `{res['scale']}` is a reduced model ({s['layers']} of 32 layers), not the "
                 "benchmark.** Tensor sizes are real, so the ratios are indicative, but start-up costs weigh "
                 "more and LitGPT's memory (which grows with the shard size) is lower than at full scale. "
                 "Run `--scale full` for the real numbers.\n")
    shards = plan_shards(s)
    L.append(f"Checkpoint: random bf16 (N(0, 0.02); RMSNorm weights N(1, 0.02)), "
             f"{'Meta-Llama-3-8B' if res['scale'] == 'full' else 'Llama'} shape: hidden {s['hidden']}, "
             f"{s['layers']} layers, {s['heads']} heads / {s['kv_heads']} kv heads, intermediate "
             f"{s['intermediate']}, vocab {s['vocab']}, untied lm_head; "
             f"{human(res['model_bytes'])} in {len(shards)} safetensors shards "
             f"(≤ {human(s['shard_bytes'])} each).\n")

    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    rows = [
        ("date", f["date"]), ("CPU", f"{f['cores']} cores, {f['cpu']}"), ("RAM", f"{f['ram_gib']:.1f} GiB"),
        ("kernel / python", f"{f['kernel']} / {f['python']}"),
        ("torch (weightport venv)", f["torch"]), ("safetensors", f["safetensors"]),
        ("litgpt (its own venv, torch " + f["litgpt_torch"] + ")", f["litgpt"]),
        ("weightport", (f["weightport"] or "?") + (f" (git {f['weightport_git']})" if f["weightport_git"] else "")),
        ("weightport command", f"`{args.weightport_cmd}`"
         + (f" (imports `{f['weightport_file']}`)" if f.get("weightport_file") else "")), ("cp", f["cp"]),
        ("page cache", f["cache"]), ("writeback", f["dirty"]), ("load average at start", " ".join(f["loadavg"])),
        ("load average at end", " ".join(f.get("loadavg_end", ["?"]))),
        ("1-min load average when each measured command ended", _load_summary(res)),
        ("free disk at start", f"{f['disk_free_gib']:.1f} GiB"),
    ]
    L += [f"| {k} | {v} |" for k, v in rows]
    L.append("")

    verdicts: dict = {}
    for key, title in (("hf2lit", "HF safetensors → LitGPT `lit_model.pth`"),
                       ("lit2hf", "LitGPT `lit_model.pth` → HF")):
        r = res[key]
        L.append(f"## {title}\n")
        if not r:
            L.append("Not run. " + " ".join(res["notes"]) + "\n")
            continue
        cp = r.get("cp")
        names = {"cp": "`cp -r`", "weightport": "weightport", "litgpt": "LitGPT"}
        L += _table([(names[tool], r.get(tool), cp) for tool in ("cp", "weightport", "litgpt")])
        wpm, ltm = r.get("weightport"), r.get("litgpt")
        ok = lambda m: m is not None and m["rc"] == 0  # noqa: E731
        v = verdicts[key] = {}
        if ok(wpm) and cp and cp["rc"] == 0:
            v["time_vs_cp"] = wpm["total"] / cp["total"]
        if ok(wpm):
            v["rss_gib"] = gib(wpm["maxrss_kib"])
        if ok(wpm) and ok(ltm):
            v["speedup_vs_litgpt"] = ltm["total"] / wpm["total"]
            v["rss_vs_litgpt"] = ltm["maxrss_kib"] / wpm["maxrss_kib"]
            L.append(f"\nweightport vs LitGPT: **{v['speedup_vs_litgpt']:.2f}× faster** (wall+sync), "
                     f"**{v['rss_vs_litgpt']:.2f}× less peak RSS**.")
        L.append("")

    ms = res.get("ms") or {}
    if ms:
        L.append("## HF → MindSpore `.ckpt` → HF\n")
        hf_cp, ms_cp = res["hf2lit"].get("cp"), ms.get("cp .ckpt")
        L += _table([("`cp -r` of the HF directory (from the first section)", hf_cp, hf_cp),
                     ("weightport HF → .ckpt", ms.get("hf2ms weightport"), hf_cp),
                     ("MindFormers `convert_weight` (llama) HF → .ckpt", ms.get("hf2ms mindformers"), hf_cp),
                     ("`cp -r` of the .ckpt directory", ms_cp, ms_cp),
                     ("weightport .ckpt → HF", ms.get("ms2hf weightport"), ms_cp)])
        for key, text in (("hf2ms weightport", "HF → .ckpt"), ("ms2hf weightport", ".ckpt → HF")):
            m = ms.get(key)
            if m and m["rc"] == 0:
                peak = m["maxrss_kib"] / 2**20
                L.append(f"- weightport {text} peak RSS ≤ 2 GiB: {peak:.2f} GiB — {'met' if peak <= 2 else '**missed**'}")
        mf = ms.get("hf2ms mindformers")
        if mf and mf.get("killed_at_limit"):
            L.append(f"\nMindFormers' converter was stopped when its anonymous memory passed "
                     f"{MEMORY_GUARD_KIB / 2**20:.0f} GiB (it loads the whole model with transformers, then "
                     "builds every MindSpore tensor before saving), so it has no time.")
        L.append("\nMindFormers' converter is run by `tests/peers/mindformers_peer.py` (mindformers 2.0.0's "
                 "unmodified `convert_pt_to_ms`, with MindSpore 2.10). Only its forward converter is run; its reverse "
                 "(`convert_ms_to_pt`, which writes a bare torch pickle rather than a Hugging Face checkpoint) is not "
                 "benchmarked.\n")

    nt = res.get("nt") or {}
    if nt:
        tp = NANOTRON_TP
        L.append(f"## HF → Nanotron (TP={tp}) → HF\n")
        hf_cp, nt_cp = res["hf2lit"].get("cp"), nt.get("cp nanotron")
        L += _table([("`cp -r` of the HF directory (from the first section)", hf_cp, hf_cp),
                     (f"weightport HF → Nanotron TP={tp}", nt.get("hf2nt weightport"), hf_cp),
                     ("Nanotron `examples/llama/convert_hf_to_nanotron.py`", NANOTRON_PEER_NOTE, None),
                     ("`cp -r` of the Nanotron directory", nt_cp, nt_cp),
                     ("weightport Nanotron → HF", nt.get("nt2hf weightport"), nt_cp)])
        L.append("")
        for key, text in (("hf2nt weightport", f"HF → Nanotron TP={tp}"), ("nt2hf weightport", "Nanotron → HF")):
            m = nt.get(key)
            if m and m["rc"] == 0:
                peak = m["maxrss_kib"] / 2**20
                L.append(f"- weightport {text} peak RSS ≤ 2 GiB: {peak:.2f} GiB — {'met' if peak <= 2 else '**missed**'}")
        if nt.get("nt_files"):
            L.append(f"\nweightport's Nanotron checkpoint: `model/` tree of {nt['nt_files']} safetensors files "
                     f"(one per parameter and TP rank), {human(nt['nt_bytes'])} in all. "
                     f"`convert --to nanotron --tp {tp}`, default layout (rotate-half, `rope_interleaved: false`); the `cp -r` ratio of the reverse "
                     "direction is against copying that tree.")
        L.append("\nNanotron's own converter (`examples/llama/convert_hf_to_nanotron.py` in huggingface/nanotron) "
                 "builds the model on GPU under `torchrun` and needs CUDA and flash-attn, so it cannot run on this "
                 "CPU-only machine and has no number.\n")

    lora = res.get("lora") or {}
    if lora:
        L.append(f"## HF + rank-{LORA_RANK} LoRA → merged HF\n")
        hf_cp = res["hf2lit"].get("cp")
        L += _table([("`cp -r` of the HF directory (from the first section)", hf_cp, hf_cp),
                     ("weightport `convert --to hf --merge-lora`", lora.get("weightport"), hf_cp),
                     ("PEFT `merge_and_unload` (transformers loads the model)", lora.get("peft"), hf_cp)])
        L.append("")
        m = lora.get("weightport")
        if m and m["rc"] == 0:
            peak = m["maxrss_kib"] / 2**20
            L.append(f"- weightport merge peak RSS ≤ 2 GiB: {peak:.2f} GiB — {'met' if peak <= 2 else '**missed**'}")
        L.append(f"\nAdapter: PEFT, rank {LORA_RANK}, alpha {LORA_ALPHA}, on {', '.join(LORA_TARGETS)} of every layer, "
                 f"bf16, {human(lora.get('adapter_bytes', 0))}; generated, not timed. weightport merges each weight in "
                 "float32 and writes bf16; PEFT adds a bf16 delta to the bf16 weight, so the two can differ in the last "
                 "bf16 bit (the tests compare them exactly in float32).\n")

    L.append("## Targets\n")
    L.append("| target | HF → LitGPT | LitGPT → HF |\n|---|---|---|")
    spec = [
        ("time_vs_cp", f"weightport wall+sync ≤ {TARGETS['time_vs_cp']}× `cp -r`", "{:.2f}×", lambda x: x <= TARGETS["time_vs_cp"]),
        ("rss_gib", f"weightport peak RSS ≤ {TARGETS['rss_gib']:g} GiB", "{:.2f} GiB", lambda x: x <= TARGETS["rss_gib"]),
        ("speedup_vs_litgpt", f"weightport ≥ {TARGETS['speedup_vs_litgpt']:g}× faster than LitGPT", "{:.2f}×", lambda x: x >= TARGETS["speedup_vs_litgpt"]),
        ("rss_vs_litgpt", f"weightport ≥ {TARGETS['rss_vs_litgpt']:g}× less peak RSS than LitGPT", "{:.2f}×", lambda x: x >= TARGETS["rss_vs_litgpt"]),
    ]
    for key, text, fmt, good in spec:
        cells = []
        for d in ("hf2lit", "lit2hf"):
            x = verdicts.get(d, {}).get(key)
            cells.append("n/a" if x is None else f"{fmt.format(x)} — {'met' if good(x) else '**missed**'}")
        L.append(f"| {text} | {cells[0]} | {cells[1]} |")
    if res["scale"] != "full":
        L.append(f"\n(Verdicts at scale `{res['scale']}` are not the benchmark's; see the note at the top.)")
    L.append("")

    L.append("## Correctness: `weightport verify --tensors-only`, measured\n")
    if res["verify"]:
        L.append("Every tensor of both checkpoints mapped to Hugging Face names and layouts and compared bit "
                 "for bit, streaming; both inputs evicted from the page cache first.\n")
        L.append("| A vs B | verdict | tensors | wall+sync s | peak RSS GiB | peak anon RSS GiB |")
        L.append("|---|---|---|---:|---:|---:|")
        for k, v in res["verify"].items():
            counts = ", ".join(f"{n} {c}" for c, n in sorted(v.get("counts", {}).items())) or v.get("error", "")
            verdict = "equivalent" if v.get("ok") else f"**NOT equivalent** {json.dumps(v.get('differing', []))[:300]}"
            L.append(f"| {k} | {verdict} | {counts} | {v['total']:.1f} | {gib(v['maxrss_kib']):.2f} | "
                     f"{gib(v['anon_kib']):.2f} |")
    else:
        L.append("- not checked (`--no-verify`, or there was nothing to compare)")
    for n in res["notes"]:
        L.append(f"- note: {n}")
    L.append("")

    L.append("## Method\n")
    L.append(textwrap_method(res))
    return "\n".join(L) + "\n"


def _load_summary(res: dict) -> str:
    """Range of the 1-min load average at the end of the measured commands (other work on the
    machine slows the tools down; more than the core count means they waited for a CPU)."""
    loads = [m["load1_end"] for sec in ("hf2lit", "lit2hf", "ms", "nt", "lora", "verify")
             for m in (res.get(sec) or {}).values() if isinstance(m, dict) and "load1_end" in m]
    return f"{min(loads):.2f}–{max(loads):.2f} ({os.cpu_count()} cores)" if loads else "?"


def _table(rows: list[tuple[str, dict | None, dict | None]]) -> list[str]:
    """Markdown rows of (name, measurement, the cp -r measurement its ratio is against)."""
    gib = lambda kib: kib / 2**20  # noqa: E731
    L = ["| tool | wall s | sync after s | wall+sync s | × `cp -r` | peak RSS GiB | peak anon RSS GiB (10 Hz) | user+sys CPU s |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m, cp in rows:
        if m is None:
            L.append(f"| {name} | skipped | | | | | | |")
            continue
        if isinstance(m, str):  # a tool that cannot be run here: say why instead of a number
            L.append(f"| {name} | {m} | | | | | | |")
            continue
        if m["rc"] != 0:
            why = "stopped at the memory guard" if m.get("killed_at_limit") else f"exit {m['rc']}"
            L.append(f"| {name} | **failed** ({why}, log `{Path(m['log']).name}`) | | | | "
                     f"{gib(m['maxrss_kib']):.2f} | {gib(m['anon_kib']):.2f} | |")
            continue
        ratio = f"{m['total'] / cp['total']:.2f}" if cp and cp["rc"] == 0 else "?"
        tot = f"{m['total']:.1f}"
        if len(m.get("runs", [])) > 1:
            ts = [x["total"] for x in m["runs"]]
            tot += f" ({min(ts):.1f}–{max(ts):.1f})"
        L.append(f"| {name} | {m['wall']:.1f} | {m['sync']:.1f} | {tot} | {ratio} | "
                 f"{gib(m['maxrss_kib']):.2f} | {gib(m['anon_kib']):.2f} | {m['user'] + m['sys']:.1f} |")
    return L


def textwrap_method(res: dict) -> str:
    return "\n".join([
        ("- Each command runs once" if res.get("repeat", 1) == 1 else
         f"- Each command runs {res['repeat']} times; the table shows the run with the median wall+sync "
         "(with min–max) and the largest peak RSS of all runs") +
        ", as its own subprocess of a benchmark process that imports no torch "
        "(a child's `ru_maxrss` starts from its parent's RSS high-water mark, so a big parent would "
        "inflate every child).",
        "- **wall s**: from spawn to exit. **sync after s**: a `sync` right after, so that tools which "
        "leave dirty pages and tools which `fsync` compare fairly. Ratios use **wall+sync**.",
        "- **peak RSS**: the child's `ru_maxrss` (`os.wait4`), which counts touched `mmap` file pages "
        "too. **peak anon RSS**: `RssAnon` sampled from `/proc/PID/status` every 0.1 s (may miss short spikes).",
        "- Page cache: " + res["facts"]["cache"] + ".",
        "- LitGPT: its unmodified `convert_hf_checkpoint` (as `litgpt convert_to_litgpt`) and "
        "`convert_lit_checkpoint` (as `litgpt convert_from_litgpt`, which writes a single `model.pth` "
        "pickle, no safetensors), run with the LitGPT venv's Python. HF → LitGPT runs on a directory of "
        "symlinks to the source files named like the model, because LitGPT picks its config from the "
        "directory name and writes into it. Its times include importing litgpt/lightning.",
        "- LitGPT → HF input: " + ("not run" if res.get("lit2hf_input") in (None, "None") else
                                    "weightport's own LitGPT output" if "lit-weightport" in str(res.get("lit2hf_input"))
                                    else "LitGPT's `lit_model.pth`") + "; all three tools read the same file.",
        "- weightport: `weightport convert SRC DST --to litgpt|hf|mindspore` (and `--to nanotron --tp "
        f"{NANOTRON_TP}`) into a fresh directory; its times include Python start-up and imports.",
        "- Verification (`--no-verify` skips it) is `weightport verify A B --tensors-only`: weightport's "
        "LitGPT output against LitGPT's own, weightport's .ckpt against MindFormers' and against the source, "
        "weightport's Nanotron checkpoint (its TP shards put back together) against the source, and each HF "
        "output (the round trips included) against the source; LitGPT's `model.pth` is "
        "renamed `pytorch_model.bin` beside the source's `config.json` so it reads as a Hugging Face checkpoint.",
    ]) + "\n"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Internal sub-commands, run in the torch / LitGPT venvs by the benchmark itself.
    if argv and argv[0] == "_generate":
        _generate(argv[1], Path(argv[2]))
        return 0
    if argv and argv[0] == "_lora_adapter":
        _lora_adapter(argv[1], Path(argv[2]))
        return 0
    if argv and argv[0] == "_peft_merge":
        _peft_merge(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    if argv and argv[0] == "_litgpt_hf2lit":
        _litgpt_hf2lit(Path(argv[1]), argv[2])
        return 0
    if argv and argv[0] == "_litgpt_lit2hf":
        _litgpt_lit2hf(Path(argv[1]), Path(argv[2]))
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for the method.")
    p.add_argument("--scale", choices=sorted(SCALES), default="full",
                   help="full = Llama-3-8B (~16 GB, default); medium = 8B widths, 4 layers (~3.9 GB); "
                        "small = tiny smoke test")
    p.add_argument("--workdir", type=Path, default=REPO / "bench-work",
                   help="scratch directory (default: %(default)s, git-ignored). Needs ~3x the model size free.")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md",
                   help="Markdown report to write (default: %(default)s)")
    p.add_argument("--keep", action="store_true",
                   help="keep the generated checkpoint and outputs (a kept checkpoint is reused next run)")
    p.add_argument("--skip-litgpt", action="store_true", help="do not run LitGPT's converters")
    p.add_argument("--skip-mindspore", action="store_true", help="do not run the HF -> MindSpore .ckpt -> HF section")
    p.add_argument("--skip-mindformers", action="store_true", help="do not run MindFormers' own converter")
    p.add_argument("--skip-nanotron", action="store_true",
                   help="do not run the HF -> Nanotron (TP=2) -> HF section")
    p.add_argument("--skip-lora", action="store_true", help="do not run the LoRA merge section")
    p.add_argument("--skip-peft", action="store_true", help="do not run PEFT's own merge (it loads the whole model)")
    p.add_argument("--skip-weightport", action="store_true", help="do not run weightport")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the (untimed) bit-exactness checks of the outputs")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each measured command N times; report the median time (and min–max) and the "
                        "largest peak RSS (default: %(default)s)")
    p.add_argument("--warm", action="store_true",
                   help="do not evict the input checkpoint from the page cache before each command")
    p.add_argument("--weightport-cmd", default=os.environ.get("WEIGHTPORT_CMD", str(REPO / ".venv" / "bin" / "weightport")),
                   help="weightport command (shell-quoted string; env WEIGHTPORT_CMD; default: %(default)s)")
    p.add_argument("--weightport-extra", default="",
                   help="extra arguments of every `weightport convert` measured (e.g. --no-manifest)")
    p.add_argument("--torch-python", default=str(REPO / ".venv" / "bin" / "python"),
                   help="Python with torch + safetensors, used to generate and verify (default: %(default)s)")
    p.add_argument("--litgpt-python", default=str(REPO / ".venv-litgpt" / "bin" / "python"),
                   help="Python of the LitGPT venv (default: %(default)s)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    for what, exe in (("--torch-python", args.torch_python),) + (
            (("--litgpt-python", args.litgpt_python),) if not args.skip_litgpt else ()):
        if not os.access(exe, os.X_OK):
            p.error(f"{what} {exe} is not executable")
    if not args.skip_weightport:
        first = shlex.split(args.weightport_cmd)[0]
        if not (os.access(first, os.X_OK) or shutil.which(first)):
            p.error(f"weightport command {first!r} not found: install weightport into .venv "
                    "(pip install -e .), pass --weightport-cmd / WEIGHTPORT_CMD, or use --skip-weightport")
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
