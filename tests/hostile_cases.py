"""The hostile cases of issue 19 as data: what a hostile (or careless) user does, the weightport
command it comes down to, and the outcome it must have.

Each `Case` builds what it needs in its own temporary directory from tiny random models that are
built once (`Fixtures`), runs one command (in-process through `weightport.cli.main`, or in a
subprocess where it must: signals, a device that never ends), and `run_case` checks:

- the exit code, and the one stderr line (exact, or a stable prefix / pattern), never a traceback;
- every input is unchanged (a digest of every file, symlink and special file under it);
- after a failure, no output (or the old one, unchanged) and no `.OUT.weightport-partial-*` /
  `-replaced-*` directory anywhere; after a success, the output and what the case checks of it.

tests/test_hostile_cases.py runs every case; scripts/hostile_table.py runs them too and writes the
table in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import build_hf, word_tokenizer  # noqa: E402

E = "weightport: error: "  # how every refusal starts
HANG_SECONDS = 20  # a run still blocked on a FIFO after this long is unblocked and fails


# -- the data model -------------------------------------------------------------------------------

@dataclass
class Run:
    """What a case's setup built: the command, and the paths the outcome is checked against.

    names: placeholder -> path ("SRC", "OUT", ...); expected lines name paths as {SRC}, and the table
    shows them as SRC. Every named path but OUT that exists before the run is an input: it must be
    unchanged after it (and OUT too, if it existed and the run fails)."""

    argv: list
    names: dict[str, Path]
    check: Callable[[], None] | None = None  # success: what the output must hold (raises AssertionError)
    keep: tuple[Path, ...] = ()  # more paths that must be unchanged (unnamed)
    absent: tuple[Path, ...] = ()  # must not exist after the run, whatever its outcome (a payload's marker)
    after: Callable[[], None] | None = None  # checked after the run, whatever its outcome (raises AssertionError)
    changes: tuple[Path, ...] = ()  # named paths the case itself changes during the run (`after` checks them)
    fifos: tuple[Path, ...] = ()  # unblocked by the watchdog if the run hangs on one
    runner: Callable[[list], tuple[int, str, str]] | None = None  # runs argv itself (signals)
    subprocess: bool = False  # run `python -m weightport` with a timeout instead of in-process
    timeout: float = 120


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    does: str  # what the hostile user does, one line
    setup: Callable  # (Fixtures, tmp: Path) -> Run
    code: int = 1
    err: str | None = None  # the stderr line ({NAME} placeholders); None: stderr must be empty
    match: str = "exact"  # or "prefix", "re" (err is a regular expression, placeholders escaped)
    stdout: tuple[str, ...] = ()  # lines stdout must hold
    usage: bool = False  # an argparse error: its usage lines come before the error line


@dataclass
class Outcome:
    case: Case
    code: int | None
    stderr: str
    stdout: str
    failures: list[str]
    seconds: float
    names: dict[str, Path]

    @property
    def passed(self) -> bool:
        return not self.failures

    def shorten(self, text: str) -> str:
        return shorten(text, self.names)

    @property
    def observed(self) -> str:
        """The exit code and the line that shows the outcome (paths shortened)."""
        lines = self.stderr.strip().splitlines()
        if lines:
            shown = lines[-1]
        else:
            out = self.stdout.strip().splitlines()
            want = [sub(s, self.names) for s in self.case.stdout]
            picked = [ln for ln in out if ln in want] or out[-1:]
            shown = " / ".join(picked) if picked else "(no output)"
            shown = "stdout: " + shown if picked else shown
        return f"exit {self.code}: {self.shorten(shown)}"


def sub(template: str, names: dict[str, Path]) -> str:
    for name, path in names.items():
        template = template.replace("{" + name + "}", str(path))
    return template


def shorten(text: str, names: dict[str, Path]) -> str:
    """Paths of the run replaced by their placeholder names (longest first): /tmp/x/src/a -> SRC/a."""
    pairs = []
    for name, path in names.items():
        for p in {str(path), str(Path(path).resolve())}:
            pairs.append((p, name))
    for p, name in sorted(pairs, key=lambda pn: -len(pn[0])):
        text = text.replace(p, name)
    return text


def expected_text(case: Case) -> str:
    """The expected outcome as the table shows it."""
    if case.err is None:
        what = "no stderr"
    else:
        line = re.sub(r"\{([A-Z0-9_]+)\}", r"\1", case.err)
        if case.match == "re":
            line = line.replace("\\", "")
        what = f"{line}" + (" …" if case.match == "prefix" else "")
    shown = [re.sub(r"\{([A-Z0-9_]+)\}", r"\1", s) for s in case.stdout]
    extra = f"; stdout: {' / '.join(shown)}" if shown else ""
    return f"exit {case.code}: {what}{extra}"


# -- snapshots ------------------------------------------------------------------------------------

def snapshot(path: Path) -> dict[str, str]:
    """Every file (by content), symlink (by target) and special file under path, path itself included."""
    path = Path(path)
    out = {}

    def one(p: Path, rel: str) -> None:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[rel] = "absent"
            return
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "symlink -> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = f"file {st.st_mode & 0o7777:o} {h.hexdigest()}"
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = "dir"
            for child in sorted(os.listdir(p)):
                one(p / child, f"{rel}/{child}")
        else:
            out[rel] = f"special {stat.S_IFMT(st.st_mode):o}"

    one(path, ".")
    return out


def leftovers(root: Path) -> list[str]:
    """weightport's partial or moved-aside directories anywhere under root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*weightport-*")
                  if re.search(r"\.weightport-(partial|replaced)-", p.name))


# -- running one case -----------------------------------------------------------------------------

@contextlib.contextmanager
def _saved_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _unblock(fifos, stop: threading.Event, hung: list) -> None:
    """After HANG_SECONDS, open each FIFO for writing and close it: a reader blocked on it sees EOF."""
    if stop.wait(HANG_SECONDS):
        return
    while not stop.is_set():
        for f in fifos:
            try:
                fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            hung.append(str(f))
            os.close(fd)
        stop.wait(0.5)


def run_in_process(argv: list, fifos=()) -> tuple[int | None, str, str, list]:
    from weightport import cli

    out, err, hung = io.StringIO(), io.StringIO(), []
    stop = threading.Event()
    watchdog = threading.Thread(target=_unblock, args=(list(fifos), stop, hung), daemon=True)
    watchdog.start()
    code = None
    try:
        with _saved_signal_handlers(), warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("default")  # as `python -m weightport` shows them
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            try:
                code = cli.main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - what the user would see: a traceback
                err.write(traceback.format_exc())
                code = None
        for w in caught:
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    finally:
        stop.set()
        watchdog.join()
    return code, out.getvalue(), err.getvalue(), hung


