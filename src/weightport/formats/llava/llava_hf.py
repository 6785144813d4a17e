"""transformers' LlavaForConditionalGeneration checkpoints (llava-hf/llava-1.5-7b-hf): the hf format
for the llava architecture, plus what a LLaVA from xtuner or the official codebase lacks to run
in transformers: an image token in the tokenizer and config, rows for it in the embedding and
lm_head, and the processor files. See ../../../shared/formats/llava.md §5.

The new tokens take the tokenizer's next ids (`<image>`, then `<pad>` when the model has no pad
token), as transformers' convert_llava_weights_to_hf.py adds them. Where those ids fall past the
vocabulary, the embedding and lm_head grow to the next multiple of 64 rows, as that converter's
resize_token_embeddings(pad_to_multiple_of=64) does; the new rows are the mean of the existing
ones (the converter samples them around that mean with an unseeded generator: ours is
deterministic). Phi-3's 32064 rows already hold its 32011-token tokenizer's new ids: no growth.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch

from ... import tokenizer_files
from ...archs import Model, model_from_hf_config
from ...archs.llava import TEXT, vision_sizes
from ...dtypes import short_name
from ...errors import WeightportError
from ...hf_config import load_json
from ...ops import Chain, Invert, PadRows
from ...rules import Rule
from . import parts as llava_parts
from ...format import Checkpoint, WriteOptions
from ..common import copy_side_files, write_json
from ..hf import HFFormat
from .parts import IMAGE_PROCESSOR

PROCESSOR = "LlavaProcessor"
IMAGE, PAD = "<image>", "<pad>"
ROW_MULTIPLE = 64
def image_token(cfg: dict) -> int | None:
    return cfg.get("image_token_index", cfg.get("image_token_id"))


def _tokenizer(side_files: list[Path]) -> dict | None:
    path = next((p for p in side_files if p.name == "tokenizer.json"), None)
    return load_json(path) if path is not None else None


def _pad_id(cfg: dict, tokenizer: dict | None, side_files: list[Path]) -> int | None:
    for where in (cfg, cfg.get("text_config") or {}):
        if where.get("pad_token_id") is not None:
            return where["pad_token_id"]
    if tokenizer is None:
        return None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = next((p for p in side_files if p.name == name), None)
        pad = load_json(path).get("pad_token") if path is not None else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None:
            return tokenizer_files.token_id(tokenizer, pad)
    return None


class LlavaHFFormat(HFFormat):
    name = "llava-hf"
    title = "transformers LlavaForConditionalGeneration (llava-hf; image token, processor files)"
    archs = ("llava",)

    def detect(self, path: Path) -> bool:
        if not super().detect(path):
            return False
        cfg = load_json(path / "config.json")
        return cfg.get("model_type") == "llava" and "mm_vision_tower" not in cfg

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        ckpt = super().open(path, layout)
        if (path / IMAGE_PROCESSOR).is_file():  # the vision tower's, kept for the next format
            ckpt.side_files.append(path / IMAGE_PROCESSOR)
        return ckpt

    def prepare(self, source: Checkpoint, options: WriteOptions) -> Checkpoint:
        cfg = source.model.config
        if image_token(cfg) is not None:
            return source
        tokenizer = _tokenizer(source.side_files)
        vocab = source.model.dims.vocab
        size = tokenizer_files.size(tokenizer) if tokenizer is not None else None
        if tokenizer is not None and size is None:
            raise WeightportError(f"{source.path}: tokenizer.json has a model type whose ids weightport cannot count; "
                                  f"cannot place {IMAGE}")
        next_id = vocab if size is None else size
        notes = []
        image = tokenizer_files.token_id(tokenizer, IMAGE) if tokenizer is not None else None
        if image is None:
            image, next_id = next_id, next_id + 1
            notes.append(f"image token {IMAGE} = id {image}" + (" (added to the tokenizer)" if tokenizer else
                                                                " (no tokenizer.json: tokenizer and processor not written)"))
        pad = _pad_id(cfg, tokenizer, source.side_files)
        if pad is None and tokenizer is not None:
            pad, next_id = next_id, next_id + 1
            notes.append(f"pad token {PAD} = id {pad} (added to the tokenizer)")
        rows = vocab if next_id <= vocab else -(-next_id // ROW_MULTIPLE) * ROW_MULTIPLE
        config = copy.deepcopy(dict(cfg))
        config["text_config"]["vocab_size"] = rows
        v = vision_sizes(cfg)
        config.update(image_token_index=image, image_seq_length=(v["image"] // v["patch"]) ** 2)
        if pad is not None:
            config["pad_token_id"] = pad
        model = model_from_hf_config(config, f"{source.path} (as llava-hf)")
        rules = source.rules
        if rows != vocab:
            notes.append(f"embedding and lm_head grown from {vocab} to {rows} rows (a multiple of {ROW_MULTIPLE}, as "
                         "transformers' LLaVA converter pads) with the mean of the existing rows")
            grow = Invert(PadRows(vocab, rows, "mean"))
            tables = {TEXT + "model.embed_tokens.weight", TEXT + "lm_head.weight"}
            rules = [Rule(r.hub, r.fmt, Chain((grow, r.op))) if r.hub[0] in tables and len(r.hub) == 1 else r
                     for r in rules]
        return replace(source, model=model, rules=rules, notes=source.notes + notes)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        cfg = model.config
        tokenizer = _tokenizer(source.side_files)
        rewritten = {"tokenizer.json", "tokenizer_config.json", IMAGE_PROCESSOR}
        written = ["config.json"]
        write_json(directory / "config.json", dict(cfg, architectures=[model.arch.hf_class], dtype=short_name(dtype),
                                                   torch_dtype=short_name(dtype),
                                                   text_config=llava_parts.portable_text_config(cfg["text_config"])))
        if source.generation_config is not None:
            write_json(directory / "generation_config.json", source.generation_config)
            written.append("generation_config.json")
        written += copy_side_files([p for p in source.side_files if p.name not in rewritten], directory)
        if tokenizer is None:
            return written
        by_name = {p.name: p for p in source.side_files}
        tok_config = load_json(by_name["tokenizer_config.json"]) if "tokenizer_config.json" in by_name else {}
        new = self._new_tokens(tokenizer, cfg)
        if new:
            tokenizer, tok_config = tokenizer_files.with_tokens(tokenizer, tok_config, new)
            if PAD in new:
                tok_config["pad_token"] = PAD
        tokenizer_files.dump(directory / "tokenizer.json", tokenizer)
        tokenizer_files.dump(directory / "tokenizer_config.json", dict(tok_config, processor_class=PROCESSOR))
        v = vision_sizes(cfg)
        image = dict(llava_parts.image_processor(model, source.side_files), processor_class=PROCESSOR)
        tokenizer_files.dump(directory / IMAGE_PROCESSOR, image)
        strategy = cfg.get("vision_feature_select_strategy", "default")
        tokenizer_files.dump(directory / "processor_config.json",
                             {"processor_class": PROCESSOR, "image_token": IMAGE, "patch_size": v["patch"],
                              "vision_feature_select_strategy": strategy, "num_additional_image_tokens": 1})
        return written + ["tokenizer.json", "tokenizer_config.json", IMAGE_PROCESSOR, "processor_config.json"]

    @staticmethod
    def _new_tokens(tokenizer: dict, cfg: dict) -> list[str]:
        """The tokens prepare() gave the tokenizer's next ids, in id order."""
        size = tokenizer_files.size(tokenizer)
        ids = {IMAGE: image_token(cfg), PAD: cfg.get("pad_token_id")}
        new = sorted((i, t) for t, i in ids.items() if i is not None and i >= size
                     and tokenizer_files.token_id(tokenizer, t) is None)
        if [i for i, _ in new] != list(range(size, size + len(new))):
            raise WeightportError(f"image/pad token ids {ids} do not follow the tokenizer's {size} ids")
        return [t for _, t in new]


FORMAT = LlavaHFFormat()
