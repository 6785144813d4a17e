"""The `weightport` command line."""

from __future__ import annotations

import argparse
import os
import sys

# Large tensors come and go one group at a time; backing them with transparent huge pages
# makes each fresh allocation far cheaper to fault in. torch reads this once, at import.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from . import __version__, api, formats  # noqa: E402
from .dtypes import CLI_DTYPES  # noqa: E402
from .errors import WeightportError  # noqa: E402

EPILOG = """examples:
  weightport inspect ./Llama-3.2-1B --tensors
  weightport convert ./Llama-3.2-1B ./llama-lit --to litgpt
  weightport convert ./llama-lit ./llama-hf --to hf --dtype bfloat16 --max-shard-size 2GB
  weightport convert ./llama-lit ./llama-hf --to hf --dry-run
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="weightport", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert transformer checkpoints between Hugging Face, LitGPT and other formats, "
                    "tensor by tensor, with the plan checked before anything is written.")
    p.add_argument("--version", action="version", version=f"weightport {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = ", ".join(formats.FORMATS)

    c = sub.add_parser("convert", help="convert a checkpoint to another format",
                       description="Convert SRC into format --to, writing the directory OUT. The source is "
                                   "never modified; OUT appears only when complete.")
    c.add_argument("src", metavar="SRC", help="source checkpoint directory (or a LitGPT .pth file)")
    c.add_argument("out", metavar="OUT", help="output directory to create")
    c.add_argument("--to", required=True, metavar="FORMAT", choices=list(formats.FORMATS),
                   help=f"target format: {names}")
    c.add_argument("--from", dest="source_format", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="source format, when detection should be overridden")
    c.add_argument("--dtype", default="auto", choices=list(CLI_DTYPES),
                   help="dtype of the written floating-point tensors; 'auto' keeps each tensor's source dtype "
                        "(default: auto)")
    c.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard for formats that shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    c.add_argument("--dry-run", action="store_true",
                   help="build and check the plan from file headers, print it (files, tensors, bytes, ops) and exit")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    c.add_argument("--allow-overflow", action="store_true",
                   help="with --dtype float16, cast even tensors with values beyond ±65504 (they become inf)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")

    i = sub.add_parser("inspect", help="describe a checkpoint from its headers",
                       description="Show the detected format, architecture, config summary, parameter count and "
                                   "dtypes of a checkpoint; reads headers only.")
    i.add_argument("path", metavar="PATH", help="checkpoint directory or file")
    i.add_argument("--from", dest="source_format", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="format, when detection should be overridden")
    i.add_argument("--tensors", action="store_true", help="also list every tensor's name, shape and dtype")

    sub.add_parser("formats", help="print the support matrix (format x architecture x direction)",
                   description="Print which architectures each format can read and write.")
    return p


def _convert(args) -> int:
    plan = api.convert(args.src, args.out, args.to, source_format=args.source_format, dtype=args.dtype,
                       max_shard_size=args.max_shard_size, force=args.force, allow_overflow=args.allow_overflow,
                       dry_run=args.dry_run, progress=not args.quiet and sys.stderr.isatty())
    if args.dry_run:
        print(plan.render(verbose=True))
        print("dry run: nothing written")
    elif not args.quiet:
        print(plan.render(verbose=False))
        print(f"wrote {args.out}")
    return 0


def _inspect(args) -> int:
    print(api.inspect(args.path, args.source_format).render(tensors=args.tensors))
    return 0


def _formats(args) -> int:
    rows = api.support_matrix()
    width = max(len(r[1]) for r in rows)
    print(f"{'format':8}  {'architecture':{width}}  read  write")
    for f, a, r, w in rows:
        print(f"{f:8}  {a:{width}}  {r:4}  {w}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"convert": _convert, "inspect": _inspect, "formats": _formats}[args.command](args)
    except WeightportError as e:
        print(f"weightport: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("weightport: interrupted; no output was left", file=sys.stderr)
        return 130
    except MemoryError:
        print("weightport: error: out of memory", file=sys.stderr)
        return 1
