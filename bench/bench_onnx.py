#!/usr/bin/env python3
"""ONNX export benchmark: `weightport convert --to onnx --with-past` against optimum-onnx's exporter
(`optimum-cli export onnx --task text-generation-with-past`) on the same 1B-shaped Llama checkpoint,
beside `cp -r` of it; then both exports run on ONNX Runtime on the same tokens (untimed).

Each command runs in its own process with the input evicted from the page cache, measured as in
bench_convert.py (whose Runner and report table this reuses). optimum-onnx 0.1 needs transformers
< 4.58, so it lives in its own venv (`make .venv-optimum/.installed`); the report says so when it
is missing. The section "## ONNX export" of the report file is replaced; the rest is kept.

    python3 bench/bench_onnx.py                 # 1B shape, ~10 minutes
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
    p.add_argument("--scale", choices=("1b", "small"), default="1b")
    p.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "onnx")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--torch-python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--optimum-cli", default=str(REPO / ".venv-optimum" / "bin" / "optimum-cli"))
    p.add_argument("--weightport", default=str(REPO / ".venv" / "bin" / "weightport"))
    args = p.parse_args(argv)

    s = SCALES[args.scale]
    work = args.workdir
    rm(work)
    work.mkdir(parents=True)
    runner = Runner(work, cold=True, disk_margin=2 * GIB, repeat=1)
    src = work / "hf"
    runner.helper("generate", [args.torch_python, str(REPO / "bench" / "bench_convert.py"), "_generate", args.scale, str(src)])
    prime = [[args.torch_python, "-c", "import torch, onnx, onnxruntime"]]
    rows = {"cp": runner.measure("cp", ["cp", "-r", str(src), str(work / "cp")], src, [], work / "cp")}
    rm(work / "cp")
    rows["weightport"] = runner.measure(
        "weightport", [args.weightport, "convert", str(src), str(work / "wp"), "--to", "onnx", "--dtype", "float32",
                       "--with-past", "-q"], src, prime, work / "wp", MEMORY_GUARD_KIB)
    optimum = Path(args.optimum_cli)
    if optimum.exists():
        rows["optimum"] = runner.measure(
            "optimum", [str(optimum), "export", "onnx", "--model", str(src), "--task", "text-generation-with-past",
                        str(work / "optimum")], src, [[str(optimum.parent / "python"), "-c", "import optimum.exporters.onnx"]],
            work / "optimum", MEMORY_GUARD_KIB)
    else:
        rows["optimum"] = f"not run: {optimum} missing (make .venv-optimum/.installed)"
    sizes = {k: dir_bytes(work / d) for k, d in (("weightport", "wp"), ("optimum", "optimum")) if (work / d).exists()}
    comparison = None
    if all(isinstance(r, dict) and r["rc"] == 0 for r in rows.values()):
        runner.helper("compare", [str(optimum.parent / "python"), __file__, "_compare", str(work / "wp"),
                                  str(work / "optimum"), str(work / "compare.json"), str(s["vocab"])])
        comparison = json.loads((work / "compare.json").read_text())

    versions = subprocess.run([str(optimum.parent / "python"), "-c", "import importlib.metadata as m; print(', '.join("
                               "f'{p} {m.version(p)}' for p in ('optimum-onnx', 'transformers', 'torch', 'onnx')))"],
                              capture_output=True, text=True).stdout.strip() if optimum.exists() else "n/a"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    params = sum(math.prod(shape) for _, shape in llama_tensors(s))
    lines = [HEADING, "",
             f"`bench/bench_onnx.py --scale {args.scale}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
             f"(weightport git {commit}): a random bf16 Llama checkpoint{' of Llama-3.2-1B widths' if args.scale == '1b' else ''} (hidden {s['hidden']}, "
             f"{s['layers']} layers, {s['heads']} heads / {s['kv_heads']} kv, intermediate {s['intermediate']}, vocab "
             f"{s['vocab']}, untied head: {params / 1e9:.2f} B parameters, {dir_bytes(src) / 1e9:.2f} GB), exported "
             "as float32 with a KV cache by both tools. Input evicted from the page cache before each command.", ""]
    lines += _table([("`cp -r` of the HF directory", rows["cp"], rows["cp"]),
                     ("weightport `convert --to onnx --dtype float32 --with-past`", rows["weightport"], rows["cp"]),
                     ("optimum-onnx `export onnx --task text-generation-with-past`", rows["optimum"], rows["cp"])])
    lines.append("")
    for k, v in sizes.items():
        lines.append(f"- {k} output: {v / 1e9:.2f} GB")
    if comparison:
        lines.append(f"- ONNX Runtime on both exports, 8 tokens, last-position logits: max abs diff "
                     f"{comparison['max_abs_diff']:.2e}, same top-1: {comparison['same_top1']}")
    lines += [f"- optimum venv: {versions}", ""]
    section = "\n".join(lines) + "\n"

    report = args.output.read_text() if args.output.exists() else ""
    if HEADING in report:
        start = report.index(HEADING)
        end = report.find("\n## ", start + len(HEADING))
        report = report[:start] + section + (report[end + 1:] if end != -1 else "")
    else:
        marker = report.find("\n## Targets")
        report = (report[:marker + 1] + section + "\n" + report[marker + 1:]) if marker != -1 else report + "\n" + section
    args.output.write_text(report)
    log(f"wrote {args.output}")
    if not os.environ.get("KEEP"):
        rm(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
