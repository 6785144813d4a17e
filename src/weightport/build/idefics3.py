"""Idefics3 from a Llama checkpoint and a SigLIP checkpoint: what Nanotron's
tools/idefics3/build_nanotron_from_hf.py does, streamed, into any format weightport writes.

What is copied: every SigLIP vision-tower tensor (its pooling head, text tower and logit scale are
dropped: Idefics3 feeds the patch features to the connector), every Llama decoder tensor, the
final norm, and the Llama embedding and lm_head rows.

What is new, and how it is initialised (the seed tool leaves all of it at unseeded PyTorch
defaults and also throws the Llama lm_head away; both make the result depend on luck):
- Three tokens are appended to the vocabulary, as transformers' Idefics3 has them:
  V `<fake_token_around_image>`, V+1 `<image>` (image_token_id), V+2 `<end_of_utterance>`.
  Their embedding rows and lm_head rows are the mean of the existing rows, so a new token starts
  as an average token instead of one whose logit dominates (the idea of transformers'
  `resize_token_embeddings(mean_resizing=True)`, without its random spread: deterministic).
- The connector `model.connector.modality_projection.proj.weight` [text hidden, vision hidden ×
  scale_factor²] is drawn from N(0, initializer_range²) of the text config (0.02 by default),
  the init transformers gives a Linear, from `torch.Generator().manual_seed(seed)` in float32,
  then cast to the text model's dtype: the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..archs import model_from_hf_config
from ..archs.llama_family import ARCHS as LLAMA_ARCHS
from ..errors import WeightportError
from ..format import Checkpoint
from ..formats.hf import _weight_files
from ..hf_config import vision_tower_config
from ..io import open_files
from ..ops import Concat, Identity, Invert
from ..rules import Rule
from ..io.parts import Made, PartsSource
from .processor import write_processor

NEW_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
CONNECTOR = "model.connector.modality_projection.proj.weight"
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range")
# SigLIP tensors with no place in Idefics3, and why
SIGLIP_DROPPED = (("vision_model.head.", "SigLIP's attention-pooling head: Idefics3 uses the patch features"),
                  ("text_model.", "SigLIP's text tower: Idefics3 has none"),
                  ("logit_", "SigLIP's contrastive logit scale/bias: Idefics3 has none"))


def vision_config(path: Path) -> dict:
    cfg = vision_tower_config(path / "config.json", "siglip", "SigLIP")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "image_size", "patch_size") if k not in cfg]
    if missing:
        raise WeightportError(f"{path / 'config.json'}: SigLIP vision config lacks {missing[0]!r}")
    return {k: cfg[k] for k in VISION_KEYS if k in cfg} | {"model_type": "idefics3_vision"}


def _mean_rows(source, name: str, copies: int) -> torch.Tensor:
    # float32 sums a block of rows at a time: no float32 copy of a whole 128k-row table
    table = source.load(name)
    total = torch.zeros(table.shape[1:], dtype=torch.float32)
    for block in torch.split(table, 8192):
        total += block.float().sum(0)
    return (total / table.shape[0]).to(table.dtype).expand(copies, *table.shape[1:]).clone()


def _connector(shape: tuple[int, int], std: float, seed: int, dtype: torch.dtype):
    def make():
        g = torch.Generator().manual_seed(seed)
        return torch.normal(0.0, std, shape, generator=g, dtype=torch.float32).to(dtype)
    return make


def assemble(text: Checkpoint, vision_dir: Path, workdir: Path, *, seed: int = 0, scale_factor: int = 2) -> Checkpoint:
    """An Idefics3 checkpoint (HF names at the hub) whose tensors come from `text` (a Llama
    checkpoint in any format) and the SigLIP checkpoint in `vision_dir`, plus the new ones; the
    extended tokenizer and processor files are written into `workdir`."""
    llama = text.model
    if llama.arch not in LLAMA_ARCHS or llama.arch.name != "llama":
        raise WeightportError(f"{text.path}: the text model is {llama.arch.name}; Idefics3's text model is a Llama")
    if not (vision_dir / "config.json").is_file():
        raise WeightportError(f"{vision_dir}: no config.json (expected a Hugging Face SigLIP checkpoint)")
    vcfg = vision_config(vision_dir)
    d = llama.dims
    vocab = d.vocab + len(NEW_TOKENS)
    text_cfg = {k: v for k, v in llama.config.items() if k not in ("architectures", "_name_or_path")}
    text_cfg.update(model_type="llama", vocab_size=vocab)
    config = {"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"],
              "image_token_id": d.vocab + 1, "scale_factor": scale_factor, "tie_word_embeddings": d.tied,
              "text_config": text_cfg, "vision_config": vcfg}
    if llama.config.get("pad_token_id") is not None:
        config["pad_token_id"] = llama.config["pad_token_id"]
    model = model_from_hf_config(config, f"Idefics3 built from {text.path} and {vision_dir}")

    files, _, _ = _weight_files(vision_dir)
    vision = open_files(files)
    made: dict[str, Made] = {}
    rules: list[Rule] = []
    dropped = {f"text/{n}": why for n, why in text.dropped.items()}
    notes = [f"text model from {text.path} [{text.format.name}: {text.variant}]",
             f"vision tower from {vision_dir} [SigLIP, {len(files)} file(s)]"]
    try:
        hub_names = set(model.hub_tensors())
        for r in text.rules:
            fmt = tuple(f"text/{f}" for f in r.fmt)
            if r.hub in (("model.embed_tokens.weight",), ("lm_head.weight",)):
                if not isinstance(r.op, Identity):
                    raise WeightportError(f"{text.path}: {r.hub[0]} is stored transformed ({r.op}); convert the "
                                          "Llama to hf first")
                hub = "lm_head.weight" if r.hub[0] == "lm_head.weight" else "model.text_model.embed_tokens.weight"
                rows = f"new rows of {hub}"
                made[rows] = Made((len(NEW_TOKENS), d.hidden), text.source.tensors[r.fmt[0]].dtype,
                                  lambda n=r.fmt[0]: _mean_rows(text.source, n, len(NEW_TOKENS)),
                                  f"mean of the {d.vocab} rows above")
                rules.append(Rule(hub, (*fmt, rows), Invert(Concat((d.vocab, len(NEW_TOKENS))))))
                notes.append(f"initialised: rows {d.vocab}..{vocab - 1} of {hub} ({', '.join(NEW_TOKENS)}) = "
                             f"the mean of rows 0..{d.vocab - 1}")
                continue
            hub = tuple("model.text_model." + h.removeprefix("model.") for h in r.hub)
            rules.append(Rule(hub, fmt, r.op))
        for name in vision.tensors:
            why = next((w for p, w in SIGLIP_DROPPED if name.startswith(p)), None)
            if why:
                dropped[f"vision/{name}"] = why
            elif "model." + name in hub_names:
                rules.append(Rule("model." + name, f"vision/{name}", Identity()))
        std = float(text_cfg.get("initializer_range", 0.02))
        shape = tuple(model.hub_tensors()[CONNECTOR])
        dtype = text.source.tensors[text.rules[0].fmt[0]].dtype
        made[CONNECTOR] = Made(shape, dtype, _connector(shape, std, seed, dtype), f"N(0, {std}^2), seed {seed}")
        rules.append(Rule(CONNECTOR, CONNECTOR, Identity()))
        notes.append(f"initialised: {CONNECTOR} {list(shape)} ~ N(0, {std}^2) in float32, "
                     f"torch.Generator().manual_seed({seed}), cast to {str(dtype).removeprefix('torch.')}")
        side = vcfg["image_size"] // vcfg["patch_size"]
        if side % scale_factor:
            notes.append(f"{side}x{side} patches per image do not divide by scale_factor {scale_factor}: "
                         "the pixel shuffle needs them to; feed images of a size that gives a multiple "
                         f"(Idefics3-8B uses 364 px with patch 14)")
        source = PartsSource({"text/": text.source, "vision/": vision}, made)
    except BaseException:
        vision.close()
        raise
    side_files, note = write_processor(text.side_files, vision_dir, d.vocab, NEW_TOKENS, vcfg["image_size"],
                                       vcfg["patch_size"], scale_factor, workdir)
    notes.append(note)
    return Checkpoint(path=text.path, format=text.format,
                      variant=f"idefics3 assembled from {text.path.name} + {vision_dir.name}", model=model,
                      source=source, rules=rules, dropped=dropped, notes=notes, side_files=side_files,
                      generation_config=text.generation_config)

