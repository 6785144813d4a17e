"""The `weightport` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import asdict

# Large tensors come and go one group at a time; backing them with transparent huge pages
# makes each fresh allocation far cheaper to fault in. torch reads this once, at import.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from . import api, build, formats, verify  # noqa: E402
from .formats.mindspore import compat as mindformers_compat  # noqa: E402
from .version import __version__  # noqa: E402
from .dtypes import CLI_DTYPES  # noqa: E402
from .errors import Terminated, WeightportError  # noqa: E402
from .paths import check_report_file  # noqa: E402
from .verify import DEFAULT_SAMPLES  # noqa: E402

EPILOG = """examples:
  weightport inspect ./Llama-3.2-1B --tensors
  weightport convert ./Llama-3.2-1B ./llama-lit --to litgpt
  weightport convert ./llama-lit ./llama-hf --to hf --dtype bfloat16 --max-shard-size 2GB
  weightport convert ./llama-lit ./llama-hf --to hf --dry-run
  weightport convert ./Llama-3.2-1B ./llama-lit --to litgpt --verify
  weightport verify ./Llama-3.2-1B ./llama-lit --report report.json
  weightport verify ./Llama-3.2-1B ./llama-lit --runtime litgpt --runtime-python .venv-litgpt/bin/python
  weightport eval-captions ./llama-lit --data ./shards/ --samples 100
  weightport convert ./Llama-3-8B ./llama-ms --to mindspore --dtype bfloat16 --layout fused-interleaved
  weightport convert ./Llama-3-8B ./llama-nt --to nanotron --tp 2
  weightport convert ./Llama-3.2-1B ./llama-onnx --to onnx --with-past
  weightport run ./llama-onnx --prompt "The capital of France is" --top-k 5 --generate 10
  weightport mindformers --model llama --input_path ./Llama-3-8B --output_path llama3.ckpt --dtype bf16
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
    c.add_argument("--to", required=True, metavar="FORMAT", choices=[*formats.FORMATS, "peft"],
                   help=f"target format: {names}; or peft, which turns a LitGPT LoRA checkpoint (SRC: "
                        "litgpt finetune_lora's output) into a PEFT adapter directory")
    c.add_argument("--from", dest="source_format", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="source format, when detection should be overridden")
    c.add_argument("--dtype", default="auto", choices=list(CLI_DTYPES),
                   help="dtype of the written floating-point tensors; 'auto' keeps each tensor's source dtype "
                        "(default: auto)")
    c.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard for formats that shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    c.add_argument("--layout", metavar="LAYOUT",
                   help="tensor layout variant of the target format; mindspore: separate (default: wq/wk/wv, "
                        "w1/w3), fused (w_qkv = cat(wq, wk, wv), w_gate_hidden = cat(w1, w3); MindFormers <= 1.3), "
                        "fused-interleaved (per-kv-group w_qkv, alternating gate/up rows; MindFormers >= 1.5), "
                        "gmm (Mixtral experts stacked as (experts, in, out), MindFormers' use_gmm); nanotron: "
                        "rotate-half (default, rope_interleaved: false, HF q/k rows as they are) or interleaved "
                        "(rope_interleaved: true, q/k rows permuted per head)")
    c.add_argument("--container", metavar="KIND",
                   help="file the target format stores its tensors in; mindspore: ckpt (default: a MindSpore "
                        ".ckpt) or safetensors (MindSpore safetensors, metadata format \"ms\", as MindFormers "
                        ">= 1.5 saves)")
    c.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel size to write; nanotron: N shard files per sharded parameter, as N TP "
                        "ranks would save them (N must divide the heads, vocabulary and MLP sizes; default: 1). "
                        "Any TP size is read back without this option")
    c.add_argument("--pp", type=int, default=1, metavar="N",
                   help="pipeline-parallel size to write; nanotron: the pp rank in each shard file's name, from "
                        "Nanotron's own cost-balanced split of the layers over N stages (default: 1)")
    c.add_argument("--nanotron-version", metavar="V",
                   help="checkpoint version a nanotron output declares in its shard metadata and "
                        "checkpoint_metadata.json: 1.4 (default; Nanotron main and the Idefics3 fork) or 1.2 for "
                        "nanotron 0.4 from PyPI, which reshards only checkpoints <= 1.2 (the metadata is otherwise "
                        "the same)")
    c.add_argument("--to-arch", metavar="ARCH", choices=["llama"],
                   help="change the architecture on the way: llama turns a Phi-3 model (or a LLaVA's Phi-3 text "
                        "model) into a Llama computing the same function, as the official LLaVA codebase needs "
                        "(qkv_proj and gate_up_proj split). A sliding window or long-rope scaling, which Llama "
                        "lacks, needs --allow-approximate")
    c.add_argument("--merge-lora", metavar="ADAPTER",
                   help="merge a LoRA adapter into SRC while converting: a PEFT adapter directory "
                        "(adapter_config.json + adapter_model.safetensors/.bin; rank_pattern, alpha_pattern, "
                        "use_rslora, fan_in_fan_out, modules_to_save and added tokens honoured). Each adapted weight "
                        "becomes W + scale * (B @ A), computed in float32 one tensor at a time")
    c.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                   help="multiply the adapter's own scale (lora_alpha / r) by S (default: 1.0)")
    c.add_argument("--lora-alpha", type=float, metavar="A",
                   help="xtuner training checkpoints that hold LoRA weights: the lora_alpha of the training "
                        "config's llm_lora / visual_encoder_lora (the checkpoint does not record it); each adapted "
                        "weight is merged with scale A / r, r read from the weights")
    c.add_argument("--llm", metavar="DIR",
                   help="xtuner checkpoints that lack the language model (training froze it): the Hugging Face "
                        "checkpoint it was trained from; the plan says which part came from where")
    c.add_argument("--visual-encoder", metavar="DIR",
                   help="xtuner checkpoints that lack the vision encoder (frozen in training): the CLIP vision "
                        "checkpoint (CLIPVisionModel or CLIPModel directory) it was trained from")
    c.add_argument("--from-layout", dest="source_layout", metavar="LAYOUT",
                   help="layout of the source, when the checkpoint does not record it (same names as --layout)")
    c.add_argument("--with-past", action="store_true",
                   help="onnx: export the decoder with a KV cache (past_key_values.N.key/.value in, present.N.key/"
                        ".value out); an empty past gives a prefill, so one graph serves prefill and each step")
    c.add_argument("--dry-run", action="store_true",
                   help="build and check the plan from file headers, print it (files, tensors, bytes, ops) and exit")
    _add_replace_args(c)
    c.add_argument("--allow-approximate", action="store_true",
                   help="convert what the target format can only approximate instead of refusing it, with a "
                        "warning saying what changes (nanotron: Llama rope_scaling, which Nanotron stores but never "
                        "applies; --to-arch llama: Phi-3's sliding window or long-rope scaling); what cannot be held at all (biases, a head_dim other than hidden/heads) is still "
                        "refused")
    c.add_argument("--allow-overflow", action="store_true",
                   help="with --dtype float16, cast even tensors with values beyond ±65504 (they become inf) or "
                        "that hold inf in the source (they stay inf); without it, either is refused naming the tensor")
    c.add_argument("--allow-nan", action="store_true",
                   help="with --dtype float16, cast even tensors that hold NaN in the source (they stay NaN); "
                        "without it, a NaN is refused naming the tensor")
    c.add_argument("--no-manifest", dest="manifest", action="store_false",
                   help="write no weightport-manifest.json and hash nothing: the same files, sooner (its sha256 of "
                        "every tensor and file made an 8B conversion on 2 cores take 19-35%% longer), but "
                        "`verify --manifest` cannot check OUT later")
    c.add_argument("--verify", action="store_true",
                   help="after writing, compare OUT with SRC as `weightport verify` does (tensors, then the "
                        "function when transformers is installed); exit 1 if they are not equivalent")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")

    v = sub.add_parser("verify", help="prove B computes what A computes: config, every tensor, then logits",
                       description="Compare checkpoint B (typically a conversion of A) with A, in any supported "
                                   "formats. Config: the settings that change the forward pass. Tensors: both are "
                                   "mapped to Hugging Face names and layouts and every tensor is compared, bit for "
                                   "bit after casting A to B's dtype; differences are reported with max abs diff, "
                                   "relative error and ulps. Function (needs transformers): both models run on the "
                                   "same captions (or random tokens when there is no tokenizer) and their logits, "
                                   "top-1 predictions and caption loss are compared against a per-dtype tolerance. "
                                   "Exit code 0 only when the verdict is 'equivalent'.")
    v.add_argument("a", metavar="A", nargs="?", help="reference checkpoint (directory or file)")
    v.add_argument("b", metavar="B", nargs="?", help="checkpoint to check against A")
    v.add_argument("--manifest", metavar="OUT",
                   help="instead of comparing A and B: re-hash OUT's files and tensors against the "
                        "weightport-manifest.json written with it, and report every file and tensor changed since")
    v.add_argument("--from-a", dest="format_a", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="format of A, when detection should be overridden")
    v.add_argument("--from-b", dest="format_b", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="format of B, when detection should be overridden")
    _add_data_args(v, default_samples=DEFAULT_SAMPLES)
    v.add_argument("--runtime", metavar="RUNTIME",
                   help="run B in its own framework instead of transformers: litgpt (B must be a LitGPT "
                        "checkpoint) or transformers. A always runs in transformers.")
    v.add_argument("--runtime-python", metavar="PYTHON",
                   help="Python interpreter that has the runtime's framework installed (e.g. a separate venv "
                        "with litgpt); default: $WEIGHTPORT_LITGPT_PYTHON, else this Python")
    v.add_argument("--tensors-only", action="store_true", help="compare config and tensors; do not run the models")
    v.add_argument("--report", metavar="FILE", help="write the full report (every tensor) as JSON to FILE")
    v.add_argument("--all", action="store_true", help="list every tensor in the table, not only those that differ")
    v.add_argument("-q", "--quiet", action="store_true", help="print only the verdict line")

    e = sub.add_parser("eval-captions", help="loss and top-1 accuracy on caption tokens, for any format",
                       description="Run MODEL (in transformers, converted to Hugging Face layout in a temporary "
                                   "directory if needed) on 'This image shows: <caption>' for each caption and "
                                   "report the mean caption-token loss and top-1 accuracy. Only caption tokens "
                                   "are scored, and only those below the tokenizer's base vocabulary.")
    e.add_argument("model", metavar="MODEL", help="checkpoint directory or file")
    e.add_argument("--from", dest="source_format", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="format of MODEL, when detection should be overridden")
    _add_data_args(e, default_samples=100)
    e.add_argument("--report", metavar="FILE", help="also write the result as JSON to FILE")

    i = sub.add_parser("inspect", help="describe a checkpoint from its headers",
                       description="Show the detected format, architecture, config summary, parameter count and "
                                   "dtypes of a checkpoint; reads headers only.")
    i.add_argument("path", metavar="PATH", help="checkpoint directory or file")
    i.add_argument("--from", dest="source_format", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="format, when detection should be overridden")
    i.add_argument("--tensors", action="store_true", help="also list every tensor's name, shape and dtype")

    b = sub.add_parser("build", help="assemble a new model from parts of existing checkpoints",
                       description="Assemble a KIND model from separate checkpoints and write it to OUT, streamed "
                                   "like a conversion. idefics3: the Llama at --text becomes the text model, the "
                                   "SigLIP vision tower at --vision the vision encoder; what neither holds (the "
                                   "connector, the embedding and lm_head rows of the three tokens Idefics3 adds: "
                                   "<fake_token_around_image>, <image>, <end_of_utterance>) is initialised by a "
                                   "fixed, seeded rule, and the plan lists each initialised tensor.")
    b.add_argument("kind", metavar="KIND", choices=["idefics3"], help="what to build: idefics3")
    b.add_argument("out", metavar="OUT", help="output directory to create")
    b.add_argument("--text", required=True, metavar="DIR",
                   help="Llama checkpoint (any format weightport reads, e.g. a Hugging Face LlamaForCausalLM "
                        "directory)")
    b.add_argument("--vision", required=True, metavar="DIR",
                   help="Hugging Face SigLIP checkpoint (SiglipModel or SiglipVisionModel); its pooling head "
                        "and text tower are left out")
    b.add_argument("--to", default="hf", metavar="FORMAT", choices=list(formats.FORMATS),
                   help="format to write: hf (default; Idefics3ForConditionalGeneration) or nanotron")
    b.add_argument("--seed", type=int, default=0,
                   help="seed of the connector's N(0, initializer_range^2) init; the same seed gives the same "
                        "bytes (default: 0). New token rows are the mean of the existing rows, not random")
    b.add_argument("--scale-factor", type=int, default=2, metavar="S",
                   help="Idefics3's pixel-shuffle factor: S x S patches become one image token, so the connector "
                        "takes vision hidden x S^2 inputs (default: 2)")
    b.add_argument("--dtype", default="auto", choices=list(CLI_DTYPES),
                   help="dtype of the written floating-point tensors; 'auto' keeps each part's dtype "
                        "(default: auto)")
    b.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard for --to hf (default: 5GB)")
    b.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size for --to nanotron (default: 1)")
    b.add_argument("--dry-run", action="store_true", help="build and check the plan, print it and exit")
    _add_replace_args(b)
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")

    r = sub.add_parser("run", help="run an ONNX export on ONNX Runtime (CPU): next-token top-k, greedy generation",
                       description="Encode PROMPT with the export's tokenizer.json, run the decoder graph on ONNX "
                                   "Runtime's CPU provider and print the most likely next tokens with their "
                                   "probabilities; with --generate N, also greedily generate N tokens (one token "
                                   "per step through the KV cache when the export has one, --with-past).")
    r.add_argument("path", metavar="OUT", help="directory written by `convert --to onnx`")
    r.add_argument("--prompt", required=True, help="text to continue")
    r.add_argument("--image", metavar="IMG",
                   help="LLaVA exports: an image file, preprocessed as the export's preprocessor_config.json says; "
                        "it replaces the prompt's <image> token (or goes first when the prompt has none)")
    r.add_argument("--top-k", type=int, default=20, metavar="K", help="how many next tokens to list (default: 20)")
    r.add_argument("--generate", type=int, default=0, metavar="N", help="greedily generate N tokens and print them")

    mindformers_compat.add_parser(sub)

    sub.add_parser("formats", help="print the support matrix (format x architecture x direction)",
                   description="Print which architectures each format can read and write.")
    return p