def run_subprocess(argv: list, timeout: float) -> tuple[int | None, str, str, list]:
    try:
        proc = subprocess.run([sys.executable, "-m", "weightport", *map(str, argv)], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace"), \
            [f"timed out after {timeout} s"]
    return proc.returncode, proc.stdout, proc.stderr, []


def run_case(case: Case, fx: "Fixtures", tmp: Path) -> Outcome:
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    run = case.setup(fx, tmp)
    names = {"T": tmp, **run.names}
    out = names.get("OUT")
    out_existed = out is not None and os.path.lexists(out)
    watched = [p for n, p in names.items() if n not in ("T", "OUT") and os.path.lexists(p) and p not in run.changes]
    watched += list(run.keep)
    if out_existed and case.code != 0:
        watched.append(out)
    before = {str(p): snapshot(p) for p in watched}

    start = time.monotonic()
    if run.runner is not None:
        code, stdout, stderr = run.runner(run.argv)
        hung = []
    elif run.subprocess:
        code, stdout, stderr, hung = run_subprocess(run.argv, run.timeout)
    else:
        code, stdout, stderr, hung = run_in_process(run.argv, run.fifos)
    seconds = time.monotonic() - start

    failures = []
    if hung:
        failures.append(f"hung: {', '.join(hung)}")
    if code != case.code:
        failures.append(f"exit code {code}, expected {case.code}")
    if "Traceback" in stderr:
        failures.append("a traceback on stderr")
    lines = stderr.strip().splitlines()
    if case.err is None:
        if lines:
            failures.append(f"stderr not empty: {lines[:3]}")
    else:
        if case.usage:
            if not (lines and lines[0].startswith("usage: weightport")):
                failures.append(f"no usage line: {lines[:2]}")
            line = lines[-1] if lines else ""
        else:
            if len(lines) != 1:
                failures.append(f"{len(lines)} stderr lines, expected one: {lines[:4]}")
            line = lines[0] if lines else ""
        want = sub(case.err, names) if case.match != "re" else sub(case.err, {k: re.escape(str(v)) for k, v in
                                                                              names.items()})
        ok = (line == want if case.match == "exact" else line.startswith(want) if case.match == "prefix"
              else re.fullmatch(want, line) is not None)
        if not ok:
            failures.append(f"stderr line {line!r}, expected {'' if case.match == 'exact' else case.match + ' '}"
                            f"{want!r}")
    out_lines = stdout.splitlines()
    for s in case.stdout:
        if sub(s, names) not in out_lines:
            failures.append(f"stdout lacks {sub(s, names)!r}")

    for p, snap in before.items():
        now = snapshot(Path(p))
        if now != snap:
            diff = sorted(k for k in set(snap) | set(now) if snap.get(k) != now.get(k))
            failures.append(f"{shorten(p, names)} changed: {', '.join(diff[:5])}")
    left = leftovers(tmp) + ([] if out is None or out.parent == tmp or not out.parent.is_dir()
                             else leftovers(out.parent))
    if left:
        failures.append(f"left behind: {', '.join(left)}")
    for p in run.absent:
        if os.path.lexists(p):
            failures.append(f"{shorten(str(p), names)} exists: the payload ran")
    if case.code != 0 and out is not None and not out_existed and os.path.lexists(out):
        failures.append(f"{shorten(str(out), names)} exists after a failed run")
    if run.after is not None:
        try:
            run.after()
        except Exception as e:  # noqa: BLE001
            failures.append(f"check after the run failed: {type(e).__name__}: {e}")
    if case.code == 0 and code == 0 and run.check is not None:
        try:
            run.check()
        except Exception as e:  # noqa: BLE001 - AssertionError or a failed load
            failures.append(f"output check failed: {type(e).__name__}: {e}")
    return Outcome(case, code, stderr, stdout, failures, seconds, {**names, "FIXTURES": fx.root})


# -- shared fixtures (each built once, on first use) --------------------------------------------

class Fixtures:
    """Tiny models every case copies what it needs from."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _once(self, name: str, build: Callable[[Path], object]) -> Path:
        """root/name, built by build(path) unless an earlier run of the same root left it complete."""
        path, done = self.root / name, self.root / f".{name}.done"
        if not done.exists():
            if os.path.lexists(path):
                shutil.rmtree(path)
            build(path)
            done.touch()
        return path

    def _convert(self, name: str, to: str, **kw) -> Path:
        import weightport

        return self._once(name, lambda p: weightport.convert(self.hf, p, to, **kw))

    @cached_property
    def hf(self) -> Path:
        """A tiny Llama (2 layers, hidden 64, vocabulary 128) with a tokenizer."""
        return self._once("hf", lambda p: (build_hf("llama3", p), word_tokenizer(p, 128)))

    @cached_property
    def sharded(self) -> Path:
        """hf in three safetensors shards with an index (no manifest: a checkpoint as the Hub has it)."""
        def build(p):
            import weightport

            weightport.convert(self.hf, p, "hf", max_shard_size="100KB")
            (p / "weightport-manifest.json").unlink()
            assert len(list(p.glob("*.safetensors"))) >= 3
        return self._once("sharded", build)

    @cached_property
    def lit(self) -> Path:
        return self._convert("lit", "litgpt")

    @cached_property
    def nanotron(self) -> Path:
        return self._convert("nanotron", "nanotron", tp=2)

    @cached_property
    def mindspore(self) -> Path:
        return self._convert("mindspore", "mindspore")

    @cached_property
    def onnx(self) -> Path:
        return self._convert("onnx", "onnx")

    @cached_property
    def adapter(self) -> Path:
        """A PEFT LoRA adapter on hf (q_proj, v_proj; r 4, alpha 8)."""
        from test_lora_peft import make_adapter

        return self._once("adapter", lambda p: make_adapter(self.hf, p, r=4, lora_alpha=8,
                                                            target_modules=["q_proj", "v_proj"]))

    @cached_property
    def siglip(self) -> Path:
        def build(p):
            from transformers import SiglipConfig, SiglipModel

            torch.manual_seed(7)  # as tests/test_build.py builds it
            model = SiglipModel(SiglipConfig(vision_config=dict(
                hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8), text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=2, vocab_size=64, bos_token_id=None,
                                                eos_token_id=None, pad_token_id=None)))
            with torch.no_grad():
                for t in model.parameters():
                    t.copy_(0.1 * torch.randn_like(t))
            model.save_pretrained(p)
        return self._once("siglip", build)

    @cached_property
    def llava_parts(self) -> tuple[Path, Path, Path]:
        """(a projector-only xtuner checkpoint, its --llm, its --visual-encoder)."""
        from llava_parts import build_clip, build_llm, build_xtuner_dir, projector_weights

        llm = self._once("llm", build_llm)
        clip = self._once("clip", build_clip)
        pretrain = self._once("pretrain", lambda p: build_xtuner_dir(p, None, None, projector_weights()))
        return pretrain, llm, clip

    @cached_property
    def big(self) -> Path:
        """~290 MB of float32: long enough to write to be signalled in the middle of."""
        return self._once("big", lambda p: build_hf("llama3", p, hidden_size=512, intermediate_size=1024,
                                                     num_attention_heads=8, num_hidden_layers=4, vocab_size=64000))

    def tensor_edit(self, name: str, edit: Callable[[dict], None]) -> Path:
        """A copy of hf whose model.safetensors tensors went through `edit` (cached by name)."""
        def build(p):
            copy(self.hf, p)
            tensors = load_file(p / "model.safetensors")
            edit(tensors)
            save_file(tensors, p / "model.safetensors", metadata={"format": "pt"})
        return self._once(f"edited-{name}", build)


# -- helpers for setups ---------------------------------------------------------------------------

def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if Path(src).is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)
    return dst


def fifo(path: Path) -> Path:
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)
    return path


def unix_socket(path: Path) -> Path:
    """A listening-capable socket file at path (bound from its directory: socket paths are short)."""
    if os.path.lexists(path):
        os.unlink(path)
    here = os.getcwd()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(path.parent)
        s.bind(path.name)
    finally:
        os.chdir(here)
        s.close()
    return path


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict | str | bytes, data: bytes, length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def by_offset(header: dict) -> list[tuple[str, dict]]:
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


CASES: list[Case] = []


def case(id: str, category: str, does: str, code: int = 1, err: str | None = None, match: str = "exact",
         stdout: tuple[str, ...] = (), usage: bool = False):
    """Decorator: the function below is the setup of a new case."""
    def register(setup):
        if any(c.id == id for c in CASES):
            raise ValueError(f"case id {id!r} twice")
        CASES.append(Case(id, category, does, setup, code, err, match, tuple(stdout), usage))
        return setup
    return register


def add(id: str, category: str, does: str, setup, **kw) -> None:
    case(id, category, does, **kw)(setup)



def _exists(*paths: Path) -> Callable[[], None]:
    def check():
        for p in paths:
            assert Path(p).is_file(), f"{p} missing"
    return check


def _same_tensors(out: Path, src: Path) -> Callable[[], None]:
    """The output's safetensors hold exactly the source's tensors, every bit."""
    def check():
        want, got = tensors_of(src), tensors_of(out)
        assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:3]
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    return check


def _lit_equals(out: Path, lit: Path) -> Callable[[], None]:
    def check():
        want = torch.load(lit / "lit_model.pth", weights_only=True)
        got = torch.load(out / "lit_model.pth", weights_only=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return check


INSIDE = "{OUT}: is, contains or lies inside the input {%s} (%s); choose another output"

# -- input protection: no output may be, contain or lie inside any input ------------------------------
IP = "input protection"


@case("out-is-src", IP, "names the source as the output, with --force", err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    return Run(["convert", src, src, "--to", "litgpt", "--force"], {"SRC": src, "OUT": src})


@case("out-is-src-delete-existing", IP, "names the source as the output, with --delete-existing",
      err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    return Run(["convert", src, src, "--to", "hf", "--delete-existing"], {"SRC": src, "OUT": src})


@case("out-inside-src", IP, "writes the output into a new subdirectory of the source", err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    return Run(["convert", src, src / "lit", "--to", "litgpt"], {"SRC": src, "OUT": src / "lit"})


@case("out-contains-src", IP, "names the source's parent directory as the output, --delete-existing",
      err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    src = copy(fx.hf, t / "parent" / "src")
    return Run(["convert", src, t / "parent", "--to", "litgpt", "--delete-existing"], {"SRC": src, "OUT": t / "parent"})


@case("out-dotdot-into-src", IP, "reaches into the source through `x/../src/out`", err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "x").mkdir()
    return Run(["convert", src, t / "x" / ".." / "src" / "out", "--to", "litgpt"],
               {"SRC": src, "OUT": t / "x" / ".." / "src" / "out"})


@case("out-symlink-to-src", IP, "gives as output a symlink to the source, with --delete-existing",
      err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "link").symlink_to(src)
    return Run(["convert", src, t / "link", "--to", "litgpt", "--delete-existing"], {"SRC": src, "OUT": t / "link"})


@case("out-dangling-symlink-into-src", IP, "gives as output a dangling symlink that points into the source",
      err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "link").symlink_to(src / "new")
    return Run(["convert", src, t / "link", "--to", "litgpt", "--force"], {"SRC": src, "OUT": t / "link"})


@case("src-via-symlink-out-in-real-dir", IP, "passes the source through a symlink, the output inside its real directory",
      err=E + INSIDE % ("SRC", "SRC"))
def _(fx, t):
    real = copy(fx.hf, t / "real")
    (t / "srclink").symlink_to(real)
    return Run(["convert", t / "srclink", real / "out", "--to", "litgpt"],
               {"SRC": t / "srclink", "REAL": real, "OUT": real / "out"})


@case("out-beside-a-pth-source", IP, "converts a LitGPT .pth file into a directory next to it",
      err=E + INSIDE % ("PTH", "SRC"))
def _(fx, t):
    lit = copy(fx.lit, t / "lit")
    return Run(["convert", lit / "lit_model.pth", lit / "hf", "--to", "hf"],
               {"LIT": lit, "PTH": lit / "lit_model.pth", "OUT": lit / "hf"})


@case("out-is-adapter-force", IP, "merges an adapter and writes over the adapter itself with --force",
      err=E + INSIDE % ("ADAPTER", "--merge-lora"))
def _(fx, t):
    src, adapter = copy(fx.hf, t / "src"), copy(fx.adapter, t / "adapter")
    return Run(["convert", src, adapter, "--to", "litgpt", "--merge-lora", adapter, "--force"],
               {"SRC": src, "ADAPTER": adapter, "OUT": adapter})


@case("out-is-adapter-delete-existing", IP, "writes over the adapter with --delete-existing",
      err=E + INSIDE % ("ADAPTER", "--merge-lora"))
def _(fx, t):
    src, adapter = copy(fx.hf, t / "src"), copy(fx.adapter, t / "adapter")
    return Run(["convert", src, adapter, "--to", "hf", "--merge-lora", adapter, "--delete-existing"],
               {"SRC": src, "ADAPTER": adapter, "OUT": adapter})


@case("out-inside-adapter", IP, "writes the merged model into a subdirectory of the adapter",
      err=E + INSIDE % ("ADAPTER", "--merge-lora"))
def _(fx, t):
    src, adapter = copy(fx.hf, t / "src"), copy(fx.adapter, t / "adapter")
    return Run(["convert", src, adapter / "merged", "--to", "hf", "--merge-lora", adapter],
               {"SRC": src, "ADAPTER": adapter, "OUT": adapter / "merged"})


@case("out-contains-adapter", IP, "names as output a directory that holds the adapter (and a planted manifest)",
      err=E + INSIDE % ("ADAPTER", "--merge-lora"))
def _(fx, t):
    src, adapter = copy(fx.hf, t / "src"), copy(fx.adapter, t / "outer" / "adapter")
    (t / "outer" / "weightport-manifest.json").write_text('{"files": {}}')
    return Run(["convert", src, t / "outer", "--to", "hf", "--merge-lora", adapter, "--force"],
               {"SRC": src, "ADAPTER": adapter, "OUT": t / "outer"})


@case("out-adapter-via-dotdot", IP, "reaches the adapter as `x/../adapter`", err=E + INSIDE % ("ADAPTER", "--merge-lora"))
def _(fx, t):
    src, adapter = copy(fx.hf, t / "src"), copy(fx.adapter, t / "adapter")
    (t / "x").mkdir()
    return Run(["convert", src, t / "x" / ".." / "adapter", "--to", "hf", "--merge-lora", adapter, "--force"],
               {"SRC": src, "ADAPTER": adapter, "OUT": t / "x" / ".." / "adapter"})


@case("out-symlink-to-adapter", IP, "gives as output a symlink to the adapter, with --delete-existing",
      err=E + INSIDE % ("ADAPTER", "--merge-lora"))
def _(fx, t):
    src, adapter = copy(fx.hf, t / "src"), copy(fx.adapter, t / "adapter")
    (t / "link").symlink_to(adapter)
    return Run(["convert", src, t / "link", "--to", "hf", "--merge-lora", adapter, "--delete-existing"],
               {"SRC": src, "ADAPTER": adapter, "OUT": t / "link"})


def _llava(fx, t):
    pretrain, llm, clip = fx.llava_parts
    return copy(pretrain, t / "pretrain"), copy(llm, t / "llm"), copy(clip, t / "clip")


@case("out-is-llm", IP, "completes an xtuner checkpoint and writes over its --llm base with --force",
      err=E + INSIDE % ("LLM", "--llm"))
def _(fx, t):
    src, llm, clip = _llava(fx, t)
    return Run(["convert", src, llm, "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip, "--force"],
               {"SRC": src, "LLM": llm, "CLIP": clip, "OUT": llm})


@case("out-inside-llm", IP, "writes the LLaVA into a subdirectory of the --llm base", err=E + INSIDE % ("LLM", "--llm"))
def _(fx, t):
    src, llm, clip = _llava(fx, t)
    return Run(["convert", src, llm / "llava", "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip],
               {"SRC": src, "LLM": llm, "CLIP": clip, "OUT": llm / "llava"})


@case("out-is-visual-encoder", IP, "writes over the --visual-encoder base with --delete-existing",
      err=E + INSIDE % ("CLIP", "--visual-encoder"))
def _(fx, t):
    src, llm, clip = _llava(fx, t)
    return Run(["convert", src, clip, "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip, "--delete-existing"],
               {"SRC": src, "LLM": llm, "CLIP": clip, "OUT": clip})


@case("out-symlink-to-visual-encoder", IP, "gives as output a symlink to the --visual-encoder base, --force",
      err=E + INSIDE % ("CLIP", "--visual-encoder"))
def _(fx, t):
    src, llm, clip = _llava(fx, t)
    (t / "link").symlink_to(clip)
    return Run(["convert", src, t / "link", "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip, "--force"],
               {"SRC": src, "LLM": llm, "CLIP": clip, "OUT": t / "link"})


@case("llava-parts-complete", IP, "completes an xtuner checkpoint from --llm and --visual-encoder (the allowed way)",
      code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    src, llm, clip = _llava(fx, t)
    out = t / "out"
    return Run(["convert", src, out, "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip],
               {"SRC": src, "LLM": llm, "CLIP": clip, "OUT": out}, check=_exists(out / "model.safetensors"))


def _parts(fx, t):
    return copy(fx.hf, t / "text"), copy(fx.siglip, t / "vision")


@case("build-out-is-text", IP, "builds an Idefics3 over its own --text part with --force", err=E + INSIDE % ("TEXT", "--text"))
def _(fx, t):
    text, vision = _parts(fx, t)
    return Run(["build", "idefics3", text, "--text", text, "--vision", vision, "--force"],
               {"TEXT": text, "VISION": vision, "OUT": text})


@case("build-out-is-vision", IP, "builds over its --vision part with --delete-existing",
      err=E + INSIDE % ("VISION", "--vision"))
def _(fx, t):
    text, vision = _parts(fx, t)
    return Run(["build", "idefics3", vision, "--text", text, "--vision", vision, "--delete-existing"],
               {"TEXT": text, "VISION": vision, "OUT": vision})


@case("build-out-inside-vision", IP, "builds into a subdirectory of the --vision part",
      err=E + INSIDE % ("VISION", "--vision"))
def _(fx, t):
    text, vision = _parts(fx, t)
    return Run(["build", "idefics3", vision / "idefics3", "--text", text, "--vision", vision],
               {"TEXT": text, "VISION": vision, "OUT": vision / "idefics3"})


@case("build-out-contains-parts", IP, "builds into the directory holding both parts, --delete-existing",
      err=E + INSIDE % ("TEXT", "--text"))
def _(fx, t):
    text, vision = copy(fx.hf, t / "parts" / "text"), copy(fx.siglip, t / "parts" / "vision")
    return Run(["build", "idefics3", t / "parts", "--text", text, "--vision", vision, "--delete-existing"],
               {"TEXT": text, "VISION": vision, "OUT": t / "parts"})


@case("build-out-symlink-to-text", IP, "builds into a symlink to the --text part, --force", err=E + INSIDE % ("TEXT", "--text"))
def _(fx, t):
    text, vision = _parts(fx, t)
    (t / "link").symlink_to(text)
    return Run(["build", "idefics3", t / "link", "--text", text, "--vision", vision, "--force"],
               {"TEXT": text, "VISION": vision, "OUT": t / "link"})


def _mf(src: Path, out: Path, *flags) -> list:
    """MindFormers' convert_weight.py command line, as `weightport mindformers` takes it."""
    return ["mindformers", "--model", "llama", "--input_path", src, "--output_path", out, *flags]


@case("mf-out-inside-input", IP, "`weightport mindformers` writes the .ckpt into --input_path, --force",
      err=E + INSIDE % ("SRC", "--input_path"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    return Run(_mf(src, src / "model.ckpt", "--force"), {"SRC": src, "OUT": src / "model.ckpt"})


@case("mf-out-is-config", IP, "`weightport mindformers` names its --config yaml as --output_path, --delete-existing",
      err=E + INSIDE % ("CONFIG", "--config"))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    cfg = t / "llama.yaml"
    cfg.write_text("model:\n  model_config:\n    qkv_concat: false\n")
    return Run(_mf(src, cfg, "--config", cfg, "--delete-existing"), {"SRC": src, "CONFIG": cfg, "OUT": cfg})


@case("mf-reversed-out-inside-ckpt-dir", IP, "`weightport mindformers --reversed` writes HF next to the .ckpt it reads",
      err=E + INSIDE % ("CKPT", "--input_path"))
def _(fx, t):
    ms = copy(fx.mindspore, t / "ms")
    ckpt = next(ms.glob("*.ckpt"))
    return Run(["mindformers", "--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", ms / "hf"],
               {"CKPT": ckpt, "MS": ms, "OUT": ms / "hf"})


# -- --force replaces only what weightport wrote; --delete-existing is the explicit way ----------------
F = "--force"
NOT_OURS = "{OUT}: holds %s; not replaced (pass --delete-existing to delete it anyway)"
IS_A_FILE = E + "{OUT}: is a file, not a directory weightport wrote; not replaced (pass --delete-existing to delete it anyway)"


def _foreign(t: Path, files: dict[str, str]) -> Path:
    out = t / "out"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    out.mkdir(exist_ok=True)
    return out


def _own(fx, t, to: str = "litgpt", **kw) -> Path:
    import weightport

    weightport.convert(fx.hf, t / "out", to, **kw)
    return t / "out"


@case("existing-dir-without-force", F, "converts onto an existing empty directory without --force",
      err=E + "{OUT}: already exists; pass --force to replace it")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "out").mkdir()
    return Run(["convert", src, t / "out", "--to", "litgpt"], {"SRC": src, "OUT": t / "out"})


@case("force-empty-dir", F, "replaces an empty directory with --force", code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "out").mkdir()
    return Run(["convert", src, t / "out", "--to", "litgpt", "--force"], {"SRC": src, "OUT": t / "out"},
               check=_lit_equals(t / "out", fx.lit))


@case("force-foreign-dir", F, "uses --force on a directory of their own files (thesis.txt, sub/notes.md)",
      err=E + NOT_OURS % "2 file(s) that no weightport manifest in it lists (sub/notes.md, thesis.txt)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _foreign(t, {"thesis.txt": "four years", "sub/notes.md": "notes"})
    return Run(["convert", src, out, "--to", "litgpt", "--force"], {"SRC": src, "OUT": out})


@case("force-foreign-dir-many-files", F, "uses --force on a directory of five files of theirs",
      err=E + NOT_OURS % "5 file(s) that no weightport manifest in it lists (a.txt, b.txt, c.txt and 2 more)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _foreign(t, {f"{c}.txt": c for c in "abcde"})
    return Run(["convert", src, out, "--to", "hf", "--force"], {"SRC": src, "OUT": out})


@case("force-foreign-dotfile", F, "uses --force on a directory holding only a hidden .env file",
      err=E + NOT_OURS % "1 file(s) that no weightport manifest in it lists (.env)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _foreign(t, {".env": "TOKEN=secret"})
    return Run(["convert", src, out, "--to", "hf", "--force"], {"SRC": src, "OUT": out})


@case("force-foreign-dir-build", F, "uses `build --force` on a directory of their own files",
      err=E + NOT_OURS % "1 file(s) that no weightport manifest in it lists (thesis.txt)")
def _(fx, t):
    text, vision = _parts(fx, t)
    out = _foreign(t, {"thesis.txt": "four years"})
    return Run(["build", "idefics3", out, "--text", text, "--vision", vision, "--force"],
               {"TEXT": text, "VISION": vision, "OUT": out})


@case("force-foreign-dir-dry-run", F, "uses --force --dry-run on a directory of their own files",
      err=E + NOT_OURS % "1 file(s) that no weightport manifest in it lists (thesis.txt)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _foreign(t, {"thesis.txt": "four years"})
    return Run(["convert", src, out, "--to", "hf", "--force", "--dry-run"], {"SRC": src, "OUT": out})


@case("delete-existing-foreign-dir", F, "replaces a directory of their own files with the explicit --delete-existing",
      code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _foreign(t, {"thesis.txt": "four years", "sub/notes.md": "notes"})

    def check():
        assert not (out / "thesis.txt").exists() and not (out / "sub").exists()
        _lit_equals(out, fx.lit)()
    return Run(["convert", src, out, "--to", "litgpt", "--delete-existing"], {"SRC": src, "OUT": out}, check=check)


@case("plain-file-without-force", F, "names an existing plain file as the output",
      err=E + "{OUT}: already exists; pass --force to replace it")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "out").write_text("a file")
    return Run(["convert", src, t / "out", "--to", "litgpt"], {"SRC": src, "OUT": t / "out"})


@case("plain-file-force", F, "names an existing plain file as the output, with --force", err=IS_A_FILE)
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "out").write_text("a file")
    return Run(["convert", src, t / "out", "--to", "litgpt", "--force"], {"SRC": src, "OUT": t / "out"})


@case("plain-file-delete-existing", F, "replaces a plain file with --delete-existing", code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "out").write_text("a file")
    return Run(["convert", src, t / "out", "--to", "litgpt", "--delete-existing"], {"SRC": src, "OUT": t / "out"},
               check=_lit_equals(t / "out", fx.lit))


@case("symlink-to-dir-force", F, "names as output a symlink to a directory of theirs, with --force", err=IS_A_FILE)
def _(fx, t):
    src = copy(fx.hf, t / "src")
    target = _foreign(t, {"keep.txt": "keep"})
    (t / "link").symlink_to(target)
    return Run(["convert", src, t / "link", "--to", "litgpt", "--force"], {"SRC": src, "TARGET": target, "OUT": t / "link"})


@case("symlink-to-own-output-force", F, "names as output a symlink to an earlier weightport output, --force",
      err=IS_A_FILE)
def _(fx, t):
    src = copy(fx.hf, t / "src")
    target = _own(fx, t)
    (t / "link").symlink_to(target)
    return Run(["convert", src, t / "link", "--to", "hf", "--force"], {"SRC": src, "TARGET": target, "OUT": t / "link"})


@case("symlink-delete-existing", F, "replaces a symlink to their directory with --delete-existing: the link goes, "
      "the directory stays", code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    target = _foreign(t, {"keep.txt": "keep"})
    link = t / "link"
    link.symlink_to(target)

    def check():
        assert not link.is_symlink() and (link / "lit_model.pth").is_file()
    return Run(["convert", src, link, "--to", "litgpt", "--delete-existing"], {"SRC": src, "TARGET": target, "OUT": link},
               check=check)


@case("dangling-symlink-force", F, "names as output a dangling symlink, with --force", err=IS_A_FILE)
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "link").symlink_to(t / "nowhere")
    return Run(["convert", src, t / "link", "--to", "litgpt", "--force"], {"SRC": src, "OUT": t / "link"})


@case("force-own-output", F, "replaces an earlier weightport output with --force (a different format)", code=0,
      stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t, "litgpt")

    def check():
        assert not (out / "lit_model.pth").exists()
        _same_tensors(out, src)()
    return Run(["convert", src, out, "--to", "hf", "--force"], {"SRC": src, "OUT": out}, check=check)


@case("force-own-output-extra-files", F, "adds evil.py and mine.txt to an earlier output, then --force",
      err=E + NOT_OURS % "2 file(s) that no weightport manifest in it lists (evil.py, mine.txt)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t)
    (out / "evil.py").write_text("print('hi')")
    (out / "mine.txt").write_text("mine")
    return Run(["convert", src, out, "--to", "litgpt", "--force"], {"SRC": src, "OUT": out})


@case("force-own-output-nested-file", F, "adds notes/2024/todo.md inside an earlier output, then --force",
      err=E + NOT_OURS % "1 file(s) that no weightport manifest in it lists (notes/2024/todo.md)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t, "hf")
    (out / "notes" / "2024").mkdir(parents=True)
    (out / "notes" / "2024" / "todo.md").write_text("todo")
    return Run(["convert", src, out, "--to", "hf", "--force"], {"SRC": src, "OUT": out})


@case("force-own-output-fifo-added", F, "adds a FIFO to an earlier output, then --force",
      err=E + NOT_OURS % "1 file(s) that no weightport manifest in it lists (pipe)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t, "hf")
    fifo(out / "pipe")
    return Run(["convert", src, out, "--to", "hf", "--force"], {"SRC": src, "OUT": out}, fifos=(out / "pipe",))


@case("force-no-manifest-output", F, "uses --force on an earlier --no-manifest output (nothing says weightport "
      "wrote it)", err=E + NOT_OURS % "6 file(s) that no weightport manifest in it lists (config.json, "
      "generation_config.json, lit_model.pth and 3 more)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t, "litgpt", manifest=False)
    return Run(["convert", src, out, "--to", "litgpt", "--force"], {"SRC": src, "OUT": out})


@case("force-manifest-not-json", F, "overwrites an earlier output's manifest with garbage, then --force",
      err=E + NOT_OURS % "7 file(s) that no weightport manifest in it lists (config.json, generation_config.json, "
      "lit_model.pth and 4 more)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t)
    (out / "weightport-manifest.json").write_text("{not json")
    return Run(["convert", src, out, "--to", "litgpt", "--force"], {"SRC": src, "OUT": out})


@case("force-manifest-is-a-symlink", F, "replaces an output's manifest by a symlink to a real manifest elsewhere, then "
      "--force", err=E + NOT_OURS % "7 file(s) that no weightport manifest in it lists (config.json, generation_config.json, "
      "lit_model.pth and 4 more)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t)
    manifest = out / "weightport-manifest.json"
    shutil.move(manifest, t / "manifest.json")
    manifest.symlink_to(t / "manifest.json")
    return Run(["convert", src, out, "--to", "litgpt", "--force"], {"SRC": src, "OUT": out, "MANIFEST": t / "manifest.json"})


@case("force-manifest-files-a-list", F, "edits an output's manifest so its files are a list, then --force",
      err=E + NOT_OURS % "7 file(s) that no weightport manifest in it lists (config.json, generation_config.json, "
      "lit_model.pth and 4 more)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t)
    edit_json(out / "weightport-manifest.json", lambda m: m.update(files=list(m["files"])))
    return Run(["convert", src, out, "--to", "litgpt", "--force"], {"SRC": src, "OUT": out})


@case("force-own-output-listed-file-now-a-symlink", F, "swaps a listed file of an earlier output for a symlink to "
      "their thesis, then --force: the output is replaced, the thesis is not touched", code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _own(fx, t, "hf")
    thesis = t / "thesis.txt"
    thesis.write_text("four years")
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(thesis)

    def check():
        assert not (out / "config.json").is_symlink() and json.loads((out / "config.json").read_text())
    return Run(["convert", src, out, "--to", "hf", "--force"], {"SRC": src, "OUT": out, "THESIS": thesis}, check=check)



@case("mf-force-not-a-ckpt", F, "`weightport mindformers --force` onto a notes file named like the .ckpt",
      err=E + "{OUT}: is not a MindSpore checkpoint; not replaced (pass --delete-existing to replace it anyway)")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "ms").mkdir()
    (t / "ms" / "model.ckpt").write_text("my notes")
    return Run(_mf(src, t / "ms" / "model.ckpt", "--force"), {"SRC": src, "OUT": t / "ms" / "model.ckpt"})


@case("mf-output-is-a-dir", F, "`weightport mindformers` names a directory as --output_path, --delete-existing",
      err=E + "{OUT}: is a directory; --output_path names the .ckpt file to write")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    out = _foreign(t, {"thesis.txt": "years of work"})
    return Run(_mf(src, out, "--delete-existing"), {"SRC": src, "OUT": out})


@case("mf-force-a-ckpt", F, "`weightport mindformers --force` replaces the .ckpt it wrote before", code=0,
      stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    ms = copy(fx.mindspore, t / "ms")
    ckpt = next(ms.glob("*.ckpt"))
    old = ckpt.read_bytes()

    def check():
        assert ckpt.read_bytes() != old  # bf16 now
    return Run(_mf(src, ckpt, "--force", "--dtype", "bf16"), {"SRC": src, "OUT": ckpt}, check=check)

# -- signals: SIGTERM and SIGHUP are Ctrl-C ------------------------------------------------------------
SIG = "signals"


def _written(out: Path) -> int:
    """Bytes written so far into out's partial directory (0 before it exists)."""
    total = 0
    for p in out.parent.glob(f".{out.name}.weightport-partial-*"):
        for f in p.rglob("*"):
            try:
                total += f.stat().st_size if f.is_file() else 0
            except OSError:
                pass
    return total


def _wait_for_writing(proc: subprocess.Popen, out: Path, at_least: int = 8 << 20) -> None:
    """Until the run has written `at_least` bytes into its partial directory (it is mid-write), or ended."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and _written(out) < at_least:
        time.sleep(0.002)


def _signalled(sig: int, times: int = 1) -> Callable[[list], tuple[int, str, str]]:
    """Runs argv in a subprocess and sends `sig` once its partial output directory exists."""
    def runner(argv):
        out = Path(argv[2])
        proc = subprocess.Popen([sys.executable, "-m", "weightport", *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        _wait_for_writing(proc, out)
        for _ in range(times):
            proc.send_signal(sig)
            time.sleep(0.05)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            return None, stdout, stderr + "\n(killed: still running 60 s after the signal)"
        return proc.returncode, stdout, stderr
    return runner


def _signal_case(name: str, sig: int, code: int, line: str, does: str, times: int = 1, force: bool = False):
    @case(name, SIG, does, code=code, err=line)
    def _(fx, t):
        out = t / "out"
        if force:
            import weightport

            weightport.convert(fx.big, out, "hf")
        argv = ["convert", fx.big, out, "--to", "litgpt", *(["--force"] if force else [])]
        return Run(argv, {"SRC": fx.big, "OUT": out}, runner=_signalled(sig, times))


_signal_case("sigterm-mid-conversion", signal.SIGTERM, 143, "weightport: stopped by SIGTERM; no output was left",
             "sends SIGTERM (kill, a scheduler's timeout) in the middle of writing a 290 MB conversion")
_signal_case("sighup-mid-conversion", signal.SIGHUP, 129, "weightport: stopped by SIGHUP; no output was left",
             "closes the terminal (SIGHUP) in the middle of writing")
_signal_case("sigint-mid-conversion", signal.SIGINT, 130, "weightport: interrupted; no output was left",
             "presses Ctrl-C (SIGINT) in the middle of writing")
_signal_case("sigterm-twice", signal.SIGTERM, 143, "weightport: stopped by SIGTERM; no output was left",
             "sends SIGTERM three times in a row, during writing and then during the cleanup", times=3)
_signal_case("sigterm-during-force", signal.SIGTERM, 143, "weightport: stopped by SIGTERM; no output was left",
             "sends SIGTERM to a --force run over an earlier output: the earlier output must survive intact",
             force=True)


def _while_writing(act: Callable[[Path], None]) -> Callable[[list], tuple[int, str, str]]:
    """Runs argv in a subprocess and calls act(out) once its partial output directory exists."""
    def runner(argv):
        out = Path(argv[2])
        proc = subprocess.Popen([sys.executable, "-m", "weightport", *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        _wait_for_writing(proc, out)
        act(out)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            return None, stdout, stderr
        return proc.returncode, stdout, stderr
    return runner


def _plant(out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "thesis.txt").write_text("four years")


def _thesis_intact(out: Path, *also: str) -> Callable[[], None]:
    def after():
        assert (out / "thesis.txt").read_text() == "four years"
        assert sorted(p.name for p in out.iterdir()) == sorted(["thesis.txt", *also]), sorted(os.listdir(out))
    return after


@case("out-appears-during-run", F, "creates OUT with their thesis.txt while a conversion to OUT is writing",
      err=E + "{DEST}: already exists; pass --force to replace it")
def _(fx, t):
    dest = t / "out"
    return Run(["convert", fx.big, dest, "--to", "litgpt"], {"SRC": fx.big, "DEST": dest}, runner=_while_writing(_plant),
               after=_thesis_intact(dest))


@case("file-planted-during-force", F, "plants thesis.txt in an earlier output while a --force run is replacing it",
      err=E + "{DEST}: holds 1 file(s) that no weightport manifest in it lists (thesis.txt); not replaced (pass "
      "--delete-existing to delete it anyway)")
def _(fx, t):
    import weightport

    dest = t / "out"
    weightport.convert(fx.hf, dest, "hf")
    before = snapshot(dest)

    def after():
        assert (dest / "thesis.txt").read_text() == "four years"
        now = snapshot(dest)
        del now["./thesis.txt"]
        assert now == before, "the earlier output changed"
    return Run(["convert", fx.big, dest, "--to", "hf", "--force"], {"SRC": fx.big, "DEST": dest},
               runner=_while_writing(_plant), after=after, changes=(dest,))


def _second_run(argv):
    """A second conversion to the same OUT, started while the first is writing: the first's output is
    complete and intact, the second refuses."""
    out = Path(argv[2])
    first = {}

    def start_second(_):
        first["proc"] = subprocess.Popen([sys.executable, "-m", "weightport", *map(str, argv)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code_a, _, err_a = _while_writing(start_second)(argv)
    proc = first["proc"]
    stdout, stderr = proc.communicate(timeout=120)
    if code_a != 0:
        return None, stdout, f"the first run failed: {err_a}"
    from weightport.verify.manifest import check_manifest

    if not check_manifest(out).intact:
        return None, stdout, "the first run's output is not intact"
    return proc.returncode, stdout, stderr


@case("two-runs-one-output", F, "starts a second conversion to the same OUT while the first is writing",
      err=E + "{DEST}: already exists; pass --force to replace it")
def _(fx, t):
    dest = t / "out"
    return Run(["convert", fx.big, dest, "--to", "litgpt"], {"SRC": fx.big, "DEST": dest}, runner=_second_run)


# -- verify --manifest: anything changed, missing or added since writing breaks it ----------------
M = "manifest"
CHANGED = "verdict:  CHANGED since it was written"


def _manifest_case(name: str, does: str, plant: Callable[[Path, Path], None], lines: tuple[str, ...], to: str = "hf",
                   code: int = 1, fifos: tuple[str, ...] = (), **kw):
    @case(name, M, does, code=code, stdout=lines + ((CHANGED,) if code else ("verdict:  intact",)))
    def _(fx, t):
        out = _own(fx, t, to, **kw)
        plant(out, t)
        return Run(["verify", "--manifest", out], {"OUT": out}, fifos=tuple(out / f for f in fifos))


def _write(name: str, text: str = "planted"):
    def plant(out, t):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return plant


def _flip_tensor_byte(tensor: str, file: str = "model.safetensors"):
    def plant(out, t):
        f = out / file
        header, _ = read_header(f)
        begin, end = header[tensor]["data_offsets"]
        (n,) = struct.unpack("<Q", f.read_bytes()[:8])
        data = bytearray(f.read_bytes())
        data[8 + n + (begin + end) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    return plant


def _swap_tensors(a: str, b: str):
    def plant(out, t):
        f = out / "model.safetensors"
        header, data = read_header(f)
        raw = f.read_bytes()
        body = bytearray(data)
        (ab, ae), (bb, be) = header[a]["data_offsets"], header[b]["data_offsets"]
        body[ab:ae], body[bb:be] = data[bb:be], data[ab:ae]
        f.write_bytes(raw[:len(raw) - len(data)] + bytes(body))
    return plant


NT_EMBED = "model/model/token_position_embeddings/pp_block/token_embedding"

_manifest_case("manifest-intact", "checks an untouched output (the baseline)", lambda out, t: None,
               ("files:    5 re-hashed, 0 changed, 0 missing, 0 added",), code=0)
_manifest_case("manifest-added-evil-py", "plants evil.py in an output", _write("evil.py", "import os"),
               ("added file:     evil.py",))
_manifest_case("manifest-added-shard", "plants an extra shard model-00002-of-00002.safetensors",
               lambda out, t: save_file({"lm_head.weight": torch.zeros(2)}, out / "model-00002-of-00002.safetensors"),
               ("added file:     model-00002-of-00002.safetensors",))
_manifest_case("manifest-added-tokenizer-file", "plants a tokenizer.model beside the tokenizer.json",
               _write("tokenizer.model"), ("added file:     tokenizer.model",))
_manifest_case("manifest-added-hidden-file", "plants a hidden .pth-hook file", _write(".hook.pth"),
               ("added file:     .hook.pth",))
_manifest_case("manifest-added-nested-file", "plants sub/dir/evil.py", _write("sub/dir/evil.py"),
               ("added file:     sub/dir/evil.py",))
_manifest_case("manifest-added-empty-dir", "adds an empty directory", lambda out, t: (out / "dir").mkdir(),
               ("added file:     dir",))
_manifest_case("manifest-added-symlink", "adds a symlink to /etc/hostname",
               lambda out, t: (out / "link").symlink_to("/etc/hostname"), ("added file:     link",))
_manifest_case("manifest-added-fifo", "adds a FIFO", lambda out, t: fifo(out / "pipe"), ("added file:     pipe",),
               fifos=("pipe",))
_manifest_case("manifest-changed-tensor-byte", "flips one bit in the middle of one tensor",
               _flip_tensor_byte("model.layers.1.mlp.up_proj.weight"),
               ("changed file:   model.safetensors", "changed tensor: model.layers.1.mlp.up_proj.weight"))
_manifest_case("manifest-swapped-tensors", "swaps the bytes of two same-shaped tensors (file size unchanged)",
               _swap_tensors("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"),
               ("changed file:   model.safetensors", "changed tensor: model.layers.0.mlp.gate_proj.weight",
                "changed tensor: model.layers.0.mlp.up_proj.weight"))
_manifest_case("manifest-changed-config", "edits config.json (rms_norm_eps)",
               lambda out, t: edit_json(out / "config.json", lambda c: c.update(rms_norm_eps=1e-3)),
               ("changed file:   config.json",))
_manifest_case("manifest-missing-config", "deletes config.json", lambda out, t: (out / "config.json").unlink(),
               ("missing file:   config.json",))
_manifest_case("manifest-missing-shard", "deletes the weights", lambda out, t: (out / "model.safetensors").unlink(),
               ("missing file:   model.safetensors",))


def _to_symlink(name: str, inside: bool):
    def plant(out, t):
        target = out / "copy.json" if inside else t / "copy.json"
        copy(out / name, target)
        (out / name).unlink()
        (out / name).symlink_to(target)
    return plant


_manifest_case("manifest-file-replaced-by-symlink", "replaces config.json by a symlink to an identical copy in the "
               "output", _to_symlink("config.json", inside=True),
               ("changed file:   config.json", "added file:     copy.json"))


@case("manifest-file-replaced-by-symlink-outside", M, "replaces config.json by a symlink to an identical copy outside "
      "the output", err=E + "{MANIFEST}: names 'config.json', a symlink to {T}/copy.json, which is outside {OUT}; "
      "not opened")
def _(fx, t):
    out = _own(fx, t, "hf")
    _to_symlink("config.json", inside=False)(out, t)
    return Run(["verify", "--manifest", out], {"OUT": out, "MANIFEST": out / "weightport-manifest.json"})


_manifest_case("manifest-file-replaced-by-fifo", "replaces model.safetensors by a FIFO",
               lambda out, t: fifo(out / "model.safetensors"),
               ("changed file:   model.safetensors", "unreadable:     {OUT}/model.safetensors: is a FIFO (named pipe), "
                "not a regular file; not opened"),
               fifos=("model.safetensors",))
_manifest_case("manifest-file-replaced-by-dir", "replaces tokenizer.json by a directory",
               lambda out, t: ((out / "tokenizer.json").unlink(), (out / "tokenizer.json").mkdir()),
               ("changed file:   tokenizer.json",))
_manifest_case("manifest-litgpt-changed-tensor", "re-saves lit_model.pth with one tensor changed",
               lambda out, t: torch.save({k: (v + 1 if k == "transformer.ln_f.weight" else v) for k, v in
                                          torch.load(out / "lit_model.pth", weights_only=True).items()},
                                         out / "lit_model.pth"),
               ("changed file:   lit_model.pth", "changed tensor: transformer.ln_f.weight"), to="litgpt")
_manifest_case("manifest-nanotron-added-shard", "plants an extra TP shard file in a Nanotron output",
               lambda out, t: shutil.copy(out / NT_EMBED / "model_weight_pp-rank-0-of-1_tp-rank-1-of-2.safetensors",
                                          out / NT_EMBED / "model_weight_extra.safetensors"),
               (f"added file:     {NT_EMBED}/model_weight_extra.safetensors",
                f"unreadable:     {{OUT}}/{NT_EMBED}/model_weight_extra.safetensors: not a Nanotron parameter file name"),
               to="nanotron", tp=2)
_manifest_case("manifest-mindspore-truncated", "truncates a MindSpore .ckpt output by 100 bytes",
               lambda out, t: [f.write_bytes(f.read_bytes()[:-100]) for f in out.glob("*.ckpt")],
               ("changed file:   model.ckpt", "unreadable:     {OUT}/model.ckpt: tensor lm_head.weight: truncated: its "
                "record ends at byte 313806 but the data ends at byte 313706"), to="mindspore")
_manifest_case("manifest-onnx-added-file", "plants a file in an ONNX export", _write("evil.onnx"),
               ("added file:     evil.onnx",), to="onnx")


def _manifest_error(name: str, does: str, edit: Callable[[Path, Path], None], err: str):
    @case(name, M, does, err=err)
    def _(fx, t):
        out = _own(fx, t, "hf")
        edit(out, t)
        return Run(["verify", "--manifest", out], {"OUT": out, "MANIFEST": out / "weightport-manifest.json"})


_manifest_error("manifest-not-json", "overwrites the manifest with garbage",
                lambda out, t: (out / "weightport-manifest.json").write_text("{garbage"),
                E + "{MANIFEST}: not a weightport manifest (Expecting property name enclosed in double quotes: line 1 "
                "column 2 (char 1))")
_manifest_error("manifest-files-a-list", "edits the manifest so files is a list",
                lambda out, t: edit_json(out / "weightport-manifest.json", lambda m: m.update(files=list(m["files"]))),
                E + "{MANIFEST}: not a weightport manifest (files, tensors or target of the wrong type)")
_manifest_error("manifest-entry-bytes-a-string", "edits a file entry's size to a string",
                lambda out, t: edit_json(out / "weightport-manifest.json",
                                         lambda m: m["files"]["config.json"].update(bytes="12")),
                E + "{MANIFEST}: not a weightport manifest (file entry 'config.json' is not {bytes, sha256})")
_manifest_error("manifest-names-dotdot", "edits the manifest to list ../../etc/passwd",
                lambda out, t: edit_json(out / "weightport-manifest.json", lambda m: m["files"].update(
                    {"../../etc/passwd": {"bytes": 1, "sha256": "0"}})),
                E + "{MANIFEST}: names '../../etc/passwd', which is outside {OUT}; not opened")
_manifest_error("manifest-names-absolute", "edits the manifest to list /etc/passwd",
                lambda out, t: edit_json(out / "weightport-manifest.json", lambda m: m["files"].update(
                    {"/etc/passwd": {"bytes": 1, "sha256": "0"}})),
                E + "{MANIFEST}: names '/etc/passwd', which is outside {OUT}; not opened")


@case("manifest-is-a-fifo", M, "replaces the manifest itself by a FIFO",
      err=E + "{OUT}: no weightport-manifest.json to check against")
def _(fx, t):
    out = _own(fx, t, "hf")
    fifo(out / "weightport-manifest.json")
    return Run(["verify", "--manifest", out], {"OUT": out}, fifos=(out / "weightport-manifest.json",))


@case("manifest-absent", M, "runs verify --manifest on a checkpoint weightport did not write",
      err=E + "{OUT}: no weightport-manifest.json to check against")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    return Run(["verify", "--manifest", src], {"OUT": src})


@case("manifest-with-a-and-b", M, "passes A and B together with --manifest", err=E + "verify --manifest OUT takes no A and B")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    return Run(["verify", src, src, "--manifest", src], {"SRC": src})


# -- special files: FIFOs, devices and sockets are refused before they are opened -------------------
SP = "special files"
KIND = {"fifo": "a FIFO (named pipe)", "null": "a character device", "socket": "a socket", "dir": "a directory"}


def _make_special(path: Path, kind: str, t: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        fifo(path)
    elif kind == "null":
        path.symlink_to("/dev/null")
    elif kind == "socket":
        unix_socket(path)
    elif kind == "fifo-via-symlink":
        fifo(t / "elsewhere.fifo")
        path.symlink_to(t / "elsewhere.fifo")


def _special(name: str, does: str, kind: str, fixture: str, rel: str, argv: Callable[[Path, Path, "Fixtures"], list],
             flag: str = "SRC", names: Callable | None = None, err: str | None = None):
    shown = {"fifo-via-symlink": "fifo"}.get(kind, kind)

    @case(name, SP, does, err=err or E + f"{{ROOT}}/{rel}: is {KIND[shown]}, not a regular file; not opened ({flag} {{ROOT}})")
    def _(fx, t):
        root = copy(getattr(fx, fixture), t / "in")
        _make_special(root / rel, kind, t)
        more = names(fx, t) if names else {}
        return Run(argv(root, t, fx), {"ROOT": root, "OUT": t / "out", **more},
                   fifos=(root / rel, t / "elsewhere.fifo"))


def _convert_to(to: str, *extra):
    return lambda root, t, fx: ["convert", root, t / "out", "--to", to, *extra]


for _kind in ("fifo", "socket"):
    _special(f"{_kind}-as-shard", f"puts {KIND[_kind]} where model.safetensors was", _kind, "hf", "model.safetensors",
             _convert_to("litgpt"))
    _special(f"{_kind}-as-config", f"puts {KIND[_kind]} where config.json was", _kind, "hf", "config.json",
             _convert_to("litgpt"))
_special("fifo-as-tokenizer", "puts a FIFO where tokenizer.json was", "fifo", "hf", "tokenizer.json", _convert_to("litgpt"))
_special("fifo-as-generation-config", "puts a FIFO where generation_config.json was", "fifo", "hf",
         "generation_config.json", _convert_to("hf"))
_special("fifo-as-index", "puts a FIFO where model.safetensors.index.json was", "fifo", "sharded",
         "model.safetensors.index.json", _convert_to("litgpt"))
_special("fifo-as-second-shard", "puts a FIFO where the second of three shards was", "fifo", "sharded",
         "model-00002-of-00003.safetensors", _convert_to("hf"))
_special("fifo-via-symlink-as-tokenizer", "makes tokenizer_config.json a symlink to a FIFO elsewhere",
         "fifo-via-symlink", "hf", "tokenizer_config.json", _convert_to("litgpt"))
_special("null-device-as-tokenizer", "makes tokenizer.json a symlink to /dev/null", "null", "hf", "tokenizer.json",
         _convert_to("litgpt"))
_special("fifo-in-an-unrelated-subdir", "leaves a FIFO in a subdirectory of the checkpoint (logs/pipe)", "fifo", "hf",
         "logs/pipe", _convert_to("litgpt"))
_special("fifo-as-litgpt-yaml", "puts a FIFO where model_config.yaml was", "fifo", "lit", "model_config.yaml",
         _convert_to("hf"))
_special("fifo-as-litgpt-weights", "puts a FIFO where lit_model.pth was", "fifo", "lit", "lit_model.pth",
         _convert_to("hf"))
_special("socket-as-litgpt-weights", "puts a socket where lit_model.pth was", "socket", "lit", "lit_model.pth",
         _convert_to("hf"))
_special("fifo-as-nanotron-shard", "puts a FIFO where a Nanotron TP shard was", "fifo", "nanotron",
         f"{NT_EMBED}/model_weight_pp-rank-0-of-1_tp-rank-1-of-2.safetensors", _convert_to("hf"))
_special("fifo-as-nanotron-config", "puts a FIFO where Nanotron's config.yaml was", "fifo", "nanotron", "config.yaml",
         _convert_to("hf"))
_special("fifo-as-mindspore-ckpt", "puts a FIFO where the MindSpore model.ckpt was", "fifo", "mindspore", "model.ckpt",
         lambda root, t, fx: ["convert", root, t / "out", "--to", "hf", "--from", "mindspore"])
_special("fifo-as-onnx-data", "puts a FIFO where the ONNX external data was", "fifo", "onnx", "model.onnx.data",
         _convert_to("hf"))
_special("fifo-as-adapter-weights", "puts a FIFO where the adapter's adapter_model.safetensors was", "fifo", "adapter",
         "adapter_model.safetensors",
         lambda root, t, fx: ["convert", copy(fx.hf, t / "src"), t / "out", "--to", "hf", "--merge-lora", root],
         flag="--merge-lora")
_special("fifo-as-adapter-config", "puts a FIFO where adapter_config.json was", "fifo", "adapter", "adapter_config.json",
         lambda root, t, fx: ["convert", copy(fx.hf, t / "src"), t / "out", "--to", "hf", "--merge-lora", root],
         flag="--merge-lora")
_special("socket-as-adapter-config", "puts a socket where adapter_config.json was", "socket", "adapter",
         "adapter_config.json",
         lambda root, t, fx: ["convert", copy(fx.hf, t / "src"), t / "out", "--to", "hf", "--merge-lora", root],
         flag="--merge-lora")


def _llava_argv(part: str):
    def argv(root, t, fx):
        pretrain, llm, clip = fx.llava_parts
        parts = {"--llm": llm, "--visual-encoder": clip, part: root}
        return ["convert", copy(pretrain, t / "src"), t / "out", "--to", "llava-hf", "--llm", parts["--llm"],
                "--visual-encoder", parts["--visual-encoder"]]
    return argv


_special("fifo-in-llm-base", "puts a FIFO where the --llm base's config.json was", "fifo", "hf", "config.json",
         _llava_argv("--llm"), flag="--llm")
_special("fifo-in-visual-encoder-base", "puts a FIFO where the --visual-encoder base's weights were", "fifo", "siglip",
         "model.safetensors", _llava_argv("--visual-encoder"), flag="--visual-encoder")


def _build_argv(part: str):
    def argv(root, t, fx):
        parts = {"--text": fx.hf, "--vision": fx.siglip, part: root}
        return ["build", "idefics3", t / "out", "--text", parts["--text"], "--vision", parts["--vision"]]
    return argv


_special("fifo-in-build-text", "puts a FIFO where build --text's weights were", "fifo", "hf", "model.safetensors",
         _build_argv("--text"), flag="--text")
_special("fifo-in-build-vision", "puts a FIFO where build --vision's config.json was", "fifo", "siglip", "config.json",
         _build_argv("--vision"), flag="--vision")


@case("fifo-as-the-source-file", SP, "passes a FIFO named model.pth as the source",
      err=E + "{SRC}: is a FIFO (named pipe), not a regular file; not opened (SRC)")
def _(fx, t):
    src = fifo(t / "model.pth")
    return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "OUT": t / "out"}, fifos=(src,))


# these three hung forever before safetensors_metadata (format detection) stopped opening non-regular files
@case("fifo-shard-in-verify", SP, "runs verify on a checkpoint whose weights file is a FIFO",
      err=E + "{B}/model.safetensors: is a FIFO (named pipe), not a regular file; not opened")
def _(fx, t):
    a, b = copy(fx.hf, t / "a"), copy(fx.hf, t / "b")
    fifo(b / "model.safetensors")
    return Run(["verify", a, b, "--tensors-only"], {"A": a, "B": b}, fifos=(b / "model.safetensors",))


@case("fifo-shard-in-inspect", SP, "runs inspect (format detected) on a checkpoint whose weights file is a FIFO",
      err=E + "{SRC}/model.safetensors: is a FIFO (named pipe), not a regular file; not opened")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    fifo(src / "model.safetensors")
    return Run(["inspect", src], {"SRC": src}, fifos=(src / "model.safetensors",))


@case("fifo-shard-in-eval-captions", SP, "runs eval-captions on a checkpoint whose weights file is a FIFO",
      err=E + "{SRC}/model.safetensors: is a FIFO (named pipe), not a regular file; not opened")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    fifo(src / "model.safetensors")
    return Run(["eval-captions", src, "--samples", "1"], {"SRC": src}, fifos=(src / "model.safetensors",))


@case("fifo-config-in-inspect", SP, "runs inspect on a checkpoint whose config.json is a FIFO",
      err=E + "{SRC}/config.json: is a FIFO (named pipe), not a regular file; not opened")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    fifo(src / "config.json")
    return Run(["inspect", src, "--from", "hf"], {"SRC": src}, fifos=(src / "config.json",))


@case("zero-device-as-shard", SP, "makes model.safetensors a symlink to /dev/zero (endless), run as a subprocess",
      err=E + "{SRC}/model.safetensors: is a character device, not a regular file; not opened (SRC {SRC})")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("/dev/zero")
    return Run(["convert", src, t / "out", "--to", "litgpt"], {"SRC": src, "OUT": t / "out"}, subprocess=True, timeout=60)


@case("fifo-shard-subprocess", SP, "puts a FIFO where model.safetensors was, run as a subprocess with a timeout",
      err=E + "{SRC}/model.safetensors: is a FIFO (named pipe), not a regular file; not opened (SRC {SRC})")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    fifo(src / "model.safetensors")
    return Run(["convert", src, t / "out", "--to", "litgpt"], {"SRC": src, "OUT": t / "out"}, subprocess=True, timeout=60)


@case("directory-named-like-a-shard", SP, "replaces model.safetensors by a directory of that name",
      err=E + "{SRC}/model.safetensors: is a directory, not a regular file; not opened")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").mkdir()
    return Run(["convert", src, t / "out", "--to", "litgpt"], {"SRC": src, "OUT": t / "out"})


# -- index confinement: every shard an index names lies in the checkpoint's directory ---------------
IX = "index confinement"
INDEX = "model.safetensors.index.json"
SHARD2 = "model-00002-of-00004.safetensors"


def _index_case(name: str, does: str, edit: Callable[[dict, Path, Path], None], err: str | None, category: str = IX,
                code: int = 1, match: str = "exact", outside_fifo: bool = True, check: bool = False):
    @case(name, category, does, code=code, err=err, match=match, stdout=("wrote {OUT}",) if code == 0 else ())
    def _(fx, t):
        src = copy(fx.sharded, t / "src")
        outside = t / "outside"
        outside.mkdir()
        if outside_fifo:  # opened, it would hang the run: it must never be reached
            fifo(outside / "x.safetensors")
        else:
            save_file({"lm_head.weight": torch.zeros(128, 64)}, outside / "x.safetensors")
        index = src / INDEX
        data = json.loads(index.read_text())
        edit(data, src, outside)
        index.write_text(json.dumps(data, indent=2))
        return Run(["convert", src, t / "out", "--to", "litgpt"],
                   {"SRC": src, "INDEX": index, "OUTSIDE": outside, "OUT": t / "out"},
                   fifos=(outside / "x.safetensors",),
                   check=(lambda: _lit_equals(t / "out", fx.lit)()) if check else None)


def _entry(value):
    return lambda data, src, outside: data["weight_map"].update({"lm_head.weight": value(outside)
                                                                 if callable(value) else value})


def _linked(name: str, target: Callable[[Path, Path], Path]):
    def edit(data, src, outside):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).symlink_to(target(src, outside))
        data["weight_map"]["lm_head.weight"] = name
    return edit


OUTSIDE_OF = "{INDEX}: names %r, which is outside {SRC}; not opened"
_index_case("index-dotdot", "points lm_head.weight's shard at ../outside/x.safetensors (a FIFO)",
            _entry("../outside/x.safetensors"), E + OUTSIDE_OF % "../outside/x.safetensors")
_index_case("index-absolute", "points lm_head.weight's shard at an absolute path (a FIFO)",
            _entry(lambda outside: str(outside / "x.safetensors")), E + "{INDEX}: names '{OUTSIDE}/x.safetensors', "
            "which is outside {SRC}; not opened")
_index_case("index-dotdot-after-subdir", "hides the escape after a subdirectory: sub/../../outside/x.safetensors",
            _entry("sub/../../outside/x.safetensors"), E + OUTSIDE_OF % "sub/../../outside/x.safetensors")
_index_case("index-backslash", "uses Windows separators: ..\\\\outside\\\\x.safetensors",
            _entry("..\\outside\\x.safetensors"), E + "{INDEX}: names '..\\\\outside\\\\x.safetensors', which is "
            "outside {SRC}; not opened")
_index_case("index-nul-byte", "puts a NUL byte in a shard name", _entry("model\0.safetensors"),
            E + "{INDEX}: names 'model\\x00.safetensors', which is outside {SRC}; not opened")
_index_case("index-empty-name", "gives lm_head.weight the shard \"\"", _entry(""),
            E + "{INDEX}: names a file as '', not a file name")
_index_case("index-symlink-out", "adds link.safetensors, a symlink to a real shard outside the directory",
            _linked("link.safetensors", lambda src, outside: outside / "x.safetensors"),
            E + "{INDEX}: names 'link.safetensors', a symlink to {OUTSIDE}/x.safetensors, which is outside {SRC}; "
            "not opened", outside_fifo=False)
_index_case("index-symlinked-subdir-out", "names sub/x.safetensors where sub is a symlink to a directory outside",
            lambda data, src, outside: ((src / "sub").symlink_to(outside),
                                        data["weight_map"].update({"lm_head.weight": "sub/x.safetensors"})),
            E + "{INDEX}: names 'sub/x.safetensors', a symlink to {OUTSIDE}/x.safetensors, which is outside {SRC}; "
            "not opened", outside_fifo=False)
_index_case("index-symlink-relative-out", "adds link.safetensors -> ../outside/x.safetensors (a relative symlink)",
            _linked("link.safetensors", lambda src, outside: Path("../outside/x.safetensors")),
            E + "{INDEX}: names 'link.safetensors', a symlink to {OUTSIDE}/x.safetensors, which is outside {SRC}; "
            "not opened", outside_fifo=False)


def _alias_shard(data, src, outside):
    (src / "alias.safetensors").symlink_to(SHARD2)
    for k, v in data["weight_map"].items():
        if v == SHARD2:
            data["weight_map"][k] = "alias.safetensors"


_index_case("index-symlink-inside-is-fine", "names a shard through a symlink to another file inside the directory",
            _alias_shard, None, code=0, check=True)
_index_case("index-missing-shard", "names a shard that does not exist", _entry("model-00009-of-00009.safetensors"),
            E + "{INDEX}: names shard model-00009-of-00009.safetensors (for tensor lm_head.weight) which does not exist")
_index_case("index-wrong-shard", "names the right file for the wrong tensor", _entry(SHARD2),
            E + f"{{INDEX}}: names tensor lm_head.weight in {SHARD2}, but {SHARD2} does not hold it")
_index_case("index-ghost-tensor", "lists a tensor that no shard holds",
            lambda data, src, outside: data["weight_map"].update({"ghost.weight": SHARD2}),
            E + f"{{INDEX}}: names tensor ghost.weight in {SHARD2}, but {SHARD2} does not hold it")


@case("index-bin-dotdot", IX, "writes a pytorch_model.bin.index.json whose shards are ../outside/x.bin (a FIFO)",
      err=E + "{INDEX}: names '../outside/x.bin', which is outside {SRC}; not opened")
def _(fx, t):
    src = copy(fx.hf, t / "src")
    (t / "outside").mkdir()
    fifo(t / "outside" / "x.bin")
    names = list(load_file(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    index = src / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: "../outside/x.bin" for n in names}}))
    return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "INDEX": index, "OUT": t / "out"},
               fifos=(t / "outside" / "x.bin",))


@case("hub-cache-snapshot", IX, "converts a Hub cache snapshot, whose files are symlinks into ../../blobs (allowed)",
      code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    repo = t / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(fx.sharded.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    return Run(["convert", snap, t / "out", "--to", "hf"], {"SRC": snap, "REPO": repo, "OUT": t / "out"},
               check=_same_tensors(t / "out", fx.hf))


# -- JSON/YAML types: a wrong type in an index or config is one line ----------------------------------
JT = "JSON/YAML types"
_index_case("index-value-int", "gives a tensor the shard 7", _entry(7),
            E + "{INDEX}: weight_map gives tensor lm_head.weight the shard 7, not a file name", category=JT)
_index_case("index-value-null", "gives a tensor the shard null", _entry(None),
            E + "{INDEX}: weight_map gives tensor lm_head.weight the shard None, not a file name", category=JT)
_index_case("index-value-list", "gives a tensor the shard [\"a\"]", _entry(["a"]),
            E + "{INDEX}: weight_map gives tensor lm_head.weight the shard ['a'], not a file name", category=JT)
_index_case("index-value-object", "gives a tensor the shard {\"f\": 1}", _entry({"f": 1}),
            E + "{INDEX}: weight_map gives tensor lm_head.weight the shard {'f': 1}, not a file name", category=JT)
_index_case("index-no-weight-map", "deletes the index's weight_map", lambda data, src, outside: data.pop("weight_map"),
            E + "{INDEX}: has no weight_map", category=JT)
_index_case("index-weight-map-list", "makes the weight_map a list of shard names",
            lambda data, src, outside: data.update(weight_map=sorted(set(data["weight_map"].values()))),
            E + "{INDEX}: has no weight_map", category=JT)
_index_case("index-weight-map-empty", "empties the weight_map", lambda data, src, outside: data.update(weight_map={}),
            E + "{INDEX}: has no weight_map", category=JT)
_index_case("index-nan-total-size", "puts NaN in the index's metadata.total_size",
            lambda data, src, outside: data["metadata"].update(total_size=float("nan")),
            E + "{INDEX}: metadata.total_size is not a finite number (NaN or infinity); refused",
            category="non-finite values")


def _text_case(name: str, category: str, does: str, fixture: str, rel: str, text: str | bytes | Callable[[str], str],
               err: str, to: str = "litgpt", match: str = "exact", argv: Callable | None = None):
    @case(name, category, does, err=err, match=match)
    def _(fx, t):
        src = copy(getattr(fx, fixture), t / "src")
        f = src / rel
        new = text(f.read_text()) if callable(text) else text
        f.write_bytes(new if isinstance(new, bytes) else new.encode())
        cmd = argv(src, t, fx) if argv else ["convert", src, t / "out", "--to", to]
        return Run(cmd, {"SRC": src, "FILE": f, "OUT": t / "out"})


def _set(key: str, value):
    def edit(text):
        data = json.loads(text)
        data[key] = value
        return json.dumps(data, indent=2)
    return edit


def _append(raw: str):
    """The JSON object with `raw` added as its last member (for what json.dumps cannot write)."""
    return lambda text: text.rstrip()[:-1].rstrip() + ", " + raw + "}"


_text_case("index-not-json", JT, "truncates the index in the middle", "sharded", INDEX, lambda s: s[:50],
           E + "{FILE}: not valid JSON (", match="prefix")
_text_case("index-a-list", JT, "replaces the index by a JSON list", "sharded", INDEX, "[]",
           E + "{FILE}: expected a JSON object")
_text_case("index-duplicate-key", JT, "gives lm_head.weight twice in the weight_map (Python keeps the last)", "sharded",
           INDEX, lambda s: s.rstrip()[:-1].rstrip()[:-1] + f', "lm_head.weight": "{SHARD2}"}}}}',
           E + "{FILE}: key 'lm_head.weight' is given twice; refused")
_text_case("config-not-json", JT, "truncates config.json", "hf", "config.json", lambda s: s[:40],
           E + "{FILE}: not valid JSON (", match="prefix")
_text_case("config-empty", JT, "empties config.json", "hf", "config.json", "",
           E + "{FILE}: not valid JSON (Expecting value: line 1 column 1 (char 0))")
_text_case("config-a-list", JT, "replaces config.json by a JSON list", "hf", "config.json", "[1, 2]",
           E + "{FILE}: expected a JSON object")
_text_case("config-not-utf8", JT, "puts Latin-1 bytes in config.json", "hf", "config.json",
           lambda s: _append('"note": "caf\u00e9"')(s).encode("latin-1"),
           E + "{FILE}: not valid JSON (", match="prefix")
_text_case("config-nested-deep", JT, "nests 100,000 lists in config.json", "hf", "config.json",
           _append('"x": ' + "[" * 100_000 + "]" * 100_000), E + "{FILE}: not valid JSON (nested too deep)")
_text_case("config-duplicate-key", JT, "gives num_hidden_layers twice in config.json", "hf", "config.json",
           _append('"num_hidden_layers": 1'), E + "{FILE}: key 'num_hidden_layers' is given twice; refused")
# (the message names weightport's own name of the size: n_layer for num_hidden_layers)
for _key, _value, _shown in (("num_hidden_layers", "2", "n_layer = '2'"), ("num_hidden_layers", None, "n_layer = None"),
                             ("num_hidden_layers", 2.5, "n_layer = 2.5"), ("num_hidden_layers", True, "n_layer = True"),
                             ("hidden_size", -64, "hidden = -64"), ("vocab_size", [128], "vocab = [128]")):
    _text_case(f"config-{_key}-{type(_value).__name__}{'-neg' if _value == -64 else ''}", JT,
               f"sets {_key} to {json.dumps(_value)} in config.json", "hf", "config.json", _set(_key, _value),
               E + f"{{FILE}}: config gives {_shown}; it must be an integer >= 1")
_text_case("config-model-type-unknown", JT, "sets model_type to \"bloom\"", "hf", "config.json", _set("model_type", "bloom"),
           E + "{FILE}: unknown architecture model_type='bloom' (", match="prefix")
_text_case("config-model-type-int", JT, "sets model_type to 42", "hf", "config.json", _set("model_type", 42),
           E + "{FILE}: unknown architecture model_type=42 (supported: ", match="prefix")
_text_case("config-model-type-and-class-missing", JT, "deletes model_type and architectures", "hf", "config.json",
           lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k not in ("model_type", "architectures")}),
           E + "{FILE}: unknown architecture model_type=None (supported: ", match="prefix")


@case("config-model-type-missing", JT, "deletes model_type (the architectures class name still says Llama)", code=0,
      stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")
    edit_json(src / "config.json", lambda c: c.pop("model_type"))
    return Run(["convert", src, t / "out", "--to", "litgpt"], {"SRC": src, "OUT": t / "out"},
               check=_lit_equals(t / "out", fx.lit))
_text_case("generation-config-not-json", JT, "truncates generation_config.json", "hf", "generation_config.json",
           lambda s: s[:20], E + "{FILE}: not valid JSON (", match="prefix")
_text_case("generation-config-a-list", JT, "replaces generation_config.json by a list", "hf", "generation_config.json",
           "[]", E + "{FILE}: expected a JSON object")


# -- non-finite values: NaN and infinity in configs are refused, naming the key ----------------------
NF = "non-finite values"
NOT_FINITE = E + "{FILE}: %s is not a finite number (NaN or infinity); refused"
for _i, (_raw, _key) in enumerate((('"rms_norm_eps": NaN', "rms_norm_eps"), ('"rope_theta": Infinity', "rope_theta"),
                                   ('"initializer_range": -Infinity', "initializer_range"),
                                   ('"rms_norm_eps": 1e999', "rms_norm_eps"),
                                   ('"rope_scaling": {"rope_type": "llama3", "factor": NaN}', "rope_scaling.factor"),
                                   ('"eos_token_id": [1, NaN]', "eos_token_id[1]"))):
    _text_case(f"config-non-finite-{_i + 1}", NF, f"writes {_raw} into config.json", "hf", "config.json",
               (lambda raw, key: lambda s: _append(raw)(json.dumps({k: v for k, v in json.loads(s).items()
                                                                     if k != key.split(".")[0].split("[")[0]})))(_raw, _key),
               NOT_FINITE % _key)
_text_case("generation-config-nan", NF, "writes \"temperature\": NaN into generation_config.json", "hf",
           "generation_config.json", _append('"temperature": NaN'), NOT_FINITE % "temperature")
_text_case("adapter-config-nan", NF, "writes \"lora_alpha\": NaN into adapter_config.json", "adapter",
           "adapter_config.json",
           lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "lora_alpha"})[:-1] + ', "lora_alpha": NaN}',
           NOT_FINITE % "lora_alpha",
           argv=lambda src, t, fx: ["convert", copy(fx.hf, t / "base"), t / "out", "--to", "hf", "--merge-lora", src])


def _yaml_line(key: str, value: str):
    """model_config.yaml with `key: value` in place of the key's line."""
    return lambda text: "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line
                                  for line in text.splitlines()) + "\n"


for _key, _value in (("norm_eps", ".nan"), ("rope_base", ".inf"), ("norm_eps", "-.inf"), ("norm_eps", "1.0e+999")):
    _text_case(f"litgpt-yaml-{_key}-{_value.strip('.-+')}", NF, f"writes `{_key}: {_value}` into LitGPT's "
               "model_config.yaml", "lit", "model_config.yaml", _yaml_line(_key, _value), NOT_FINITE % _key, to="hf")


@case("nanotron-yaml-nan", NF, "writes `rms_norm_eps: .nan` into Nanotron's config.yaml (no model_config.json)",
      err=NOT_FINITE % "model.model_config.rms_norm_eps")
def _(fx, t):
    src = copy(fx.nanotron, t / "src")
    (src / "model_config.json").unlink()
    f = src / "config.yaml"
    f.write_text(re.sub(r"rms_norm_eps: .*", "rms_norm_eps: .nan", f.read_text()))
    return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "FILE": f, "OUT": t / "out"})


@case("projector-config-infinity", NF, "writes \"llm_hidden_size\": Infinity into an xtuner projector's config.json",
      err=NOT_FINITE % "llm_hidden_size")
def _(fx, t):
    src, llm, clip = _llava(fx, t)
    f = src / "projector" / "config.json"
    f.write_text(_append('"llm_hidden_size": Infinity')(json.dumps({k: v for k, v in json.loads(f.read_text()).items()
                                                                     if k != "llm_hidden_size"})))
    return Run(["convert", src, t / "out", "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip],
               {"SRC": src, "LLM": llm, "CLIP": clip, "FILE": f, "OUT": t / "out"})


@case("siglip-config-nan", NF, "writes \"layer_norm_eps\": NaN into build --vision's config.json",
      err=NOT_FINITE % "layer_norm_eps")
def _(fx, t):
    text, vision = _parts(fx, t)
    f = vision / "config.json"
    f.write_text(_append('"layer_norm_eps": NaN')(json.dumps({k: v for k, v in json.loads(f.read_text()).items()
                                                               if k != "layer_norm_eps"})))
    return Run(["build", "idefics3", t / "out", "--text", text, "--vision", vision],
               {"TEXT": text, "VISION": vision, "FILE": f, "OUT": t / "out"})


# -- float16 casts: NaN and Inf meet float16 only when asked -------------------------------------------
FC = "float16 casts"
UP = "model.layers.0.mlp.up_proj.weight"


def _poke(value: float, *more: float):
    def edit(tensors):
        w = tensors[UP]
        for i, v in enumerate((value, *more)):
            w[0, 3 + i] = v
    return edit


def _poked(fx, key: str) -> Path:
    nan, inf = float("nan"), float("inf")
    values = {"nan": (nan,), "inf": (inf,), "neginf": (-inf,), "big": (1e5,), "nan-inf": (nan, inf)}[key]
    return fx.tensor_edit(key, _poke(*values))


def _cast_case(name: str, does: str, key: str, flags: tuple[str, ...], err: str | None, code: int = 1,
               to: str = "hf", check: Callable[[torch.Tensor], None] | None = None):
    @case(name, FC, does, code=code, err=err, stdout=("wrote {OUT}",) if code == 0 else ())
    def _(fx, t):
        src = copy(_poked(fx, key), t / "src")
        out = t / "out"

        def checked():
            check(load_file(out / "model.safetensors")[UP])
        return Run(["convert", src, out, "--to", to, *flags], {"SRC": src, "OUT": out}, check=checked if check else None)


NAN_REFUSED = E + "tensor %s: the source holds NaN values; pass --allow-nan to cast it to float16 anyway (they stay NaN)"
INF_REFUSED = (E + "tensor %s: the source holds infinite values; pass --allow-overflow to cast it to float16 anyway "
               "(they stay infinite)")


def _holds(dtype: torch.dtype, **at) -> Callable[[torch.Tensor], None]:
    def check(w):
        assert w.dtype == dtype, w.dtype
        for kind, n in at.items():
            test = {"nan": torch.isnan, "inf": lambda x: torch.isinf(x) & (x > 0), "neginf": lambda x: torch.isinf(x) & (x < 0)}
            assert int(test[kind](w).sum()) == n and bool(test[kind](w[0, 3:5]).any()), (kind, w[0, :6])
    return check


_cast_case("nan-to-float16", "casts a model holding one NaN to --dtype float16", "nan", ("--dtype", "float16"),
           NAN_REFUSED % UP)
_cast_case("nan-to-float16-litgpt", "casts it to float16 on the way to LitGPT (the message names LitGPT's tensor)",
           "nan", ("--dtype", "float16"), NAN_REFUSED % "transformer.h.0.mlp.fc_2.weight", to="litgpt")
_cast_case("nan-to-float16-allow-nan", "casts the NaN model to float16 with --allow-nan", "nan",
           ("--dtype", "float16", "--allow-nan"), None, code=0, check=_holds(torch.float16, nan=1))
_cast_case("nan-to-float16-allow-overflow-only", "casts the NaN model to float16 with --allow-overflow only", "nan",
           ("--dtype", "float16", "--allow-overflow"), NAN_REFUSED % UP)
_cast_case("nan-to-bfloat16", "casts the NaN model to bfloat16 (a cast that cannot lose it: no word)", "nan",
           ("--dtype", "bfloat16"), None, code=0, check=_holds(torch.bfloat16, nan=1))
_cast_case("nan-no-cast", "converts the NaN model without a cast", "nan", (), None, code=0,
           check=_holds(torch.float32, nan=1))
_cast_case("inf-to-float16", "casts a model holding +Inf to float16", "inf", ("--dtype", "float16"), INF_REFUSED % UP)
_cast_case("neginf-to-float16", "casts a model holding -Inf to float16", "neginf", ("--dtype", "float16"),
           INF_REFUSED % UP)
_cast_case("inf-to-float16-allow-overflow", "casts the +Inf model to float16 with --allow-overflow", "inf",
           ("--dtype", "float16", "--allow-overflow"), None, code=0, check=_holds(torch.float16, inf=1))
_cast_case("inf-to-float16-allow-nan-only", "casts the +Inf model to float16 with --allow-nan only", "inf",
           ("--dtype", "float16", "--allow-nan"), INF_REFUSED % UP)
_cast_case("nan-and-inf-allow-nan-only", "casts a tensor holding NaN and Inf with --allow-nan only", "nan-inf",
           ("--dtype", "float16", "--allow-nan"), INF_REFUSED % UP)
_cast_case("nan-and-inf-allow-both", "casts the NaN and Inf tensor with --allow-nan --allow-overflow", "nan-inf",
           ("--dtype", "float16", "--allow-nan", "--allow-overflow"), None, code=0,
           check=_holds(torch.float16, nan=1, inf=1))
_cast_case("overflow-to-float16", "casts a finite 1e5 (beyond float16) to float16", "big", ("--dtype", "float16"),
           E + f"tensor {UP} has values up to 100000, beyond float16's ±65504; pass --allow-overflow to cast anyway "
           "(they become inf)")
_cast_case("overflow-to-float16-allowed", "casts the 1e5 to float16 with --allow-overflow (it becomes inf)", "big",
           ("--dtype", "float16", "--allow-overflow"), None, code=0, check=_holds(torch.float16, inf=1))


@case("nan-to-float16-build", FC, "builds an Idefics3 in float16 from a text part holding NaN",
      err=NAN_REFUSED % "model.text_model.layers.0.mlp.up_proj.weight")
def _(fx, t):
    text, vision = copy(_poked(fx, "nan"), t / "text"), copy(fx.siglip, t / "vision")
    return Run(["build", "idefics3", t / "out", "--text", text, "--vision", vision, "--dtype", "float16"],
               {"TEXT": text, "VISION": vision, "OUT": t / "out"})


# -- LitGPT: a hostile model_config.yaml or lit_model.pth is one line --------------------------------
LG = "LitGPT"


def _lit_case(name: str, does: str, text, err: str, match: str = "exact"):
    _text_case(name, LG, does, "lit", "model_config.yaml", text, err, to="hf", match=match)


_lit_case("litgpt-yaml-not-yaml", "writes an unclosed bracket into model_config.yaml", "n_layer: [2\n",
          E + "{FILE}: not valid YAML (", match="prefix")
_lit_case("litgpt-yaml-empty", "empties model_config.yaml", "", E + "{FILE}: expected a mapping of LitGPT config fields")
_lit_case("litgpt-yaml-a-list", "replaces model_config.yaml by a YAML list", "- 1\n- 2\n",
          E + "{FILE}: expected a mapping of LitGPT config fields")
_lit_case("litgpt-yaml-python-tag", "plants a !!python/object/apply:os.system tag", lambda s: s +
          "x: !!python/object/apply:os.system ['touch /tmp/weightport-pwned']\n",
          E + "{FILE}: not valid YAML (could not determine a constructor for the tag "
          "'tag:yaml.org,2002:python/object/apply:os.system')")
_lit_case("litgpt-yaml-duplicate-key", "gives n_layer twice (PyYAML keeps the last)", lambda s: s + "n_layer: 1\n",
          E + "{FILE}: key 'n_layer' is given twice; refused")
_lit_case("litgpt-yaml-duplicate-nested-key", "gives a key twice inside hf_config", lambda s: s.replace(
    "hf_config: {}", "hf_config: {org: a, name: b, org: c}"), E + "{FILE}: key 'org' is given twice; refused")
_lit_case("litgpt-yaml-n-layer-string", "sets n_layer: two", _yaml_line("n_layer", "two"),
          E + "{FILE}: config gives n_layer = 'two'; it must be an integer >= 1")
_lit_case("litgpt-yaml-missing-n-embd", "deletes n_embd", lambda s: "\n".join(
    line for line in s.splitlines() if not line.startswith("n_embd:")) + "\n", E + "{FILE}: missing field 'n_embd'")


def _lit_yaml_ok(name: str, does: str, extra: str):
    @case(name, LG, does, code=0, stdout=("wrote {OUT}",))
    def _(fx, t):
        src = copy(fx.lit, t / "src")
        with open(src / "model_config.yaml", "a") as f:
            f.write(extra)
        return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "OUT": t / "out"},
                   check=_same_tensors(t / "out", fx.hf))


_lit_yaml_ok("litgpt-yaml-recursive-anchor", "adds an unknown key holding a recursive anchor (x: &a [*a]): ignored, "
             "no hang", "x: &a [*a]\n")
_lit_yaml_ok("litgpt-yaml-billion-laughs", "adds an unknown key of nested aliases that would expand to 10^9 items",
             "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10 if i else ["lol"] * 10) + "]\n" for i in range(9)))
_lit_yaml_ok("litgpt-yaml-merge-key", "uses a YAML << merge whose keys are overridden (legal YAML, not a duplicate)",
             "extra_base: &b {k: 1, j: 2}\nextra: {<<: *b, k: 3}\n")
_lit_case("litgpt-yaml-not-utf8", "writes Latin-1 bytes into model_config.yaml", lambda s: (s + "name: caf\u00e9\n").encode(
    "latin-1"), E + "{FILE}: not valid YAML (", match="prefix")
_lit_case("litgpt-yaml-deep", "nests 100,000 YAML lists", lambda s: s + "x: " + "[" * 100_000 + "]" * 100_000 + "\n",
          E + "{FILE}: not valid YAML (nested too deep)")


@case("litgpt-pth-missing", LG, "deletes lit_model.pth and forces --from litgpt", err=E + "{SRC}/lit_model.pth: not found")
def _(fx, t):
    src = copy(fx.lit, t / "src")
    (src / "lit_model.pth").unlink()
    return Run(["convert", src, t / "out", "--to", "hf", "--from", "litgpt"], {"SRC": src, "OUT": t / "out"})


@case("litgpt-pth-truncated", LG, "truncates lit_model.pth to half its size",
      err=E + "{SRC}/lit_model.pth: not a zip-format torch checkpoint (legacy or truncated file); re-save it with "
      "torch.save, or convert it to safetensors first")
def _(fx, t):
    src = copy(fx.lit, t / "src")
    f = src / "lit_model.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "OUT": t / "out"})


def _resave(edit: Callable[[dict], dict]):
    def write(f: Path):
        torch.save(edit(torch.load(f, weights_only=True)), f)
    return write


def _lit_pth_case(name: str, does: str, edit: Callable[[dict], object], err: str, match: str = "exact"):
    @case(name, LG, does, err=err, match=match)
    def _(fx, t):
        src = copy(fx.lit, t / "src")
        f = src / "lit_model.pth"
        torch.save(edit(torch.load(f, weights_only=True)), f)
        return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "FILE": f, "OUT": t / "out"})


_lit_pth_case("litgpt-pth-extra-tensor", "adds a tensor LitGPT's Llama does not have",
              lambda sd: {**sd, "transformer.h.0.attn.extra.weight": torch.zeros(2)},
              E + "{FILE}: tensor transformer.h.0.attn.extra.weight is not part of a llama model with this config "
              "(unmapped extra tensor)")
_lit_pth_case("litgpt-pth-missing-tensor", "deletes transformer.ln_f.weight",
              lambda sd: {k: v for k, v in sd.items() if k != "transformer.ln_f.weight"},
              E + "{SRC}: tensor transformer.ln_f.weight is missing (the llama config needs it)")
_lit_pth_case("litgpt-pth-wrong-shape", "replaces the qkv weight of layer 0 by one of the wrong shape",
              lambda sd: {**sd, "transformer.h.0.attn.qkv.weight": torch.zeros(3, 64)},
              E + "{FILE}: tensor transformer.h.0.attn.qkv.weight [3, 64] does not fit the config (dim 0 is 3, expected "
              "128 = 64 + 32 + 32)")


# -- safetensors corruption: whatever the safetensors library refuses, weightport refuses -------------
ST = "safetensors corruption"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _st_case(name: str, does: str, mutate: Callable[[Path], None], err: str, match: str = "exact",
             fixture: str = "hf", rel: str = "model.safetensors"):
    @case(name, ST, does, err=err, match=match)
    def _(fx, t):
        src = copy(getattr(fx, fixture), t / "src")
        mutate(src / rel)
        return Run(["convert", src, t / "out", "--to", "litgpt"], {"SRC": src, "FILE": src / rel, "OUT": t / "out"})


def _bytes(edit: Callable[[bytes], bytes]):
    return lambda f: f.write_bytes(edit(f.read_bytes()))


def _header(edit: Callable[[dict, bytes], tuple]):
    """edit(header, data) -> (header dict or raw text, data)."""
    def mutate(f):
        header, data = read_header(f)
        new_header, new_data = edit(header, data)
        write_st(f, new_header, new_data)
    return mutate


def _entry_edit(tensor: str, **fields):
    def edit(header, data):
        header[tensor].update(fields)
        return header, data
    return _header(edit)


def _relaid(header: dict, data: bytes, gap_after: str | None = None, gap: int = 0, lead: int = 0):
    """The same tensors back to back in offset order, with `lead` bytes before the first and `gap`
    bytes after `gap_after`."""
    out, body, at = {"__metadata__": header.get("__metadata__")}, [b"\0" * lead], lead
    for name, e in by_offset(header):
        b, end = e["data_offsets"]
        out[name] = {**e, "data_offsets": [at, at + end - b]}
        body.append(data[b:end])
        at += end - b
        if name == gap_after:
            body.append(b"\0" * gap)
            at += gap
    return out, b"".join(body)


def _embed_onto_head(header, data):
    """The embedding's data_offsets pointed at the lm_head's bytes, everything else back to back (the
    file of issue 19 that converted with exit 0, its embedding the lm_head)."""
    rest = {k: v for k, v in header.items() if k != EMBED}
    out, body = _relaid(rest, data)
    out[EMBED] = {**header[EMBED], "data_offsets": out[HEAD]["data_offsets"]}
    return out, body


def _overlap_by(n: int):
    def edit(header, data):
        out, body = _relaid(header, data)
        (first, e1), (second, e2) = by_offset(out)[:2]
        out[second] = {**e2, "data_offsets": [e2["data_offsets"][0] - n, e2["data_offsets"][1] - n]}
        later = [k for k, _ in by_offset(out)[2:]]
        for k in later:
            out[k] = {**out[k], "data_offsets": [o - n for o in out[k]["data_offsets"]]}
        return out, body[:-n]
    return edit


_st_case("st-truncated", "cuts the last 1000 bytes off model.safetensors", _bytes(lambda b: b[:-1000]),
         E + "{FILE}: truncated: tensor ", match="prefix")
_st_case("st-truncated-in-header", "cuts model.safetensors inside its JSON header", _bytes(lambda b: b[:60]),
         E + "{FILE}: truncated or not safetensors (header length 2128: the file needs 2136 bytes for its header but has 60)")
_st_case("st-shorter-than-its-length", "leaves only 4 bytes", _bytes(lambda b: b[:4]), E + "{FILE}: not a safetensors file (shorter than its 8-byte header length)")
_st_case("st-empty", "empties model.safetensors", _bytes(lambda b: b""), E + "{FILE}: not a safetensors file (shorter than its 8-byte header length)")
_st_case("st-random-bytes", "fills model.safetensors with 4 KB of random bytes",
         _bytes(lambda b: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                              dtype=torch.uint8).tolist())), E + "{FILE}: not safetensors (header length 9640951156843539237 is over the 100,000,000 bytes the format allows)")
_st_case("st-header-length-2-63", "sets the header length to 2^63", _bytes(lambda b: struct.pack("<Q", 2**63) + b[8:]),
         E + "{FILE}: not safetensors (header length 9223372036854775808 is over the 100,000,000 bytes the format allows)")
_st_case("st-header-length-past-eof", "sets the header length past the end of the file",
         _bytes(lambda b: struct.pack("<Q", len(b)) + b[8:]), E + "{FILE}: truncated or not safetensors (header length 314712: the file needs 314720 bytes for its header but has 314712)")


def _sparse_header(f: Path) -> None:
    with open(f, "wb") as out:  # 100 MB of header that takes no disk
        out.write(struct.pack("<Q", 100_000_001) + b"{")
        out.truncate(8 + 100_000_001)


_st_case("st-header-over-the-limit", "declares a 100,000,001-byte header (the library's limit is 100,000,000)",
         _sparse_header, E + "{FILE}: not safetensors (header length 100000001 is over the 100,000,000 bytes the format "
         "allows)")
_st_case("st-trailing-bytes", "appends 16 bytes after the last tensor", _bytes(lambda b: b + bytes(16)), E + "{FILE}: 16 bytes after the tensors are not covered by any: the last tensor (model.norm.weight) ends at byte 312576 of the data but the file holds 312592")
_st_case("st-embedding-onto-lm-head", "points the embedding's data_offsets at the lm_head's bytes",
         _header(_embed_onto_head), E + "{FILE}: tensor model.embed_tokens.weight: data_offsets [0, 32768] overlap tensor lm_head.weight (which ends at byte 32768)")
_st_case("st-overlap-4-bytes", "makes the second tensor start 4 bytes before the first ends", _header(_overlap_by(4)),
         E + "{FILE}: tensor model.embed_tokens.weight: data_offsets [32764, 65532] overlap tensor lm_head.weight (which ends at byte 32768)")
_st_case("st-hole-before-first", "leaves 8 bytes before the first tensor", _header(lambda h, d: _relaid(h, d, lead=8)),
         E + "{FILE}: tensor lm_head.weight: data_offsets [8, 32776] leave a hole of 8 bytes before the first tensor (tensors must be back to back from byte 0 of the data)")
_st_case("st-hole-between", "leaves 8 bytes between two tensors",
         _header(lambda h, d: _relaid(h, d, gap_after=by_offset(h)[0][0], gap=8)), E + "{FILE}: tensor model.embed_tokens.weight: data_offsets [32776, 65544] leave a hole of 8 bytes after tensor lm_head.weight (tensors must be back to back from byte 0 of the data)")
_st_case("st-float-offset", "writes one data_offsets end as a float (N.0)",
         _header(lambda h, d: (json.dumps(h).replace(f'"data_offsets": [0, {h[by_offset(h)[0][0]]["data_offsets"][1]}]',
                                                     f'"data_offsets": [0, {h[by_offset(h)[0][0]]["data_offsets"][1]}.0]'),
                               d)), E + "{FILE}: tensor lm_head.weight: data_offsets [0, 32768.0] are not two integers >= 0")
_st_case("st-string-offset", "writes one data_offsets end as a string",
         lambda f: _entry_edit(by_offset(read_header(f)[0])[0][0],
                               data_offsets=[0, str(by_offset(read_header(f)[0])[0][1]["data_offsets"][1])])(f), E + "{FILE}: tensor lm_head.weight: data_offsets [0, \"32768\"] are not two integers >= 0")
_st_case("st-negative-offset", "writes a negative data_offsets begin",
         lambda f: _entry_edit(HEAD, data_offsets=[-4, read_header(f)[0][HEAD]["data_offsets"][1]])(f), E + "{FILE}: tensor lm_head.weight: data_offsets [-4, 32768] are not two integers >= 0")
_st_case("st-three-offsets", "gives a tensor three data_offsets",
         lambda f: _entry_edit(HEAD, data_offsets=read_header(f)[0][HEAD]["data_offsets"] + [0])(f), E + "{FILE}: tensor lm_head.weight: data_offsets [0, 32768, 0] are not two integers >= 0")
_st_case("st-unknown-dtype", "sets a dtype to F33", _entry_edit(HEAD, dtype="F33"), E + "{FILE}: tensor lm_head.weight: unknown dtype 'F33'")
_st_case("st-unsupported-dtype", "sets a dtype to U32 (same width, one weightport does not convert)",
         _entry_edit(HEAD, dtype="U32"), E + "{FILE}: tensor lm_head.weight: dtype U32 is not supported (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)")
_st_case("st-dtype-size-mismatch", "relabels a float32 tensor as float16 without changing its bytes",
         _entry_edit(HEAD, dtype="F16"), E + "{FILE}: tensor lm_head.weight: data_offsets [0, 32768] do not match shape [128, 64] F16 (16384 bytes)")
_st_case("st-shape-size-mismatch", "shrinks a tensor's shape without changing its bytes", _entry_edit(HEAD, shape=[64, 64]),
         E + "{FILE}: tensor lm_head.weight: data_offsets [0, 32768] do not match shape [64, 64] F32 (16384 bytes)")
_st_case("st-shape-negative", "gives a tensor a negative dim", _entry_edit(HEAD, shape=[-128, -64]), E + "{FILE}: tensor lm_head.weight: shape [-128, -64] is not a list of integers >= 0")
_st_case("st-entry-null", "replaces a tensor's entry by null", _header(lambda h, d: ({**h, HEAD: None}, d)), E + "{FILE}: tensor lm_head.weight: header entry is null, not an object")
_st_case("st-metadata-int", "sets __metadata__ {\"format\": 1}", _header(lambda h, d: ({**h, "__metadata__": {"format": 1}}, d)),
         E + "{FILE}: corrupt safetensors header (__metadata__ 'format' is an integer, not a string)")
_st_case("st-metadata-list", "sets __metadata__ to a list", _header(lambda h, d: ({**h, "__metadata__": ["pt"]}, d)),
         E + "{FILE}: corrupt safetensors header (__metadata__ is a list, not an object of strings)")
_st_case("st-metadata-nested", "nests an object in __metadata__",
         _header(lambda h, d: ({**h, "__metadata__": {"format": "pt", "x": {"y": "z"}}}, d)), E + "{FILE}: corrupt safetensors header (__metadata__ 'x' is an object, not a string)")
_st_case("st-metadata-twice", "gives __metadata__ twice",
         _header(lambda h, d: ('{"__metadata__": {"format": "pt"}, ' + json.dumps(h)[1:], d)), E + "{FILE}: corrupt safetensors header (__metadata__ appears twice)")
_st_case("st-tensor-twice", "lists a tensor twice in the header (the library keeps the last)",
         _header(lambda h, d: (json.dumps(h)[:-1] + f', "{HEAD}": ' + json.dumps(h[HEAD]) + "}", d)), E + "{FILE}: tensor lm_head.weight: appears twice in the header")
_st_case("st-header-not-json", "overwrites the header with non-JSON bytes of the same length",
         _header(lambda h, d: (b"x" * len(json.dumps(h)), d)), E + "{FILE}: corrupt safetensors header (not JSON)")
_st_case("st-header-nan", "adds an unknown field holding NaN to one entry",
         _header(lambda h, d: (json.dumps(h).replace(f'"{HEAD}": {{', f'"{HEAD}": {{"x": NaN, ', 1), d)), E + "{FILE}: corrupt safetensors header (not JSON: NaN is not JSON)")
_st_case("st-header-a-list", "replaces the header by a JSON list", _header(lambda h, d: ("[]", d)), E + "{FILE}: corrupt safetensors header (not a JSON object)")
_st_case("st-header-deep", "nests an unknown field 200 lists deep",
         _header(lambda h, d: (json.dumps(h).replace(f'"{HEAD}": {{', f'"{HEAD}": {{"x": ' + "[" * 200 + "]" * 200 + ", ", 1),
                               d)), E + "{FILE}: corrupt safetensors header (not JSON: JSON nested deeper than 127 levels)")
_st_case("st-shard-truncated", "truncates the second of four shards", _bytes(lambda b: b[:-100]),
         E + "{FILE}: truncated: tensor ", match="prefix", fixture="sharded", rel=SHARD2)


# -- torch/pickle: no pickle runs code; a corrupt torch zip is one line ------------------------------
TP = "torch/pickle"
WOULD_RUN = E + "{FILE}: refused, the pickle is not weights-only and would run code (it would call %s)"


def _bin_dir(fx, t: Path, write: Callable[[Path, dict], None]) -> tuple[Path, Path]:
    """A Hugging Face directory with pytorch_model.bin as `write(path, state_dict)` makes it."""
    src = t / "src"
    src.mkdir()
    shutil.copy(fx.hf / "config.json", src / "config.json")
    write(src / "pytorch_model.bin", load_file(fx.hf / "model.safetensors"))
    return src, src / "pytorch_model.bin"


def _torch_case(name: str, does: str, write: Callable[[Path, dict], None], err: str | None, code: int = 1,
                match: str = "exact", command: str = "convert"):
    @case(name, TP, does, code=code, err=err, match=match, stdout=("wrote {OUT}",) if code == 0 and command == "convert"
          else ())
    def _(fx, t):
        src, f = _bin_dir(fx, t, write)
        argv = ["convert", src, t / "out", "--to", "litgpt"] if command == "convert" else ["inspect", src]
        return Run(argv, {"SRC": src, "FILE": f, "OUT": t / "out"}, absent=(t / "pwned",),
                   check=(lambda: _lit_equals(t / "out", fx.lit)()) if code == 0 and command == "convert" else None)


def _gallery():
    from test_pickle_safety import GALLERY

    return GALLERY


for _name, (_write, _named) in _gallery().items():
    _torch_case("pickle-" + re.sub(r"[^a-z0-9]+", "-", _name.lower()).strip("-"), f"plants a pickle payload: {_name}",
                (lambda write: lambda path, sd: write(path, sd, path.parent.parent / "pwned"))(_write),
                WOULD_RUN % _named)


def _zip_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _saved(obj_of: Callable[[dict], object], **kw):
    return lambda path, sd: torch.save(obj_of(sd), path, **kw)


_torch_case("torch-truncated-zip", "truncates pytorch_model.bin to half", lambda path, sd: path.write_bytes(
    _zip_bytes(sd)[: len(_zip_bytes(sd)) // 2]), E + "{FILE}: not a zip-format torch checkpoint (legacy or truncated file); re-save it with torch.save, or convert it to safetensors first")
_torch_case("torch-random-bytes", "fills pytorch_model.bin with random bytes", lambda path, sd: path.write_bytes(
    bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(2), dtype=torch.uint8).tolist())),
    E + "{FILE}: not a zip-format torch checkpoint (legacy or truncated file); re-save it with torch.save, or convert it to safetensors first")
_torch_case("torch-legacy-format", "saves pytorch_model.bin in torch's legacy (non-zip) format",
            _saved(lambda sd: sd, _use_new_zipfile_serialization=False), E + "{FILE}: not a zip-format torch checkpoint (legacy or truncated file); re-save it with torch.save, or convert it to safetensors first")
_torch_case("torch-not-a-dict", "saves a list of tensors instead of a state dict", _saved(lambda sd: list(sd.values())),
            E + "{FILE}: holds a list, not a state dict of tensors")
_torch_case("torch-non-tensor-value", "stores an int where a tensor should be",
            _saved(lambda sd: {**sd, "model.norm.weight": 3}), E + "{SRC}: tensor model.norm.weight is missing (the llama config needs it)")
_torch_case("torch-string-value", "stores a string where a tensor should be",
            _saved(lambda sd: {**sd, "model.norm.weight": "weights"}), E + "{SRC}: tensor model.norm.weight is missing (the llama config needs it)")
_torch_case("torch-int-key", "stores a tensor under the key 1", _saved(lambda sd: {**sd, 1: torch.ones(2)}),
            E + "{FILE}: a tensor is stored under the key '1', which is int, not a string")
_torch_case("torch-orig-mod-twice", "stores _orig_mod.model.norm.weight beside model.norm.weight",
            _saved(lambda sd: {**sd, "_orig_mod.model.norm.weight": torch.zeros(64)}),
            E + "{FILE}: tensor model.norm.weight appears twice (with and without _orig_mod.)")


def _storage_short(path: Path, sd: dict) -> None:
    from test_strict_readers import _members, _rezip

    members = _members(_zip_bytes(sd))
    first = next(n for n, _ in members if n.endswith("/data/0"))
    path.write_bytes(_rezip([(n, d[: len(d) // 2] if n == first else d) for n, d in members]))


_torch_case("torch-storage-shorter-than-read", "shortens a storage record to half (torch with mmap would read past it)",
            _storage_short, E + "{FILE}: storage 0: its record data/0 holds ", match="prefix")


def _recompressed(path: Path, sd: dict) -> None:
    data = _zip_bytes(sd)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info, body in items:
            z.writestr(info.filename, body)


_torch_case("torch-deflated-members", "re-zips pytorch_model.bin with compressed members", _recompressed, E + "{FILE}: zip member archive/data.pkl is compressed (method 8, ", match="prefix")


def _duplicate_member(path: Path, sd: dict) -> None:
    data = _zip_bytes(sd)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, body in items + [(next(n for n, _ in items if n.endswith("/data/0")), bytes(8))]:
                z.writestr(name, body)


_torch_case("torch-duplicate-member", "adds a second zip member named like the first storage", _duplicate_member,
            E + "{FILE}: zip member archive/data/0 appears twice")


def _stand_in(path: Path, sd: dict) -> None:
    """numpy's runstring called from the pickle: bound to an inert stand-in, it runs nothing."""
    from test_pickle_safety import _arg, _replace_pkl

    torch.save(sd, path)
    with zipfile.ZipFile(path) as z:
        original = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    marker = path.parent.parent / "pwned"
    call = b"cnumpy.testing._private.utils\nrunstring\n" + _arg(f"open({str(marker)!r}, 'w')") + b"}\x86R"
    _replace_pkl(path, original[:-1] + _arg("meta") + call + b"s.")


_torch_case("pickle-numpy-runstring-stand-in", "calls numpy's runstring from the pickle (bound to an inert stand-in): "
            "inspect reads it and nothing runs", _stand_in, None, code=0, command="inspect")


def _payload_elsewhere(name: str, does: str, build: Callable[[object, Path, object], tuple[list, dict]], err: str):
    @case(name, TP, does, err=err)
    def _(fx, t):
        from test_pickle_safety import _reduce

        evil = _reduce(os.system, f"touch {t / 'pwned'}")
        argv, names = build(fx, t, evil)
        return Run(argv, names, absent=(t / "pwned",))


def _lit_payload(fx, t, evil):
    lit = copy(fx.lit, t / "lit")
    torch.save({**torch.load(lit / "lit_model.pth", weights_only=True), "x": evil}, lit / "lit_model.pth")
    return ["convert", lit, t / "out", "--to", "hf"], {"SRC": lit, "FILE": lit / "lit_model.pth", "OUT": t / "out"}


def _adapter_payload(fx, t, evil):
    adapter = copy(fx.adapter, t / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"x": evil}, adapter / "adapter_model.bin")
    src = copy(fx.hf, t / "src")
    return (["convert", src, t / "out", "--to", "hf", "--merge-lora", adapter],
            {"SRC": src, "ADAPTER": adapter, "FILE": adapter / "adapter_model.bin", "OUT": t / "out"})


def _inspect_payload(fx, t, evil):
    src, f = _bin_dir(fx, t, lambda path, sd: torch.save({**sd, "x": evil}, path))
    return ["inspect", src], {"SRC": src, "FILE": f}


_payload_elsewhere("pickle-in-litgpt-pth", "plants os.system in a LitGPT lit_model.pth", _lit_payload,
                   WOULD_RUN % "posix.system")
_payload_elsewhere("pickle-in-adapter-bin", "plants os.system in a PEFT adapter_model.bin (--merge-lora)",
                   _adapter_payload, WOULD_RUN % "posix.system")
_payload_elsewhere("pickle-via-inspect", "plants os.system in a .bin and only runs inspect", _inspect_payload,
                   WOULD_RUN % "posix.system")


# -- MindSpore .ckpt: a garbage checkpoint is one line --------------------------------------------
MS = "MindSpore .ckpt"


def _ms_case(name: str, does: str, mutate: Callable[[Path, Path], None], err: str, match: str = "exact"):
    @case(name, MS, does, err=err, match=match)
    def _(fx, t):
        src = copy(fx.mindspore, t / "src")
        mutate(src / "model.ckpt", src)
        return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "FILE": src / "model.ckpt", "OUT": t / "out"})


def _ckpt_bytes(edit: Callable[[bytes], bytes]):
    return lambda f, src: f.write_bytes(edit(f.read_bytes()))


def _synthetic(which: str):
    def mutate(f, src):
        from test_strict_readers import CKPT_REFUSED

        f.write_bytes(next(data for name, data, _ in CKPT_REFUSED if name == which))
    return mutate


_ms_case("ckpt-truncated", "cuts the last 100 bytes off model.ckpt", _ckpt_bytes(lambda b: b[:-100]), E + "{FILE}: tensor lm_head.weight: truncated: its record ends at byte 313806 but the data ends at byte 313706")
_ms_case("ckpt-empty", "empties model.ckpt", _ckpt_bytes(lambda b: b""), E + "{FILE}: empty file, not a MindSpore checkpoint")
_ms_case("ckpt-random-bytes", "fills model.ckpt with random bytes", _ckpt_bytes(lambda b: bytes(torch.randint(
    0, 256, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8).tolist())), E + "{FILE}: not a MindSpore checkpoint (first record: field key 0x6a where a Checkpoint.value record (0x0a) must start); encrypted checkpoints need MindSpore itself")
_ms_case("ckpt-appended-garbage", "appends 7 bytes of garbage", _ckpt_bytes(lambda b: b + b"\xff" * 7), E + "{FILE}: record at byte 313806, after tensor lm_head.weight: field key 0xff where a Checkpoint.value record (0x0a) must start")
_ms_case("ckpt-unknown-type", "renames a tensor type Float32 -> Float99", _ckpt_bytes(
    lambda b: b.replace(b"Float32", b"Float99", 1)), E + "{FILE}: tensor model.tok_embeddings.embedding_weight: unknown tensor_type 'Float99'")
_ms_case("ckpt-renamed-tensor", "renames lm_head.weight to lm_head.weighx in the file",
         _ckpt_bytes(lambda b: b.replace(b"lm_head.weight", b"lm_head.weighx", 1)), E + "{FILE}: tensor lm_head.weighx is not part of a llama model with this config (unmapped extra tensor) (and 1 more problem)")
_ms_case("ckpt-record-twice", "appends a copy of the whole file (every record twice)", _ckpt_bytes(lambda b: b + b),
         E + "{FILE}: tensor model.tok_embeddings.embedding_weight: appears again at byte 313806 after other records (a tensor's records must be adjacent; MindSpore would keep only the later copy)")
_ms_case("ckpt-field-number-0", "writes a protobuf field number 0 (protobuf refuses it)", _synthetic("field number 0"),
         E + "{FILE}: tensor b: field number 0 at byte 52")
_ms_case("ckpt-type-not-utf8", "writes a tensor_type that is not UTF-8",
         _synthetic("a tensor_type that is not UTF-8, even when a later one is"), E + "{FILE}: tensor b: tensor_type is not UTF-8 (b'\\xff')")
_ms_case("ckpt-map-of-four-parts", "writes a map tensor of four parts", _synthetic("a map of four parts"), E + "{FILE}: tensor m: maptensor part 3 at byte 28: a map tensor has at most 3 parts")
_ms_case("ckpt-two-checkpoints", "puts a second .ckpt beside the first",
         lambda f, src: shutil.copy(f, src / "other.ckpt"), E + "{SRC}: expected one .ckpt or MindSpore .safetensors file, found 2")
_ms_case("ckpt-yaml-garbage", "replaces mindformers.yaml by garbage and deletes config.json",
         lambda f, src: ((src / "config.json").unlink(), (src / "mindformers.yaml").write_text("model: [\n")), E + "{SRC}/mindformers.yaml: not valid YAML (while parsing a flow node)")


# -- Nanotron: shard metadata and configs -----------------------------------------------------------
NT = "Nanotron"
NT_RANK1 = f"{NT_EMBED}/model_weight_pp-rank-0-of-1_tp-rank-1-of-2.safetensors"


def _nt_case(name: str, does: str, mutate: Callable[[Path], None], err: str, match: str = "exact",
             rel: str = NT_RANK1):
    @case(name, NT, does, err=err, match=match)
    def _(fx, t):
        src = copy(fx.nanotron, t / "src")
        mutate(src)
        return Run(["convert", src, t / "out", "--to", "hf"], {"SRC": src, "FILE": src / rel, "OUT": t / "out"})


def _nt_meta(**changes):
    def mutate(src):
        f = src / NT_RANK1
        header, data = read_header(f)
        meta = dict(header["__metadata__"])
        for k, v in changes.items():
            if v is None:
                meta.pop(k)
            else:
                meta[k] = v
        header["__metadata__"] = meta
        write_st(f, header, data)
    return mutate


_nt_case("nanotron-version-9", "sets a shard's metadata version to 9.9", _nt_meta(version="9.9"), E + "{FILE}: bad shard metadata (checkpoint version 9.9 is newer than 1.5)")
_nt_case("nanotron-no-unsharded-shape", "deletes a shard's unsharded_shape", _nt_meta(unsharded_shape=None), E + "{FILE}: shard metadata has keys ['local_global_slices_pairs', 'version'], expected exactly ['local_global_slices_pairs', 'unsharded_shape', 'version']")
_nt_case("nanotron-pairs-garbage", "sets local_global_slices_pairs to garbage", _nt_meta(local_global_slices_pairs="x"),
         E + "{FILE}: bad shard metadata (pair 'x' is not local#global)")
_nt_case("nanotron-shape-garbage", "sets unsharded_shape to \"(a, b)\"", _nt_meta(unsharded_shape="(a, b)"), E + "{FILE}: bad shard metadata ('(a, b)' is not a tuple of integers)")
_nt_case("nanotron-shape-wrong", "sets unsharded_shape to (64, 64)", _nt_meta(unsharded_shape="(64, 64)"), E + "{FILE}: bad shard metadata (slice 64:128:None does not fit a dimension of 64)")
_nt_case("nanotron-pairs-overlap", "makes rank 1's slice the same as rank 0's",
         lambda src: _nt_meta(local_global_slices_pairs=read_header(
             src / NT_RANK1.replace("tp-rank-1", "tp-rank-0"))[0]["__metadata__"]["local_global_slices_pairs"])(src),
         E + "{SRC}/model/model/token_position_embeddings/pp_block/token_embedding: the shards of model.token_position_embeddings.pp_block.token_embedding.weight do not cover its unsharded shape [128, 64] exactly once (inconsistent metadata)")
_nt_case("nanotron-rank-missing", "deletes the TP rank 1 shard of the embedding",
         lambda src: (src / NT_RANK1).unlink(), E + "{SRC}/model/model/token_position_embeddings/pp_block/token_embedding: shard files of model.token_position_embeddings.pp_block.token_embedding.weight (TP=2): missing tp-rank 1")
_nt_case("nanotron-rank-out-of-range", "renames a shard to tp-rank-3-of-2",
         lambda src: (src / NT_RANK1).rename(src / NT_RANK1.replace("tp-rank-1-of-2", "tp-rank-3-of-2")), E + "{SRC}/model/model/token_position_embeddings/pp_block/token_embedding: shard files of model.token_position_embeddings.pp_block.token_embedding.weight (TP=2): missing tp-rank 1")
_nt_case("nanotron-file-name-garbage", "renames a shard outside Nanotron's naming pattern",
         lambda src: (src / NT_RANK1).rename(src / NT_EMBED / "model_weight_bogus.safetensors"), E + "{SRC}/model/model/token_position_embeddings/pp_block/token_embedding/model_weight_bogus.safetensors: not a Nanotron parameter file name")
_nt_case("nanotron-model-config-unknown-key", "adds an unknown key to model_config.json",
         lambda src: edit_json(src / "model_config.json", lambda c: c.update(bogus_key=1)), E + "{FILE}: unknown LlamaConfig key 'bogus_key' (Nanotron itself would refuse it); only Llama and Idefics3 checkpoints are supported",
         rel="model_config.json")
_nt_case("nanotron-model-config-missing-field", "deletes hidden_size from model_config.json",
         lambda src: edit_json(src / "model_config.json", lambda c: c.pop("hidden_size")), E + "{FILE}: missing field 'hidden_size'",
         rel="model_config.json")
_nt_case("nanotron-yaml-garbage", "deletes model_config.json and writes garbage into config.yaml",
         lambda src: ((src / "model_config.json").unlink(), (src / "config.yaml").write_text("model: {model_config: [")),
         E + "{FILE}: not valid Nanotron config (while parsing a flow node)", rel="config.yaml")


# -- ONNX: a corrupt export is one line -----------------------------------------------------------
OX = "ONNX"


def _onnx_case(name: str, does: str, mutate: Callable[[Path, Path], None], err: str, match: str = "exact",
               rel: str = "model.onnx", argv: Callable[[Path, Path], list] | None = None):
    @case(name, OX, does, err=err, match=match)
    def _(fx, t):
        src = copy(fx.onnx, t / "src")
        mutate(src, t)
        return Run(argv(src, t) if argv else ["convert", src, t / "out", "--to", "hf"],
                   {"SRC": src, "FILE": src / rel, "OUT": t / "out"})


def _onnx_location(where: str):
    def mutate(src, t):
        import onnx

        model = onnx.load(str(src / "model.onnx"), load_external_data=False)
        for init in model.graph.initializer:
            for e in init.external_data:
                if e.key == "location":
                    e.value = where
            break
        onnx.save(model, str(src / "model.onnx"))
    return mutate


_onnx_case("onnx-graph-truncated", "truncates model.onnx to 500 bytes",
           lambda src, t: (src / "model.onnx").write_bytes((src / "model.onnx").read_bytes()[:500]),
           E + "{FILE}: not a readable ONNX model (", match="prefix")
_onnx_case("onnx-data-truncated", "truncates model.onnx.data to 1000 bytes",
           lambda src, t: os.truncate(src / "model.onnx.data", 1000), E + "{FILE}: tensor model.embed_tokens.weight lies at bytes 0..32768, past the file's end (1000)", rel="model.onnx.data")
_onnx_case("onnx-location-dotdot", "points an initializer's external data at ../outside.data",
           _onnx_location("../outside.data"), E + "{FILE}: tensor model.embed_tokens.weight points outside its directory ('../outside.data')")
_onnx_case("onnx-location-absolute", "points an initializer's external data at /etc/passwd",
           _onnx_location("/etc/passwd"), E + "{FILE}: tensor model.embed_tokens.weight points outside its directory ('/etc/passwd')")
_onnx_case("onnx-manifest-not-json", "truncates weightport_onnx.json",
           lambda src, t: (src / "weightport_onnx.json").write_text('{"graphs": '), E + "{FILE}: not valid JSON (",
           match="prefix", rel="weightport_onnx.json")
_onnx_case("onnx-manifest-no-graphs", "deletes the graphs of weightport_onnx.json",
           lambda src, t: edit_json(src / "weightport_onnx.json", lambda m: m.pop("graphs")), E + "{FILE}: not a weightport ONNX manifest (KeyError: 'graphs')",
           rel="weightport_onnx.json")
_onnx_case("onnx-manifest-graph-outside", "points the decoder graph at ../model.onnx",
           lambda src, t: edit_json(src / "weightport_onnx.json",
                                    lambda m: m["graphs"]["decoder"].update(file="../model.onnx")), E + "{FILE}: names '../model.onnx', which is outside {SRC}; not opened",
           rel="weightport_onnx.json")
_onnx_case("run-not-an-export", "runs `weightport run` on a Hugging Face directory",
           lambda src, t: (src / "weightport_onnx.json").unlink(), E + "{SRC}: no weightport_onnx.json; not a weightport ONNX export", argv=lambda src, t: ["run", src, "--prompt", "w1"])
_onnx_case("run-tokenizer-fifo", "runs `weightport run` on an export whose tokenizer.json is a FIFO",
           lambda src, t: fifo(src / "tokenizer.json"), E + "{SRC}: no tokenizer.json to encode the prompt with", argv=lambda src, t: ["run", src, "--prompt", "w1"])


# -- LoRA adapters: a bad adapter is one line, nothing written ----------------------------------------
LA = "LoRA adapters"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _lora_case(name: str, does: str, mutate: Callable[[Path], None] | None, err: str | None, code: int = 1,
               match: str = "exact", flags: tuple[str, ...] = (), check: Callable | None = None, missing: bool = False):
    @case(name, LA, does, code=code, err=err, match=match, stdout=("wrote {OUT}",) if code == 0 else ())
    def _(fx, t):
        src = copy(fx.hf, t / "src")
        adapter = t / "adapter"
        if not missing:
            copy(fx.adapter, adapter)
            if mutate:
                mutate(adapter)
        out = t / "out"
        return Run(["convert", src, out, "--to", "hf", "--merge-lora", adapter, *flags],
                   {"SRC": src, "ADAPTER": adapter, "WEIGHTS": adapter / "adapter_model.safetensors",
                    "CONFIG": adapter / "adapter_config.json", "OUT": out},
                   check=(lambda: check(fx, out)) if check else None)


def _adapter_tensors(edit: Callable[[dict], dict]):
    def mutate(adapter):
        f = adapter / "adapter_model.safetensors"
        save_file(edit(load_file(f)), f, metadata={"format": "pt"})
    return mutate


def _merged_changes(fx, out):
    base, got = tensors_of(fx.hf), tensors_of(out)
    changed = {k for k in base if not torch.equal(base[k], got[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"}, sorted(changed)


def _merged_nothing(fx, out):
    _same_tensors(out, fx.hf)()


_lora_case("lora-merge", "merges a good adapter (the baseline): exactly the q/v projections change", None, None, code=0,
           check=_merged_changes)
_lora_case("lora-scale-zero", "merges with --lora-scale 0: the weights are the base's, bit for bit", None, None, code=0,
           flags=("--lora-scale", "0"), check=_merged_nothing)
_lora_case("lora-adapter-missing", "names an adapter directory that does not exist", None,
           E + "{ADAPTER}: no such file or directory (--merge-lora)", missing=True)
_lora_case("lora-no-config", "deletes adapter_config.json", lambda a: (a / "adapter_config.json").unlink(), E + "{ADAPTER}: not a LoRA adapter weightport reads (a PEFT directory with adapter_config.json, or LitGPT's lit_model.pth.lora with hyperparameters.yaml)")
_lora_case("lora-config-not-json", "truncates adapter_config.json", lambda a: (a / "adapter_config.json").write_text("{"),
           E + "{CONFIG}: not valid JSON (", match="prefix")
_lora_case("lora-config-a-list", "replaces adapter_config.json by a list", lambda a: (a / "adapter_config.json").write_text(
    "[]"), E + "{CONFIG}: expected a JSON object")
_lora_case("lora-config-duplicate-r", "gives r twice in adapter_config.json",
           lambda a: (a / "adapter_config.json").write_text(_append('"r": 16')(
               json.dumps({k: v for k, v in json.loads((a / "adapter_config.json").read_text()).items()}))),
           E + "{CONFIG}: key 'r' is given twice; refused")
_lora_case("lora-peft-type-ia3", "sets peft_type to IA3", lambda a: edit_json(a / "adapter_config.json",
                                                                             lambda c: c.update(peft_type="IA3")),
           E + "{CONFIG}: peft_type 'IA3'; only LoRA adapters are merged")
_lora_case("lora-dora", "sets use_dora", lambda a: edit_json(a / "adapter_config.json", lambda c: c.update(use_dora=True)),
           E + "{CONFIG}: a DoRA adapter (use_dora); weightport merges plain LoRA only")
_lora_case("lora-no-weights", "deletes adapter_model.safetensors", lambda a: (a / "adapter_model.safetensors").unlink(),
           E + "{ADAPTER}: no adapter_model.safetensors or adapter_model.bin")
_lora_case("lora-no-lora-tensors", "replaces the adapter's weights by an empty safetensors file",
           _adapter_tensors(lambda sd: {}), E + "{WEIGHTS}: holds no LoRA tensors")
_lora_case("lora-missing-b", "deletes one lora_B", _adapter_tensors(lambda sd: {k: v for k, v in sd.items() if k != Q_B}),
           E + "{WEIGHTS}: model.layers.0.self_attn.q_proj has lora_A but no lora_B")
_lora_case("lora-rank-mismatch", "sets r to 8 for rank-4 weights",
           lambda a: edit_json(a / "adapter_config.json", lambda c: c.update(r=8)), E + "{WEIGHTS}: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has rank 4, but adapter_config.json gives model.layers.0.self_attn.q_proj rank 8 (r / rank_pattern); the config does not describe these weights")
_lora_case("lora-wrong-shape", "replaces a lora_B by one of another base model's width",
           _adapter_tensors(lambda sd: {**sd, Q_B: torch.zeros(96, 4)}), E + "{ADAPTER}: LoRA of model.layers.0.self_attn.q_proj is B [96, 4] @ A [4, 64], which does not fit its weight [64, 64] (an adapter for another base model?)")
_lora_case("lora-unknown-module", "adds LoRA weights for a module the base model does not have",
           _adapter_tensors(lambda sd: {**sd, Q_A.replace("q_proj", "x_proj"): torch.zeros(4, 64),
                                        Q_B.replace("q_proj", "x_proj"): torch.zeros(64, 4)}), E + "{ADAPTER}: the adapter targets model.layers.0.self_attn.x_proj, which the base model does not have (an adapter for another base model?)")
_lora_case("lora-dora-magnitude", "adds a DoRA lora_magnitude_vector tensor",
           _adapter_tensors(lambda sd: {**sd, Q_A.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(64)}),
           E + "{WEIGHTS}: tensor base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector belongs to DoRA (use_dora); weightport merges plain LoRA only")
_lora_case("lora-alpha-on-hf", "passes --lora-alpha (for xtuner checkpoints) to a Hugging Face merge", None, E + "--lora-alpha: only for xtuner training checkpoints that hold LoRA weights, not format hf",
           flags=("--lora-alpha", "16"))


# -- build: assembling an Idefics3 from parts that do not fit -----------------------------------------
BD = "build"


def _build_case(name: str, does: str, flags: tuple[str, ...], err: str | None, code: int = 1, match: str = "exact",
                text: str = "hf", vision: str = "siglip", mutate: Callable[[Path, Path], None] | None = None,
                check: Callable | None = None, stdout: tuple[str, ...] = ()):
    @case(name, BD, does, code=code, err=err, match=match, stdout=stdout)
    def _(fx, t):
        tx, vi = copy(getattr(fx, text), t / "text"), copy(getattr(fx, vision), t / "vision")
        if mutate:
            mutate(tx, vi)
        out = t / "out"
        return Run(["build", "idefics3", out, "--text", tx, "--vision", vi, *flags], {"TEXT": tx, "VISION": vi, "OUT": out},
                   check=(lambda: check(fx, out)) if check else None)


def _idefics3_built(fx, out):
    got = tensors_of(out)
    text = load_file(fx.hf / "model.safetensors")
    assert torch.equal(got["model.text_model.norm.weight"], text["model.norm.weight"])
    assert got["model.text_model.embed_tokens.weight"].shape == (131, 64)


_build_case("build-idefics3", "builds an Idefics3 from a Llama and a SigLIP (the baseline)", (), None, code=0,
            check=_idefics3_built)
_build_case("build-from-litgpt-text", "builds with a LitGPT checkpoint as --text", (), None, code=0, text="lit",
            check=_idefics3_built)
_build_case("build-dry-run", "builds with --dry-run: nothing is written", ("--dry-run",), None, code=0,
            check=lambda fx, out: None if not os.path.lexists(out) else (_ for _ in ()).throw(AssertionError("written")))
_build_case("build-vision-is-llama", "passes a Llama as --vision", (), E + "{VISION}/config.json: model_type 'llama' is not a SigLIP checkpoint (expected siglip or siglip_vision_model)", vision="hf")
_build_case("build-text-is-siglip", "passes the SigLIP as --text", (), E + "{TEXT}/config.json: unknown architecture model_type='siglip' (supported: ", match="prefix", text="siglip")
_build_case("build-from-nanotron-text", "builds with a Nanotron checkpoint as --text (a Llama in another format)", (), None,
            code=0, text="nanotron", check=_idefics3_built)
_build_case("build-vision-lacks-hidden-size", "deletes hidden_size from the SigLIP's vision config", (), E + "{VISION}/config.json: SigLIP vision config lacks 'hidden_size'",
            mutate=lambda tx, vi: edit_json(vi / "config.json", lambda c: c["vision_config"].pop("hidden_size")))
_build_case("build-scale-factor-3", "passes --scale-factor 3, which does not divide the 4x4 patch grid: built, with a "
            "note saying so", ("--scale-factor", "3"), None, code=0, check=lambda fx, out: None,
            stdout=("note:    4x4 patches per image do not divide by scale_factor 3: the pixel shuffle needs them to; feed "
                    "images of a size that gives a multiple (Idefics3-8B uses 364 px with patch 14)",))
_build_case("build-to-onnx", "builds straight to ONNX", ("--to", "onnx"), E + "format onnx does not support idefics3")
_build_case("build-tp-3", "builds a Nanotron with --tp 3", ("--to", "nanotron", "--tp", "3"), E + "--tp 3 does not divide text_config num_attention_heads (4): Nanotron gives each TP rank whole heads; choose a TP size that divides both head counts")


@case("build-text-missing", BD, "names a --text directory that does not exist", err=E + "{TEXT}: no such file or directory (--text)")
def _(fx, t):
    vision = copy(fx.siglip, t / "vision")
    return Run(["build", "idefics3", t / "out", "--text", t / "text", "--vision", vision],
               {"TEXT": t / "text", "VISION": vision, "OUT": t / "out"})


# -- verify / eval-captions reports: a report never lands on an input or the user's file --------------
RP = "verify/eval reports"
NOT_A_REPORT = E + "{REPORT}: exists and is not a report weightport wrote; not overwritten (--report: choose another file or remove it)"


def _report_case(name: str, does: str, where: Callable[[Path, Path, Path], Path], err: str | None, code: int = 1,
                 match: str = "exact", command: str = "verify", extra: Callable | None = None):
    @case(name, RP, does, code=code, err=err, match=match, stdout=("verdict:  equivalent",) if code == 0 else ())
    def _(fx, t):
        a, b = copy(fx.hf, t / "a"), copy(fx.lit, t / "b")
        report = where(a, b, t)
        argv = (["verify", a, b, "--tensors-only", "--report", report] if command == "verify"
                else ["eval-captions", a, "--samples", "1", "--report", report])
        more = extra(fx, t) if extra else {}
        return Run(argv + more.pop("argv", []), {"A": a, "B": b, "OUT" if code == 0 else "REPORT": report, **more},
                   check=(lambda: _is_report(report)) if code == 0 else None)


def _is_report(report: Path):
    assert json.loads(report.read_text())["tool"] == "weightport"


def _file(name: str, text: str):
    def where(a, b, t):
        (t / name).write_text(text)
        return t / name
    return where


_report_case("report-inside-a", "writes verify's --report into A", lambda a, b, t: a / "report.json",
             E + "{REPORT}: is, contains or lies inside the input {A} (A); choose another output")
_report_case("report-onto-b-config", "writes verify's --report over B's config.json", lambda a, b, t: b / "config.json",
             E + "{REPORT}: is, contains or lies inside the input {B} (B); choose another output")
_report_case("report-onto-a-weights", "writes verify's --report over A's model.safetensors",
             lambda a, b, t: a / "model.safetensors", E + "{REPORT}: is, contains or lies inside the input {A} (A); "
             "choose another output")
_report_case("report-is-a", "names A itself as the --report", lambda a, b, t: a,
             E + "{REPORT}: is, contains or lies inside the input {A} (A); choose another output")
_report_case("report-via-symlinked-dir", "writes --report through a symlink to A's directory",
             lambda a, b, t: ((t / "link").symlink_to(a), t / "link" / "r.json")[1],
             E + "{REPORT}: is, contains or lies inside the input {A} (A); choose another output")
_report_case("report-in-tokenizer-dir", "writes --report into the --tokenizer directory",
             lambda a, b, t: t / "tok" / "r.json",
             E + "{REPORT}: is, contains or lies inside the input {TOK} (--tokenizer); choose another output",
             extra=lambda fx, t: {"TOK": copy(fx.hf, t / "tok"), "argv": ["--tokenizer", t / "tok"]})
_report_case("report-user-json", "names their own notes.json as the --report", _file("notes.json", '{"mine": true}'),
             NOT_A_REPORT)
_report_case("report-user-text", "names their own thesis.txt as the --report", _file("thesis.txt", "four years"),
             NOT_A_REPORT)
_report_case("report-fifo", "names a FIFO as the --report", lambda a, b, t: fifo(t / "r.json"), E + "{REPORT}: is a FIFO (named pipe), not a regular file; not opened")
_report_case("report-directory", "names an existing directory as the --report",
             lambda a, b, t: ((t / "r").mkdir(), t / "r")[1], E + "{REPORT}: is a directory, not a regular file; not opened")
_report_case("report-symlink-to-report", "names a symlink to an earlier weightport report as the --report",
             lambda a, b, t: ((t / "old.json").write_text('{"tool": "weightport"}'),
                              (t / "r.json").symlink_to(t / "old.json"), t / "r.json")[2], NOT_A_REPORT)
_report_case("report-replaces-own", "names an earlier weightport report: it is replaced", _file(
    "r.json", '{"tool": "weightport", "old": true}'), None, code=0)
_report_case("report-in-missing-dir", "names a --report in a directory that does not exist",
             lambda a, b, t: t / "nowhere" / "r.json", E + "{REPORT}: the directory to write it in, {T}/nowhere, does not exist (--report)")
_report_case("eval-report-onto-model-config", "writes eval-captions' --report over MODEL/config.json",
             lambda a, b, t: a / "config.json",
             E + "{REPORT}: is, contains or lies inside the input {A} (MODEL); choose another output", command="eval")
_report_case("eval-report-user-file", "names their own notes.json as eval-captions' --report",
             _file("notes.json", '{"mine": true}'), NOT_A_REPORT, command="eval")


@case("verify-one-side", RP, "runs verify with A only", err=E + "verify needs A and B (or --manifest OUT)")
def _(fx, t):
    a = copy(fx.hf, t / "a")
    return Run(["verify", a], {"A": a})


@case("verify-missing-side", RP, "runs verify with a B that does not exist", err=E + "{B}: no such file or directory")
def _(fx, t):
    a = copy(fx.hf, t / "a")
    return Run(["verify", a, t / "b", "--tensors-only"], {"A": a, "B": t / "b"})


# -- CLI misuse: a wrong flag or value is one line before anything is read ----------------------------
CL = "CLI misuse"


def _cli_case(name: str, does: str, argv: Callable[[Path, Path], list], err: str, code: int = 1, match: str = "exact",
              usage: bool = False, fixture: str = "hf", stdout: tuple[str, ...] = ()):
    @case(name, CL, does, code=code, err=err, match=match, usage=usage, stdout=stdout)
    def _(fx, t):
        src = copy(getattr(fx, fixture), t / "src")
        return Run(argv(src, t), {"SRC": src, "OUT": t / "out"})


def _conv(*flags, to: str = "litgpt"):
    return lambda src, t: ["convert", src, t / "out", "--to", to, *flags]


_cli_case("unknown-to", "asks for --to safetensors", _conv(to="safetensors"), "weightport convert: error: argument --to: "
          "invalid choice: 'safetensors' (choose from ", match="prefix", usage=True, code=2)
_cli_case("unknown-from", "passes --from pytorch", _conv("--from", "pytorch"), "weightport convert: error: argument "
          "--from: invalid choice: 'pytorch' (choose from ", match="prefix", usage=True, code=2)
_cli_case("wrong-from", "passes --from litgpt for a Hugging Face directory", _conv("--from", "litgpt", to="hf"), E + "{SRC}: no model_config.yaml (or legacy lit_config.json) next to the weights")
_cli_case("wrong-from-mindspore", "passes --from mindspore for a Hugging Face directory", _conv("--from", "mindspore"),
          E + "{SRC}: expected one .ckpt or MindSpore .safetensors file, found 0")
_cli_case("bad-dtype", "asks for --dtype fp8", _conv("--dtype", "fp8"), "weightport convert: error: argument --dtype: "
          "invalid choice: 'fp8' (choose from ", match="prefix", usage=True, code=2)
_cli_case("tp-zero", "passes --tp 0", _conv("--tp", "0", to="nanotron"), E + "--tp must be a positive integer, got 0")
_cli_case("tp-negative", "passes --tp -2", _conv("--tp", "-2", to="nanotron"), E + "--tp must be a positive integer, got -2")
_cli_case("tp-not-a-number", "passes --tp two", _conv("--tp", "two", to="nanotron"),
          "weightport convert: error: argument --tp: invalid int value: 'two'", usage=True, code=2)
_cli_case("tp-for-litgpt", "passes --tp 2 for a LitGPT output", _conv("--tp", "2"),
          E + "format litgpt has no per-rank files; --tp applies to nanotron")
_cli_case("tp-not-dividing", "passes --tp 3 for Nanotron (4 heads)", _conv("--tp", "3", to="nanotron"), E + "--tp 3 does not divide num_attention_heads (4): Nanotron gives each TP rank whole heads; choose a TP size that divides both head counts")
_cli_case("pp-zero", "passes --pp 0", _conv("--pp", "0", to="nanotron"), E + "--pp must be a positive integer, got 0")
_cli_case("pp-too-many", "passes --pp 5 for a 2-layer model", _conv("--pp", "5", to="nanotron"), E + "--pp 5 is more pipeline stages than the 2 decoder layers")
_cli_case("shard-size-garbage", "passes --max-shard-size lots", _conv("--max-shard-size", "lots", to="hf"), E + "cannot read size 'lots'; write it like 5GB, 500MB or 2GiB")
_cli_case("shard-size-negative", "passes --max-shard-size=-5GB", _conv("--max-shard-size=-5GB", to="hf"),
          E + "cannot read size '-5GB'; write it like 5GB, 500MB or 2GiB")


@case("shard-size-zero", CL, "passes --max-shard-size 0: every tensor in a shard of its own, all of them there",
      code=0, stdout=("wrote {OUT}",))
def _(fx, t):
    src = copy(fx.hf, t / "src")

    def check():
        assert len(list((t / "out").glob("*.safetensors"))) == len(load_file(src / "model.safetensors"))
        _same_tensors(t / "out", src)()
    return Run(["convert", src, t / "out", "--to", "hf", "--max-shard-size", "0"], {"SRC": src, "OUT": t / "out"},
               check=check)
_cli_case("unknown-layout", "passes --layout zigzag for MindSpore", _conv("--layout", "zigzag", to="mindspore"), E + "format mindspore has no layout 'zigzag' for llama (choose one of separate, fused, fused-interleaved, gmm)")
_cli_case("unknown-container", "passes --container zip for MindSpore", _conv("--container", "zip", to="mindspore"),
          E + "format mindspore has no container 'zip' (choose one of ckpt, safetensors)")
_cli_case("layout-for-hf", "passes --layout fused for a Hugging Face output", _conv("--layout", "fused", to="hf"),
          E + "format hf has no layout 'fused' (it has only one)")
_cli_case("bad-nanotron-version", "passes --nanotron-version 9", _conv("--nanotron-version", "9", to="nanotron"),
          E + "--nanotron-version 9 is not one of 1.2, 1.3, 1.4, 1.5")
_cli_case("llm-for-hf-source", "passes --llm to a plain Hugging Face conversion",
          lambda src, t: ["convert", src, t / "out", "--to", "hf", "--llm", src], E + "--llm: only for LLaVA checkpoints that lack a part (xtuner, xtuner-llava, llava), not format hf")
_cli_case("peft-from-hf", "asks --to peft from a Hugging Face directory", _conv(to="peft"), E + "{SRC}: --to peft takes a LitGPT LoRA checkpoint (lit_model.pth.lora with hyperparameters.yaml and model_config.yaml)")
_cli_case("missing-source", "names a source that does not exist",
          lambda src, t: ["convert", t / "nope", t / "out", "--to", "litgpt"], E + "{T}/nope: no such file or directory")
_cli_case("empty-source", "names an empty directory as the source",
          lambda src, t: ((t / "empty").mkdir(), ["convert", t / "empty", t / "out", "--to", "litgpt"])[1],
          E + "{T}/empty: not a checkpoint in any known format (", match="prefix")
_cli_case("text-file-source", "names a text file as the source",
          lambda src, t: ((t / "notes").mkdir(), (t / "notes" / "notes.txt").write_text("hello"),
                          ["convert", t / "notes" / "notes.txt", t / "out", "--to", "hf"])[2],
          E + "{T}/notes/notes.txt: not a checkpoint in any known format (", match="prefix")
_cli_case("no-command", "runs weightport with no command", lambda src, t: [],
          "weightport: error: the following arguments are required: COMMAND", usage=True, code=2)
_cli_case("no-to", "forgets --to", lambda src, t: ["convert", src, t / "out"],
          "weightport convert: error: the following arguments are required: --to", usage=True, code=2)
_cli_case("inspect-missing", "inspects a path that does not exist", lambda src, t: ["inspect", t / "nope"],
          E + "{T}/nope: no such file or directory")
_cli_case("unknown-command", "runs weightport frobnicate", lambda src, t: ["frobnicate"],
          "weightport: error: argument COMMAND: invalid choice: 'frobnicate' (choose from ", match="prefix", usage=True,
          code=2)
_cli_case("dry-run-writes-nothing", "asks for --dry-run: the plan, and nothing written", _conv("--dry-run"), None, code=0,
          stdout=("dry run: nothing written",))
