"""Which globals a pickle would import, found by reading its opcodes (pickletools), never by
unpickling: so a refusal can name what the file would have called (e.g. posix.system), even for
hand-written pickles that torch's own scanner gives up on."""

from __future__ import annotations

import _compat_pickle
import pickletools
import zipfile
from pathlib import Path

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def globals_in(data: bytes) -> list[str]:
    """module.name of every GLOBAL, INST and STACK_GLOBAL, in order; stops quietly where the
    opcode stream is malformed (what was found up to there is returned)."""
    found: list[str] = []
    recent: list[str] = []  # the strings pushed so far, for STACK_GLOBAL
    memo: dict[int, str] = {}  # memo slots holding strings
    memo_size = 0
    top_is_string = False
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(_python3_name(*str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL" and len(recent) >= 2:
                found.append(_python3_name(recent[-2], recent[-1]))
            elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                slot = memo_size if name == "MEMOIZE" else int(arg)
                memo_size = max(memo_size, slot + 1)
                if top_is_string:
                    memo[slot] = recent[-1]
                continue  # the top of the stack is unchanged
            elif name in ("GET", "BINGET", "LONG_BINGET") and int(arg) in memo:
                recent.append(memo[int(arg)])
                top_is_string = True
                continue
            top_is_string = name in _STRINGS
            if top_is_string:
                recent.append(arg if isinstance(arg, str) else str(arg))
    except Exception:  # noqa: BLE001 - a truncated or corrupt stream: report what was seen
        pass
    return list(dict.fromkeys(found))


def _python3_name(module: str, name: str) -> str:
    """What the unpickler imports for a protocol-2 name (__builtin__.eval is builtins.eval)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def globals_in_torch_zip(path: Path) -> list[str]:
    """The globals of every pickle (data.pkl, and any other .pkl) inside a torch zip checkpoint."""
    found: list[str] = []
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for info in z.infolist():
                if info.filename.endswith(".pkl"):
                    found += globals_in(_member(z, f, info))
    except (OSError, zipfile.BadZipFile):
        return []
    return list(dict.fromkeys(found))


def _member(z: zipfile.ZipFile, f, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes as torch reads them: a stored member straight from the file, without the CRC
    check zipfile makes (torch makes none, so a pickle with a wrong CRC still loads and must still be
    scanned; differential fuzzing found one that was not)."""
    if info.compress_type != zipfile.ZIP_STORED:
        try:
            return z.read(info)
        except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError):
            return b""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return b""
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    f.seek(info.header_offset + 30 + name_len + extra_len)
    return f.read(info.file_size)
