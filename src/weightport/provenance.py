"""weightport-manifest.json: what an output was made from and how, with a sha256 of every file and
of every tensor as it was handed to the writer. verify/manifest.py re-hashes an output against it.

Tensor hashes are taken while streaming (the bytes are in memory anyway), and so are the hashes of
the data files (io/hashed_file.py); only the small files written after them are read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .dtypes import short_name
from .io.hashed_file import digest_if_written
from .ops import Identity
from .paths import MANIFEST
from .version import __version__

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
