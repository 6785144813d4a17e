"""`weightport verify --manifest`: re-hash an output against the weightport-manifest.json written
with it. A file whose bytes changed, a missing or an added file is reported by name, and each
tensor weightport's reader for the format can name is re-hashed and reported by name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import formats
from ..api import open_checkpoint
from ..errors import WeightportError
from ..paths import MANIFEST, check_regular, confined
from ..provenance import file_sha256, tensor_sha256


@dataclass
class ManifestCheck:
    directory: Path
    files_checked: int = 0
    tensors_checked: int = 0
    tensors_total: int = 0
    changed_files: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    added_files: list[str] = field(default_factory=list)
    changed_tensors: list[str] = field(default_factory=list)
    reader_error: str | None = None

    @property
    def intact(self) -> bool:
        return not (self.changed_files or self.missing_files or self.added_files or self.changed_tensors
                    or self.reader_error)

    def render(self) -> str:
        lines = [f"manifest: {self.directory / MANIFEST}",
                 f"files:    {self.files_checked} re-hashed, {len(self.changed_files)} changed, "
                 f"{len(self.missing_files)} missing, {len(self.added_files)} added",
                 f"tensors:  {self.tensors_checked} of {self.tensors_total} re-hashed through weightport's reader, "
                 f"{len(self.changed_tensors)} changed"]
        lines += [f"changed file:   {n}" for n in self.changed_files]
        lines += [f"missing file:   {n}" for n in self.missing_files]
        lines += [f"added file:     {n}" for n in self.added_files]
        lines += [f"changed tensor: {n}" for n in self.changed_tensors]
        if self.reader_error:
            lines.append(f"unreadable:     {self.reader_error}")
        lines.append(f"verdict:  {'intact' if self.intact else 'CHANGED since it was written'}")
        return "\n".join(lines)


def _present(directory: Path) -> list[str]:
    """Every file, symlink and special file under directory (empty directories too), as manifest names."""
    out = []
    for p in sorted(directory.rglob("*")):
        if p.is_symlink() or not p.is_dir() or not any(p.iterdir()):
            out.append(p.relative_to(directory).as_posix())
    return out


def check_manifest(directory: str | Path) -> ManifestCheck:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise WeightportError(f"{directory}: no {MANIFEST} to check against")
    check_regular(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files, tensors, target = manifest["files"], manifest["tensors"], manifest["target"]["format"]
        if not (isinstance(files, dict) and isinstance(tensors, dict) and isinstance(target, str)):
            raise TypeError("files, tensors or target of the wrong type")
        for name, entry in files.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) \
                    or not isinstance(entry.get("sha256"), str):
                raise TypeError(f"file entry {name!r} is not {{bytes, sha256}}")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise WeightportError(f"{path}: not a weightport manifest ({e})") from None
    result = ManifestCheck(directory, tensors_total=len(tensors))
    result.added_files = [n for n in _present(directory) if n not in files and n != MANIFEST]
    for name, entry in files.items():
        f = confined(directory, name, str(path))
        if f.is_symlink() or not f.is_file():
            if f.exists() or f.is_symlink():
                result.changed_files.append(name)  # a symlink, directory or FIFO where a file was written
            else:
                result.missing_files.append(name)
            continue
        result.files_checked += 1
        if f.stat().st_size != entry["bytes"] or file_sha256(f) != entry["sha256"]:
            result.changed_files.append(name)
    if result.missing_files or target not in formats.FORMATS:
        return result  # (a peft adapter has no reader here: its file hashes cover its tensors)
    try:
        ckpt = open_checkpoint(directory, target)
    except WeightportError as e:  # changed beyond reading: the file hashes above say which
        result.reader_error = str(e)
        return result
    try:
        stored = ckpt.source.tensors
        for name, entry in tensors.items():
            if name not in stored:
                continue  # a name the format's reader does not give back: its file's hash still covers it
            result.tensors_checked += 1
            if not isinstance(entry, dict) or tensor_sha256(ckpt.source.load(name)) != entry.get("sha256"):
                result.changed_tensors.append(name)
    finally:
        ckpt.close()
    return result
