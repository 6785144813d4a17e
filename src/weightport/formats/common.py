"""Helpers several formats share: the Hugging Face side files (config, generation config, tokenizer,
remote code) that formats keep beside their weights, and small JSON writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..archs import Model
from ..format import Checkpoint
from ..paths import check_regular
from ..tokenizer_files import TOKENIZER_FILES


def write_hf_sidecar(directory: Path, source: Checkpoint, model: Model, config: dict | None = None) -> list[str]:
    """config.json (the hub's config, exact, or `config` when given), generation_config.json and
    the tokenizer files: all of the hf format's metadata, and what formats with configs of their
    own keep beside their weights so reading back loses nothing."""
    config = dict(model.config) if config is None else config
    write_json(directory / "config.json", dict(config, architectures=[model.arch.hf_class]))
    written = ["config.json"]
    if source.generation_config is not None:
        write_json(directory / "generation_config.json", source.generation_config)
        written.append("generation_config.json")
    return written + copy_side_files(source.side_files, directory)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_side_files(files: list[Path], directory: Path, skip: set[str] = frozenset()) -> list[str]:
    written = []
    for f in files:
        if f.name in skip:
            continue
        check_regular(f)  # a FIFO blocks the copy and /dev/zero never ends it
        shutil.copyfile(f, directory / f.name)
        written.append(f.name)
    return written


# what trust_remote_code checkpoints (ChatGLM, Baichuan2, InternLM, Qwen, CogVLM2) run from: their
# modeling/configuration/tokenization modules and Qwen's tokenizer table; copied, never imported
REMOTE_CODE_FILES = ("*.py", "*.tiktoken")


def find_side_files(directory: Path) -> list[Path]:
    named = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    code = sorted(p for pattern in REMOTE_CODE_FILES for p in directory.glob(pattern) if p.is_file())
    return named + code
