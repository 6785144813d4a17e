"""Output data files: closed durably (fsync before the output is renamed into place), and taking
their own sha256 as their bytes go out.

Every writer writes its data files front to back, so the digest of the writes is the digest of
the file: the provenance manifest then needs no second pass over data it just wrote (for an 8B
model that pass was a 16 GB re-read, half again the time of the conversion's own `cp`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# path -> (size, mtime_ns, sha256) of each file closed; kept apart from the writers because
# they are made deep inside each format, and the manifest only has the directory
_closed: dict[str, tuple[int, int, str]] = {}
_lock = threading.Lock()
# off for a conversion that writes no manifest (`--no-manifest`): its files are then plain files
_hashing = contextvars.ContextVar("weightport_file_hashing", default=True)


@contextlib.contextmanager
def file_hashing(on: bool):
    """Whether HashedFiles opened within take a digest."""
    token = _hashing.set(on)
    try:
        yield
    finally:
        _hashing.reset(token)


class HashedFile:
    """A binary file opened for writing; each write is hashed on a second thread while the file
    write runs (both release the GIL), and finished before `write` returns, because callers
    reuse or release the buffer as soon as it does."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._h = hashlib.sha256() if _hashing.get() else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weightport-file-hash")

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._h is None:
            return self._f.write(view)
        if view.nbytes < 1 << 20:  # not worth a thread hop
            self._h.update(view)
            return self._f.write(view)
        job = self._pool.submit(self._h.update, view)
        try:
            return self._f.write(view)
        finally:
            job.result()

    def tell(self) -> int:
        return self._f.tell()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        if self._f.closed:
            return
        self._pool.shutdown()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self._h is None:
            return
        st = os.stat(self.path)
        with _lock:
            _closed[str(self.path.resolve())] = (st.st_size, st.st_mtime_ns, self._h.hexdigest())

    def abort(self) -> None:
        self._pool.shutdown()
        self._f.close()


def digest_if_written(path: Path) -> str | None:
    """The sha256 taken while this process wrote `path`, if the file is as it was then (a file
    moved by renaming its directory is not found, and is hashed again by the caller)."""
    with _lock:
        entry = _closed.pop(str(Path(path).resolve()), None)
    if entry is None:
        return None
    st = os.stat(path)
    size, mtime_ns, digest = entry
    return digest if (st.st_size, st.st_mtime_ns) == (size, mtime_ns) else None
