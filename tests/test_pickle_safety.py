"""A gallery of malicious pickles: every one is refused with one line naming the global it would
call, or (globals of the packages training checkpoints pickle bookkeeping from) bound to an inert
stand-in; in no case does the payload run. Each payload would create a marker file if it ran."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_hf, run_cli


def _reduce(fn, *args):
    class Payload:
        def __reduce__(self):
            return (fn, args)
    return Payload()


def _raw_torch_zip(path, pkl: bytes):
    """A torch zip whose data.pkl is `pkl`, hand-written opcodes torch.save would never emit."""
    torch.save({"w": torch.zeros(2)}, path)
    _replace_pkl(path, pkl)


def _replace_pkl(path, pkl: bytes):
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            z.writestr(info, pkl if info.filename.endswith("data.pkl") else data)


def _arg(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


# name -> (how to write pytorch_model.bin with a payload touching `marker`, the global the refusal names)
def _pickled(payload_of):
    def write(path, sd, marker):
        torch.save({**sd, "model.norm.weight": payload_of(marker)}, path)
    return write


def _nested(path, sd, marker):
    torch.save({**sd, "extra": [{"deep": (1, [{"deeper": _reduce(os.system, f"touch {marker}")}])}]}, path)


def _raw(kind):
    def write(path, sd, marker):
        cmd = f"touch {marker}"
        pkl = {
            "global": b"\x80\x02cposix\nsystem\n" + _arg(cmd) + b"\x85R.",
            "inst": b"(S'" + cmd.encode() + b"'\niposix\nsystem\n.",
            "obj": b"\x80\x02(cposix\nsystem\n" + _arg(cmd) + b"o.",
            "stack_global": b"\x80\x04\x8c\x05posix\x8c\x06system\x93" + b"\x8c" + bytes([len(cmd)]) + cmd.encode()
                            + b"\x85R.",
            # builtins.getattr is a stand-in; what it would be applied to needs builtins.__import__
            "getattr_chain": (b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR("
                              + _arg(cmd) + b"tR."),
        }[kind]
        _raw_torch_zip(path, pkl)
    return write


GALLERY = {
    "os.system via __reduce__": (_pickled(lambda m: _reduce(os.system, f"touch {m}")), "posix.system"),
    "builtins.eval": (_pickled(lambda m: _reduce(builtins.eval, f"open({str(m)!r}, 'w')")), "builtins.eval"),
    "builtins.exec": (_pickled(lambda m: _reduce(builtins.exec, f"open({str(m)!r}, 'w')")), "builtins.exec"),
    "subprocess.Popen": (_pickled(lambda m: _reduce(subprocess.Popen, ["touch", str(m)])), "subprocess.Popen"),
    "shutil.copy": (_pickled(lambda m: _reduce(shutil.copyfile, "/etc/hostname", str(m))), "shutil.copyfile"),
    "nested deep in the state dict": (_nested, "posix.system"),
    "raw GLOBAL + REDUCE": (_raw("global"), "posix.system"),
    "raw INST": (_raw("inst"), "posix.system"),
    "raw OBJ": (_raw("obj"), "posix.system"),
    "raw STACK_GLOBAL (protocol 4)": (_raw("stack_global"), "posix.system"),
    "getattr(__import__('os'), 'system')": (_raw("getattr_chain"), "builtins.__import__"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    src = build_hf("llama3", tmp_path_factory.mktemp("pickles") / "hf")
    return src, load_file(src / "model.safetensors")


@pytest.mark.parametrize("case", list(GALLERY))
def test_malicious_pickles_are_refused_naming_the_global(base, tmp_path, case):
    src, sd = base
    write, named = GALLERY[case]
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    shutil.copy(src / "config.json", ckpt / "config.json")
    marker = tmp_path / "pwned"
    write(ckpt / "pytorch_model.bin", sd, marker)
    proc = run_cli("convert", ckpt, tmp_path / "out", "--to", "litgpt")
    assert proc.returncode == 1
    assert proc.stderr == (f"weightport: error: {ckpt / 'pytorch_model.bin'}: refused, the pickle is not weights-only "
                           f"and would run code (it would call {named})\n")
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out").exists()


def test_every_pickle_reader_refuses(base, tmp_path):
    """The same payload through each way a pickle enters: a LitGPT checkpoint, a PEFT adapter's
    .bin (--merge-lora) and an inspect of a Hugging Face .bin."""
    src, sd = base
    marker = tmp_path / "pwned"
    evil = _reduce(os.system, f"touch {marker}")

    lit = tmp_path / "lit"
    assert run_cli("convert", src, lit, "--to", "litgpt").returncode == 0
    torch.save({**torch.load(lit / "lit_model.pth", weights_only=True), "x": evil}, lit / "lit_model.pth")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2, '
                                                 '"target_modules": ["q_proj"]}')
    torch.save({"x": evil}, adapter / "adapter_model.bin")
    hf_bin = tmp_path / "hf-bin"
    hf_bin.mkdir()
    shutil.copy(src / "config.json", hf_bin / "config.json")
    torch.save({**sd, "x": evil}, hf_bin / "pytorch_model.bin")

    for args, culprit in ((("convert", lit, tmp_path / "o1", "--to", "hf"), lit / "lit_model.pth"),
                          (("convert", src, tmp_path / "o2", "--to", "hf", "--merge-lora", adapter),
                           adapter / "adapter_model.bin"),
                          (("inspect", hf_bin), hf_bin / "pytorch_model.bin")):
        proc = run_cli(*args)
        assert proc.returncode == 1, args
        assert proc.stderr == (f"weightport: error: {culprit}: refused, the pickle is not weights-only and would run "
                               "code (it would call posix.system)\n")
    assert not marker.exists()


def test_a_code_running_global_of_a_stand_in_package_is_inert(base, tmp_path):
    """numpy's runstring executes a string; as a global of numpy (a package training checkpoints
    pickle bookkeeping from) it is bound to an inert stand-in that only records its arguments, so
    the checkpoint reads and nothing runs."""
    src, sd = base
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(src / "config.json", ckpt / "config.json")
    torch.save(sd, ckpt / "pytorch_model.bin")
    with zipfile.ZipFile(ckpt / "pytorch_model.bin") as z:
        original = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert original.endswith(b"u.")  # the state dict's last SETITEMS, then STOP
    call = (b"cnumpy.testing._private.utils\nrunstring\n" + _arg(f"open({str(marker)!r}, 'w')") + b"}\x86R")
    _replace_pkl(ckpt / "pytorch_model.bin", original[:-1] + _arg("meta") + call + b"s.")
    proc = run_cli("inspect", ckpt)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "the payload ran"
