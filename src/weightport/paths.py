"""What weightport may open and where it may write: the rules that keep a run's inputs safe.

Every path a user passes is an input (the source, an adapter, `--llm`, `build --text`, ...); its
files are only ever read, and no output may be, contain or lie inside one. Reading stops before
anything that is not a regular file, since a FIFO or a device blocks or never ends; and a file that
an index or manifest names must lie in the directory that holds the index.

An existing output is replaced (`--force`) only when weightport wrote it: an empty directory, or a
directory whose every file is listed in the weightport-manifest.json written with it. Anything else
(a directory of the user's files, a plain file) needs `--delete-existing`, named for what it does.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from .errors import WeightportError

MANIFEST = "weightport-manifest.json"

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | Path) -> None:
    """Refuses a path that exists but is not a regular file (symlinks followed), before it is
    opened; a missing path is left for the caller to report as it does."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise WeightportError(f"{path}: is {_kind(mode)}, not a regular file; not opened")


def check_input_tree(path: str | Path, flag: str) -> None:
    """Refuses an input holding a FIFO, device or socket anywhere in it (symlinks to files
    followed, symlinks to directories not descended), before any of it is opened."""
    path = Path(path)
    if not path.is_dir():
        try:
            check_regular(path)
        except WeightportError as e:
            raise WeightportError(f"{e} ({flag})") from None
        return
    for top, dirs, files in os.walk(path):
        for name in files + dirs:
            p = Path(top) / name
            try:
                mode = os.stat(p).st_mode
            except OSError:
                continue  # a dangling symlink: the reader says so if it needs the file
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise WeightportError(f"{p}: is {_kind(mode)}, not a regular file; not opened ({flag} {path})")


def confined(directory: Path, name, what: str) -> Path:
    """directory / name, for a file name read from `what` (an index, a manifest); refused when the
    name is not a relative path inside directory, or is a symlink that leaves it. A Hub cache
    snapshot's symlinks into its own blobs/ are inside: that is how the cache stores files."""
    if not isinstance(name, str) or not name:
        raise WeightportError(f"{what}: names a file as {name!r}, not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or "\0" in name:
        raise WeightportError(f"{what}: names {name!r}, which is outside {directory}; not opened")
    path = directory / name
    root, real = directory.resolve(), path.resolve()
    in_cache_blobs = root.parent.name == "snapshots" and real.is_relative_to(root.parent.parent / "blobs")
    if not (real.is_relative_to(root) or in_cache_blobs):
        raise WeightportError(f"{what}: names {name!r}, a symlink to {real}, which is outside {directory}; "
                              "not opened")
    return path


def _root(path: Path, alone: bool) -> Path:
    """What an input stands for: a directory itself; a file its directory (formats read the files
    beside a checkpoint), unless it is read `alone` (a yaml config, a data shard)."""
    real = path.resolve()
    return real if alone or real.is_dir() else real.parent


def check_not_input(out: str | Path, inputs: dict[str, str | Path | None], alone: tuple[str, ...] = ()) -> None:
    """`out` may not be, contain or lie inside any input (resolved through symlinks and `..`).
    `alone`: the flags of `inputs` whose files are read by themselves, so only the file is theirs."""
    o = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        root = _root(Path(path), flag in alone)
        if o == root or o.is_relative_to(root) or root.is_relative_to(o):
            raise WeightportError(f"{out}: is, contains or lies inside the input {path} ({flag}); choose another "
                                  "output")


def not_ours(out: Path) -> str | None:
    """Why `out` is not weightport's to replace, or None when it is (empty, or every file in it
    listed in its manifest)."""
    if out.is_symlink() or not out.is_dir():
        return "is a file, not a directory weightport wrote"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_symlink() or not p.is_dir())
    if not files:
        return None
    listed = _manifest_files(out)
    if listed is None:
        foreign = files
    else:
        foreign = [f for f in files if f not in listed and f != MANIFEST]
        if not foreign:
            return None
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return f"holds {len(foreign)} file(s) that no weightport manifest in it lists ({shown})"


def _manifest_files(out: Path) -> set[str] | None:
    path = out / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        return set(files) if isinstance(files, dict) else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def check_replaceable(out: Path, force: bool, delete_existing: bool) -> None:
    """An existing `out` may be replaced: with --force when weightport wrote it, or with
    --delete-existing whatever it holds."""
    if not (out.exists() or out.is_symlink()) or delete_existing:
        return
    if not force:
        raise WeightportError(f"{out}: already exists; pass --force to replace it")
    why = not_ours(out)
    if why:
        raise WeightportError(f"{out}: {why}; not replaced (pass --delete-existing to delete it anyway)")


def check_output(out: str | Path, inputs: dict[str, str | Path | None], *, force: bool = False,
                 delete_existing: bool = False) -> None:
    """Everything a run checks of its output before it starts."""
    check_not_input(out, inputs)
    check_replaceable(Path(out), force, delete_existing)


REPORT_TOOL = "weightport"  # the "tool" key of every JSON report weightport writes


def check_report_file(out: str | Path, inputs: dict[str, str | Path | None], flag: str,
                      alone: tuple[str, ...] = ()) -> None:
    """A JSON report file (`--report FILE`) may not lie inside an input, and replaces only an
    earlier weightport report."""
    check_not_input(out, inputs, alone)
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        if not out.parent.is_dir():  # found now, not once the run is over
            raise WeightportError(f"{out}: the directory to write it in, {out.parent}, does not exist ({flag})")
        return
    check_regular(out)
    try:
        ours = json.loads(out.read_text(encoding="utf-8")).get("tool") == REPORT_TOOL
    except (OSError, ValueError, AttributeError, RecursionError):
        ours = False
    if out.is_symlink() or not ours:
        raise WeightportError(f"{out}: exists and is not a report weightport wrote; not overwritten ({flag}: "
                              "choose another file or remove it)")
