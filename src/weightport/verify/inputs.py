"""The token sequences both models run on, and which positions are scored.

Captions become `prompt + caption`, tokenized in two parts so the caption's tokens are known
exactly; as the seed's `loss_on_captions` scripts do, only caption tokens below the tokenizer's
base vocabulary (no added or special tokens) are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightportError
from ..tokenizer_files import TOKENIZER_FILES

PROMPT = "This image shows: "


@dataclass
class Inputs:
    sequences: list[list[int]]
    # per sequence, the positions t whose next token sequences[i][t + 1] is scored
    scored: list[list[int]]
    description: str


def find_tokenizer(*dirs: Path) -> Path | None:
    for d in dirs:
        d = d if d.is_dir() else d.parent
        if any((d / n).is_file() for n in TOKENIZER_FILES if n not in ("chat_template.jinja", "chat_template.json")):
            return d
    return None


def caption_inputs(tokenizer_dir: Path, data: str | Path | None, samples: int, vocab: int,
                   prompt: str = PROMPT) -> Inputs:
    from ..captions import load_captions

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise WeightportError("reading captions needs transformers' tokenizers: pip install transformers") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise WeightportError(f"{tokenizer_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    prefix = tok(prompt)["input_ids"]
    base_vocab = tok.vocab_size
    sequences, scored = [], []
    captions = load_captions(data, limit=samples)
    for sample in captions:
        caption = tok(sample.caption, add_special_tokens=False)["input_ids"]
        ids = prefix + caption
        if max(ids) >= vocab:
            raise WeightportError(f"{tokenizer_dir}: the tokenizer gives token id {max(ids)} for sample "
                                  f"{sample.key}, beyond the model's vocabulary of {vocab}")
        positions = [t for t in range(len(prefix) - 1, len(ids) - 1) if ids[t + 1] < base_vocab]
        sequences.append(ids)
        scored.append(positions)
    where = "the built-in caption set" if data is None else str(data)
    return Inputs(sequences, scored, f"{len(sequences)} captions from {where}, tokenizer {tokenizer_dir}, "
                                     f"prompt {prompt!r}")


def random_inputs(vocab: int, samples: int, length: int = 32, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(samples)]
    return Inputs(sequences, [list(range(length - 1)) for _ in sequences],
                  f"{samples} random token sequences of length {length} (seed {seed}): no tokenizer found")
