"""weightport-manifest.json: what an output was made from and how, with a sha256 of every file and
of every tensor as it was handed to the writer; and the check that re-hashes an output against it.

Tensor hashes are taken while streaming (the bytes are in memory anyway), and so are the hashes of
the data files (io/hashed_file.py); only the small files written after them are read back.
`check_manifest` re-reads both: a file whose bytes changed is reported by name, and each tensor
weightport's reader for the format can name is re-hashed and reported by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .dtypes import short_name
from .errors import WeightportError
from .io.hashed_file import digest_if_written
from .ops import Identity
from .paths import MANIFEST, check_regular, confined

_BLOCK = 16 * 2**20
HASH_THREADS = min(4, os.cpu_count() or 1)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(_bytes(t)).hexdigest()


def file_sha256(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class HashingWriter:
    """Passes tensors to a format's writer, hashing each one's bytes on the way.

    The hash runs on a second thread while the writer copies the same bytes (hashlib and file
    writes both release the GIL), and is finished before each call returns: the caller may release
    a tensor's memory (mapped pages) as soon as it is written."""

    def __init__(self, writer):
        self.writer = writer
        self.hashes: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weightport-hash")
        if hasattr(writer, "write_chunks"):
            self.write_chunks = self._write_chunks

    def write_group(self, names, tensors):
        job = self._pool.submit(lambda: [tensor_sha256(t) for t in tensors])
        try:
            self.writer.write_group(names, tensors)
        finally:
            digests = job.result()
        self.hashes.update(zip(names, digests))

    def _write_chunks(self, name, shape, dtype, chunks):
        h = hashlib.sha256()
        pending = []

        def hashed():
            for piece in chunks:
                for job in pending:  # in order: one piece hashing while the writer writes the next
                    job.result()
                pending[:] = [self._pool.submit(h.update, _bytes(piece))]
                yield piece

        try:
            self.writer.write_chunks(name, shape, dtype, hashed())
        finally:
            for job in pending:
                job.result()
        self.hashes[name] = h.hexdigest()

    def close(self):
        self._pool.shutdown()
        self.writer.close()

    def abort(self):
        self._pool.shutdown()
        self.writer.abort()


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_manifest(directory: Path, plan, tensor_hashes: dict[str, str]) -> None:
    """The manifest of a finished output directory (every file in it is hashed)."""
    source = plan.source
    files = hash_files(directory)
    where = {t.name: f.name for f in plan.files for t in f.tensors}
    steps = [s.describe() for s in plan.read_steps + plan.write_steps if not isinstance(s.op, Identity)]
    manifest = {
        # no timestamp: the same conversion writes the same bytes, manifest included
        "tool": "weightport", "version": __version__,
        "source": {"path": str(Path(source.path).resolve()), "format": source.format.name, "variant": source.variant,
                   "files": [{"name": str(Path(p).resolve()), "bytes": p.stat().st_size} for p in source.source.files]},
        "target": {"format": plan.target.name, "layout": plan.layout, "tp": plan.options.tp, "pp": plan.options.pp},
        "model": {"arch": source.model.arch.name, "hf_class": source.model.arch.hf_class},
        "dtype_policy": "keep each tensor's source dtype" if plan.dtype is None else f"floating point as {short_name(plan.dtype)}",
        "rules": {"renamed": sum(isinstance(s.op, Identity) for s in plan.write_steps), "changed": steps},
        "dropped": dict(plan.dropped), "notes": source.notes + plan.notes, "warnings": plan.warnings,
        "files": files,
        "tensors": {t.name: {"file": where[t.name], "dtype": short_name(t.dtype), "shape": list(t.shape),
                             "sha256": tensor_hashes[t.name]} for t in plan.outputs if t.name in tensor_hashes},
    }
    save_manifest(directory, manifest)


def hash_files(directory: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file in a finished output directory."""
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]
    with ThreadPoolExecutor(HASH_THREADS) as pool:  # files not hashed while written: side by side
        digests = list(pool.map(lambda p: digest_if_written(p) or file_sha256(p), paths))
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": d}
            for p, d in zip(paths, digests)}


def save_manifest(directory: Path, manifest: dict) -> None:
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


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
    from . import formats
    from .api import open_checkpoint

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
