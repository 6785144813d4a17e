"""The files a tokenizer consists of, and adding tokens to a Hugging Face tokenizer.json at fixed
ids, for formats whose models gain tokens (an image token) that the tokenizer must map to the rows
the weights hold.

Tokens can only be appended at the tokenizer's own next ids: the tokenizers library renumbers an
added token whose id would leave a gap (checked with tokenizers 0.22), so callers choose ids
from `size`, never past it.
"""

from __future__ import annotations

import json
from pathlib import Path

# files a tokenizer may consist of, in any of the formats we handle; copied verbatim
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


def size(tokenizer: dict) -> int | None:
    """How many ids a tokenizer.json uses (None: a model type whose vocabulary we cannot count)."""
    model = tokenizer.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        ids = list(vocab.values())
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs, ids are positions
        ids = [len(vocab) - 1] if vocab else []
    else:
        return None
    ids += [t["id"] for t in tokenizer.get("added_tokens") or []]
    return max(ids) + 1 if ids else 0


def token_id(tokenizer: dict, token: str) -> int | None:
    for t in tokenizer.get("added_tokens") or []:
        if t["content"] == token:
            return t["id"]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        return vocab.get(token)
    if isinstance(vocab, list):
        return next((i for i, p in enumerate(vocab) if p[0] == token), None)
    return None


def with_tokens(tokenizer: dict, config: dict, tokens: list[str]) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json with `tokens` appended as special tokens at the
    next ids (size(tokenizer), +1, ...)."""
    first = size(tokenizer)
    entries = [{"id": first + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for k, t in enumerate(tokens)]
    tokenizer = dict(tokenizer, added_tokens=list(tokenizer.get("added_tokens") or []) + entries)
    config = dict(config)
    if "added_tokens_decoder" in config:  # transformers 4.x keeps a copy of the added tokens here
        config["added_tokens_decoder"] = {**config["added_tokens_decoder"],
                                          **{str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries}}
    return tokenizer, config


def dump(path: Path, data: dict) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path
