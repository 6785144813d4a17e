#!/usr/bin/env python3
"""ONNX export benchmark: `weightport convert --to onnx --with-past` against optimum-onnx's exporter
(`optimum-cli export onnx --task text-generation-with-past`) on the same 1B-shaped Llama checkpoint,
beside `cp -r` of it; then both exports run on ONNX Runtime on the same tokens (untimed).

Each command runs in its own process with the input evicted from the page cache, measured as in
bench_convert.py (whose Runner and report table this reuses). optimum-onnx 0.1 needs transformers
< 4.58, so it lives in its own venv (`make .venv-optimum/.installed`); the report says so when it
is missing. The section "## ONNX export" of the report file is replaced; the rest is kept.
`--with-8b` adds the Llama-3-8B shape exported in bf16, the peak memory the issue asks to document.

    python3 bench/bench_onnx.py                 # 1B shape, ~5 minutes
    python3 bench/bench_onnx.py --with-8b       # ... and the 8B shape in bf16 (~20 more minutes)
    python3 bench/bench_onnx.py --scale small   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import (GIB, MEMORY_GUARD_KIB, REPO, SCALES, Runner, _table, dir_bytes, llama_tensors, log,  # noqa: E402
                           rm)

HEADING = "## ONNX export"
TOKENS = [128000, 791, 6864, 315, 9822, 374, 12366, 13]


def _compare(a: Path, b: Path, out: Path, vocab: int) -> None:
    """Child process: last-position logits of both exports on TOKENS (b is optimum's: it takes
    the same inputs), and their max abs difference, as JSON."""
    import numpy as np
    import onnxruntime as ort

    ids = np.array([[t % vocab for t in TOKENS]], np.int64)
    result = {}
    for name, directory in (("weightport", a), ("optimum", b)):
        sess = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1])[None]}
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        feed = {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}}
        result[name] = sess.run(["logits"], feed)[0][0, -1]
        del sess
    result = {"max_abs_diff": float(np.abs(result["weightport"] - result["optimum"]).max()),
              "same_top1": bool(result["weightport"].argmax() == result["optimum"].argmax())}
    out.write_text(json.dumps(result))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_compare":
        _compare(Path(argv[1]), Path(argv[2]), Path(argv[3]), int(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=("1b", "small"), default="1b", help="the side-by-side comparison's model")
    p.add_argument("--with-8b", action="store_true",
                   help="also export the Llama-3-8B shape in bf16 (16 GB out; optimum is tried under the memory guard)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "onnx")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--torch-python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--optimum-cli", default=str(REPO / ".venv-optimum" / "bin" / "optimum-cli"))
    p.add_argument("--weightport", default=str(REPO / ".venv" / "bin" / "weightport"))
    args = p.parse_args(argv)

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    optimum = Path(args.optimum_cli)
    versions = subprocess.run([str(optimum.parent / "python"), "-c", "import importlib.metadata as m; print(', '.join("
                               "f'{p} {m.version(p)}' for p in ('optimum-onnx', 'transformers', 'torch', 'onnx')))"],
                              capture_output=True, text=True).stdout.strip() if optimum.exists() else "n/a"
    lines = [HEADING, "",
             f"`bench/bench_onnx.py --scale {args.scale}{' --with-8b' if args.with_8b else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (weightport git {commit}; optimum venv: {versions}). "
             "Random bf16 Llama checkpoints (untied head) generated as in bench_convert.py; the input is evicted "
             "from the page cache before each command; each tool exports with a KV cache; a tool whose anonymous RSS "
             "passes 20 GiB is stopped (the memory guard: this machine has 24 GB).", ""]
    lines += section(args, args.scale, "float32", args.workdir)
    if args.with_8b:
        lines += section(args, "full", "bfloat16", args.workdir)
    report = args.output.read_text() if args.output.exists() else ""
    text = "\n".join(lines) + "\n"
    if HEADING in report:
        start = report.index(HEADING)
        end = report.find("\n## ", start + len(HEADING))
        report = report[:start] + text + (report[end + 1:] if end != -1 else "")
    else:
        marker = report.find("\n## Targets")
        report = (report[:marker + 1] + text + "\n" + report[marker + 1:]) if marker != -1 else report + "\n" + text
    args.output.write_text(report)
    log(f"wrote {args.output}")
    return 0


def section(args, scale: str, dtype: str, work: Path) -> list[str]:
    """Generate the `scale` checkpoint, measure cp -r, weightport and optimum on it; report lines."""
    s = SCALES[scale]
    rm(work)
    work.mkdir(parents=True)
    runner = Runner(work, cold=True, disk_margin=2 * GIB, repeat=1)
    src = work / "hf"
    runner.helper("generate", [args.torch_python, str(REPO / "bench" / "bench_convert.py"), "_generate", scale, str(src)])
    rows = {"cp": runner.measure("cp", ["cp", "-r", str(src), str(work / "cp")], src, [], work / "cp")}
    rm(work / "cp")
    rows["weightport"] = runner.measure(
        f"weightport {scale}", [args.weightport, "convert", str(src), str(work / "wp"), "--to", "onnx", "--dtype", dtype,
                                "--with-past", "-q"], src, [[args.torch_python, "-c", "import torch, onnx"]], work / "wp",
        MEMORY_GUARD_KIB)
    optimum = Path(args.optimum_cli)
    if optimum.exists():
        rows["optimum"] = runner.measure(
            f"optimum {scale}", [str(optimum), "export", "onnx", "--model", str(src), "--task", "text-generation-with-past",
                                 str(work / "optimum")], src,
            [[str(optimum.parent / "python"), "-c", "import optimum.exporters.onnx"]], work / "optimum", MEMORY_GUARD_KIB)
    else:
        rows["optimum"] = f"not run: {optimum} missing (make .venv-optimum/.installed)"
    sizes = {k: dir_bytes(work / d) for k, d in (("weightport", "wp"), ("optimum", "optimum")) if (work / d).exists()}
    comparison = None
    if all(isinstance(r, dict) and r["rc"] == 0 for r in rows.values()):
        runner.helper("compare", [str(optimum.parent / "python"), __file__, "_compare", str(work / "wp"),
                                  str(work / "optimum"), str(work / "compare.json"), str(s["vocab"])])
        comparison = json.loads((work / "compare.json").read_text())

    params = sum(math.prod(shape) for _, shape in llama_tensors(s))
    shape = {"1b": "Llama-3.2-1B widths", "full": "Llama-3-8B shape"}.get(scale, "tiny")
    lines = [f"### {shape}: {params / 1e9:.2f} B parameters, {dir_bytes(src) / 1e9:.2f} GB bf16", "",
             f"Hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} kv, intermediate "
             f"{s['intermediate']}, vocab {s['vocab']}. weightport writes {dtype}; optimum-onnx exports float32 "
             "(its default on CPU).", ""]
    lines += _table([("`cp -r` of the HF directory", rows["cp"], rows["cp"]),
                     (f"weightport `convert --to onnx --dtype {dtype} --with-past`", rows["weightport"], rows["cp"]),
                     ("optimum-onnx `export onnx --task text-generation-with-past`", rows["optimum"], rows["cp"])])
    lines.append("")
    for k, v in sizes.items():
        lines.append(f"- {k} output: {v / 1e9:.2f} GB")
    if comparison:
        lines.append(f"- ONNX Runtime on both exports, 8 tokens, last-position logits: max abs diff "
                     f"{comparison['max_abs_diff']:.2e}, same top-1: {comparison['same_top1']}")
    lines.append("")
    if not os.environ.get("KEEP"):
        rm(work)
    return lines


if __name__ == "__main__":
    sys.exit(main())