def _add_replace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists and weightport wrote it: an empty directory, or one whose every "
                        "file its weightport-manifest.json lists (a --no-manifest output has none). The old OUT is "
                        "removed only once the new one is complete")
    p.add_argument("--delete-existing", action="store_true",
                   help="replace OUT whatever it is: a plain file, or a directory of files weightport did not write, "
                        "all of which are deleted. An input is never replaced, with any flag")


def _add_data_args(p: argparse.ArgumentParser, default_samples: int) -> None:
    p.add_argument("--data", metavar="PATH",
                   help="image-caption pairs: a WebDataset shard (*.tar with jpg/txt/json members), a directory "
                        "of shards, a brace pattern like 'shards-{000000..000009}.tar', a folder of loose "
                        "KEY.jpg/KEY.txt/KEY.json files, or a dataset saved with datasets.save_to_disk "
                        "(default: the built-in caption set of 100 generated images)")
    p.add_argument("--samples", type=int, default=default_samples, metavar="N",
                   help=f"how many caption pairs (or random sequences) to run (default: {default_samples})")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory, when the checkpoints carry no tokenizer files")


def _convert(args) -> int:
    if args.to == "peft":
        modules = api.convert_adapter(args.src, args.out, force=args.force, delete_existing=args.delete_existing)
        if not args.quiet:
            print(f"wrote {args.out}: PEFT adapter on {len(modules)} modules")
        return 0
    plan = api.convert(args.src, args.out, args.to, source_format=args.source_format, dtype=args.dtype,
                       max_shard_size=args.max_shard_size, force=args.force, delete_existing=args.delete_existing,
                       allow_overflow=args.allow_overflow, allow_nan=args.allow_nan,
                       dry_run=args.dry_run, progress=not args.quiet and sys.stderr.isatty(),
                       layout=args.layout, source_layout=args.source_layout, container=args.container,
                       tp=args.tp, pp=args.pp, allow_approximate=args.allow_approximate,
                       nanotron_version=args.nanotron_version, llm=args.llm, visual_encoder=args.visual_encoder,
                       to_arch=args.to_arch, merge_lora=args.merge_lora, lora_scale=args.lora_scale,
                       lora_alpha=args.lora_alpha, with_past=args.with_past, manifest=args.manifest)
    if args.quiet:
        for warning in plan.warnings:
            print(f"weightport: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(plan.render(verbose=True))
        print("dry run: nothing written")
    elif not args.quiet:
        print(plan.render(verbose=False))
        print(f"wrote {args.out}")
    if args.verify and not args.dry_run:
        report = verify.verify(args.src, args.out, format_a=args.source_format, format_b=args.to,
                               progress=not args.quiet and sys.stderr.isatty())
        print(report.render() if not args.quiet else f"verdict:  {report.verdict}")
        if not report.equivalent:
            print(f"weightport: error: {args.out} was written but is not equivalent to {args.src}", file=sys.stderr)
            return 1
    return 0


def _build(args) -> int:
    plan = build.build(args.kind, args.out, text=args.text, vision=args.vision, to=args.to, seed=args.seed,
                       scale_factor=args.scale_factor, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       tp=args.tp, force=args.force, delete_existing=args.delete_existing, dry_run=args.dry_run,
                       progress=not args.quiet and sys.stderr.isatty())
    if args.dry_run:
        print(plan.render(verbose=True))
        print("dry run: nothing written")
    elif not args.quiet:
        print(plan.render(verbose=False))
        print(f"wrote {args.out}")
    return 0


def _verify(args) -> int:
    if args.manifest:
        if args.a or args.b:
            raise WeightportError("verify --manifest OUT takes no A and B")
        from .verify.manifest import check_manifest

        result = check_manifest(args.manifest)
        print(result.render())
        return 0 if result.intact else 1
    if not (args.a and args.b):
        raise WeightportError("verify needs A and B (or --manifest OUT)")
    if args.report:
        check_report_file(args.report, {"A": args.a, "B": args.b, "--data": args.data, "--tokenizer": args.tokenizer},
                          "--report", alone=("--data", "--tokenizer"))
    report = verify.verify(args.a, args.b, format_a=args.format_a, format_b=args.format_b, data=args.data,
                           samples=args.samples, runtime=args.runtime, runtime_python=args.runtime_python,
                           tokenizer=args.tokenizer, tensors_only=args.tensors_only,
                           progress=not args.quiet and sys.stderr.isatty())
    if args.report:
        report.write_json(args.report)
    print(report.render(all_tensors=args.all) if not args.quiet else f"verdict:  {report.verdict}")
    return 0 if report.equivalent else 1


def _mindformers(args) -> int:
    print(mindformers_compat.run(args))
    return 0


def _eval_captions(args) -> int:
    if args.report:
        check_report_file(args.report, {"MODEL": args.model, "--data": args.data, "--tokenizer": args.tokenizer},
                          "--report", alone=("--data", "--tokenizer"))
    result = verify.eval_captions(args.model, source_format=args.source_format, data=args.data,
                                  samples=args.samples, tokenizer=args.tokenizer)
    if args.report:
        verify.write_json(args.report, asdict(result))
    print(result.render())
    return 0


def _inspect(args) -> int:
    print(api.inspect(args.path, args.source_format).render(tensors=args.tensors))
    return 0


def _run(args) -> int:
    from .formats.onnx.run import OnnxModel

    model = OnnxModel(args.path)
    for rank, p in enumerate(model.top_k(args.prompt, args.top_k, args.image), 1):
        print(f"{rank:3}  {p.probability:8.4f}  {p.token_id:7}  {p.token!r}")
    if args.generate:
        ids = model.generate(args.prompt, args.generate, args.image)
        print(f"generated: {model.tokenizer.decode(ids)!r}  (ids {ids})")
    return 0


def _formats(args) -> int:
    rows = api.support_matrix()
    fw, width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'format':{fw}}  {'architecture':{width}}  read  write")
    for f, a, r, w in rows:
        print(f"{f:{fw}}  {a:{width}}  {r:4}  {w}")
    return 0


def _on_signal(signum, frame):
    # a second signal must not cut short the cleanup the first one starts
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signal.Signals(signum).name)


_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM (kill, a scheduler's timeout) and SIGHUP (a closed terminal) unwind like Ctrl-C: the
    # partial output is removed on the way out
    for sig in _SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        commands = {"convert": _convert, "inspect": _inspect, "formats": _formats, "verify": _verify,
                    "eval-captions": _eval_captions, "mindformers": _mindformers, "build": _build,
                    "run": _run}
        return commands[args.command](args)
    except WeightportError as e:
        print(f"weightport: error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"weightport: stopped by {e.signal_name}; no output was left", file=sys.stderr)
        return 128 + signal.Signals[e.signal_name].value
    except KeyboardInterrupt:
        print("weightport: interrupted; no output was left", file=sys.stderr)
        return 130
    except MemoryError:
        print("weightport: error: out of memory", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # stdout closed early (`weightport inspect --tensors | head`): not an error of ours;
        # point stdout at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
