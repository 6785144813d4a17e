"""Output directories that appear whole or not at all.

Everything is written into a hidden sibling, `.OUT.weightport-partial-PID`, renamed to OUT only
when complete; a run killed at any point leaves OUT as it was. What a killed run leaves behind
is cleaned by the next run to the same OUT: a partial directory is removed, and an old OUT that
a killed `--force` run had moved aside (`.OUT.weightport-replaced-PID`) is put back if no new
OUT took its place.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import WeightportError
from .paths import check_replaceable

PARTIAL, REPLACED = ".weightport-partial-", ".weightport-replaced-"


def temp_sibling(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}{PARTIAL}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_leftovers(out_dir: Path) -> list[str]:
    """Remove (or restore) what interrupted runs to out_dir left; returns what was done."""
    done = []
    for kind in (PARTIAL, REPLACED):
        for p in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}{kind}*")):
            pid = p.name.rsplit(kind, 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue  # not ours to touch: a conversion still running
            if kind == REPLACED and not out_dir.exists():
                os.replace(p, out_dir)
                done.append(f"restored {out_dir.name} from {p.name}, which a --force run (process {pid}) had "
                            "moved aside before it was interrupted")
            else:
                remove(p)
                done.append(f"removed {p.name}, left by an interrupted run (process {pid})")
    return done


@contextmanager
def staged(out_dir: Path, force: bool, delete_existing: bool = False) -> Iterator[tuple[Path, list[str]]]:
    """Yields (a fresh temporary sibling to write into, notes on leftovers cleaned); on success
    renames it to out_dir, replacing an existing one only as paths.check_replaceable allows (it is
    checked again here: out_dir may have appeared, or changed, while converting)."""
    tmp = temp_sibling(out_dir)
    try:
        notes = clean_leftovers(out_dir)
        if tmp.exists():
            remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp, notes
        fsync_dir(tmp)
        if out_dir.exists() or out_dir.is_symlink():
            check_replaceable(out_dir, force, delete_existing)
            # moved aside, not deleted, until the new one is in place: a kill in between leaves it
            # for the next run to restore
            old = out_dir.parent / f".{out_dir.name}{REPLACED}{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            remove(old)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except OSError as e:
        raise WeightportError(f"{e.filename or out_dir}: write failed ({e.strerror or e}); no output was left") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def final_dir(directory: Path) -> Path:
    """The path an output directory will have: execute writes into .<name>.weightport-partial-<pid>
    and renames it at the end, and some configs must name the final path."""
    name = directory.name
    if name.startswith(".") and PARTIAL in name:
        name = name[1:].rsplit(PARTIAL, 1)[0]
    return (directory.parent / name).resolve()
