"""Crash safety: a conversion SIGKILLed at random points leaves its output absent or complete, never
partial; the next run cleans (or restores) what the killed one left; a full disk and a read-only
directory are one-line errors with nothing left behind."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import build_hf, run_cli, tree_digest

KILL_POINTS = 16


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "weightport", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def leftovers(directory, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}.weightport-"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """~290 MB of float32, so writing takes long enough to be killed in the middle of."""
    root = tmp_path_factory.mktemp("crash")
    src = build_hf("llama3", root / "hf", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                   num_hidden_layers=4, vocab_size=64000)
    ref = root / "ref"
    assert run_cli("convert", src, ref, "--to", "litgpt", "-q").returncode == 0
    return src, tree_digest(ref)


def _kill(proc: subprocess.Popen, out, when: str, rng: random.Random) -> None:
    """SIGKILL at a random moment: any time from start, or once the partial directory exists."""
    if when == "anytime":
        time.sleep(rng.uniform(0.0, 6.0))
    else:
        deadline = time.monotonic() + 60
        while not leftovers(out.parent, out.name) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.8))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_anywhere_the_output_is_absent_or_complete(big, tmp_path):
    src, expected = big
    rng = random.Random(7)
    outcomes = {"absent": 0, "complete": 0, "partial left": 0, "restored": 0}
    for i in range(KILL_POINTS):
        out = tmp_path / f"out{i}"
        force = i % 2 == 1
        if force:  # a --force run over an existing output: killed, the old one must survive or be restored
            assert run_cli("convert", src, out, "--to", "litgpt", "-q").returncode == 0
        proc = start("convert", src, out, "--to", "litgpt", "-q", *(["--force"] if force else []))
        _kill(proc, out, "anytime" if i < 4 else "writing", rng)

        if out.exists():
            assert tree_digest(out) == expected, f"kill point {i}: {out} exists but is not the complete output"
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        left = leftovers(tmp_path, out.name)
        outcomes["partial left"] += bool(left)

        # the next run says what it cleaned (or restored) and leaves nothing behind
        again = run_cli("convert", src, out, "--to", "litgpt", "--force")
        assert again.returncode == 0, again.stderr
        for name in left:
            assert name in again.stdout, (name, again.stdout)
        outcomes["restored"] += "note:    restored" in again.stdout
        assert leftovers(tmp_path, out.name) == []
        assert tree_digest(out) == expected
    # the kills did land in the middle of writing, and the outcome counts go to docs/reliability.md
    assert outcomes["partial left"] >= KILL_POINTS // 4, outcomes
    print("kill outcomes:", outcomes)


def test_a_killed_force_run_restores_the_old_output(big, tmp_path):
    """Between moving the old output aside and renaming the new one in: the next run puts it back."""
    src, expected = big
    out = tmp_path / "out"
    assert run_cli("convert", src, out, "--to", "litgpt", "-q").returncode == 0
    aside = tmp_path / ".out.weightport-replaced-999999999"  # a process id no system has
    os.replace(out, aside)
    proc = run_cli("inspect", src)  # any other command does not touch it
    assert proc.returncode == 0 and aside.exists()
    again = run_cli("convert", src, tmp_path / "out", "--to", "litgpt", "--dry-run")
    assert again.returncode == 0 and aside.exists()  # a dry run writes and cleans nothing
    again = run_cli("convert", src, out, "--to", "litgpt", "--force")
    assert again.returncode == 0, again.stderr
    assert ("note:    restored out from .out.weightport-replaced-999999999, which a --force run (process 999999999) "
            "had moved aside before it was interrupted") in again.stdout
    assert leftovers(tmp_path, "out") == [] and tree_digest(out) == expected


@contextlib.contextmanager
def small_filesystem(path, size: str, read_only: bool = False):
    """A tmpfs of `size` at path (root only); yields False where mounting is not allowed."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _limit_file_size():
    # writing past RLIMIT_FSIZE fails with EFBIG once SIGXFSZ (which would kill) is ignored
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    src = build_hf("llama3", tmp_path / "hf", vocab_size=4096)  # ~2.5 MB
    disk = tmp_path / "disk"
    with small_filesystem(disk, "256k") as mounted:
        out = disk / "out"
        if mounted:
            proc = run_cli("convert", src, out, "--to", "hf")
            why = "No space left on device"
        else:  # fault injection where no filesystem can be mounted: a file-size limit
            proc = subprocess.run([sys.executable, "-m", "weightport", "convert", str(src), str(out), "--to", "hf"],
                                  capture_output=True, text=True, preexec_fn=_limit_file_size)
            why = "File too large"
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("weightport: error: ") and "Traceback" not in proc.stderr
        assert lines[0].endswith(f": write failed ({why}); no output was left"), lines[0]
        assert list(disk.iterdir()) == []


def test_a_read_only_directory_is_one_line(tmp_path):
    src = build_hf("llama3", tmp_path / "hf")
    target = tmp_path / "ro"
    with small_filesystem(target, "1m", read_only=True) as mounted:
        if not mounted:
            os.chmod(target, 0o555)
        proc = run_cli("convert", src, target / "out", "--to", "litgpt")
        why = "Read-only file system" if mounted else "Permission denied"
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"weightport: error: {target}/.out.weightport-partial-")
        assert proc.stderr.endswith(f": write failed ({why}); no output was left\n")
        assert proc.stderr.count("\n") == 1
        assert list(target.iterdir()) == []
