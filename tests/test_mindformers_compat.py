"""`weightport mindformers`: each family's own flags mean what its MindFormers converter makes of them.

What the converters do was read from MindFormers' sources (v1.3.2 for research/baichuan2, internlm
and qwen; v1.5.0 for research/internlm2, research/qwenvl and models/cogvlm2) and run by hand on
these inputs (docs/mindspore.md, "Run against MindFormers' own converters"); these tests pin the
command line to it. Names only (weightport's reader): the values are checked per family in
tests/test_mindspore_*.py and against MindFormers' cogvlm2 converter in tests/test_mindformers_peer.py.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import ckpt_names
from test_mindspore_baichuan import CONFIGS as BAICHUAN
from test_mindspore_baichuan import build as build_baichuan
from test_mindspore_cogvlm2 import build_cogvlm2
from test_mindspore_internlm import INTERNLM, INTERNLM2, build, internlm2_state_dict, internlm_state_dict
from test_mindspore_qwen import build_qwen, build_qwen_vl


@pytest.fixture(autouse=True)
def _capsys(capsys):
    global _CAP
    _CAP = capsys


def run_cli(*args) -> subprocess.CompletedProcess:
    """`weightport ARGS` in this process (a subprocess per run would cost most of these tests' time)."""
    from weightport.cli import main

    _CAP.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # --help
        code = e.code
    out = _CAP.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def _mf(tmp_path, name: str, *args) -> tuple[object, list[str]]:
    """Runs `weightport mindformers ARGS --output_path tmp/NAME.ckpt`; (process, names written)."""
    out = tmp_path / name / "out.ckpt"
    out.parent.mkdir()
    proc = run_cli("mindformers", *args, "--output_path", out)
    return proc, (ckpt_names(out) if proc.returncode == 0 else [])


def _notes(proc) -> list[str]:
    return [l for l in proc.stdout.splitlines() if l.startswith("note: ")]


def test_qwenvl_takes_use_qkv_concat_and_ignores_qkv_concat(tmp_path):
    """research/qwenvl/convert_weight.py reads use_qkv_concat (default False) and no qkv_concat."""
    hf = build_qwen_vl(tmp_path / "hf")
    fused, split = "llm_model.transformer.layers.0.attention.w.weight", "llm_model.transformer.layers.0.attention.wq.weight"

    proc, names = _mf(tmp_path, "default", "--model", "qwenvl", "--input_path", hf)
    assert proc.returncode == 0, proc.stderr
    assert split in names and fused not in names
    # the ViT has 4 heads here; MindFormers would assume 16 unless told
    assert _notes(proc) == ["note: the ViT's in_proj is split per the config's 4 heads (MindFormers' qwenvl "
                            "converter assumes 16 unless --vit_num_head says otherwise)"]

    proc, names = _mf(tmp_path, "use", "--model", "qwenvl", "--input_path", hf, "--use_qkv_concat", "True",
                      "--vit_num_head", "4")
    assert proc.returncode == 0, proc.stderr
    assert fused in names and split not in names and not _notes(proc)
    assert "llm_model.transformer.layers.0.attention.w.bias" in names

    proc, names = _mf(tmp_path, "use-false", "--model", "qwenvl", "--input_path", hf, "--use_qkv_concat", "False",
                      "--vit_num_head", "4")
    assert proc.returncode == 0 and split in names

    proc, names = _mf(tmp_path, "qkv", "--model", "qwenvl", "--input_path", hf, "--qkv_concat", "True",
                      "--vit_num_head", "4")
    assert proc.returncode == 0, proc.stderr
    assert split in names and fused not in names  # what MindFormers writes for it
    assert _notes(proc) == ["note: --qkv_concat ignored, as MindFormers' qwenvl converter ignores it "
                            "(--use_qkv_concat True writes its fused layout)"]

    # reversed: the names say which; both come back
    for case in ("default", "use"):
        rev = run_cli("mindformers", "--model", "qwenvl", "--reversed", "--input_path", tmp_path / case / "out.ckpt",
                      "--output_path", tmp_path / f"{case}-back")
        assert rev.returncode == 0, rev.stderr


@pytest.mark.parametrize("args,message", [
    (["--vit_num_head", "16"], "--vit_num_head 16: the config's vision encoder has 4 heads"),
    (["--enable_emb_opt", "True", "--emb_strategy", "8"],
     "--enable_emb_opt True: MindFormers pads the embedding and lm_head rows to a multiple of 512 x "
     "--emb_strategy; weightport writes no padded vocabulary"),
])
def test_qwenvl_refuses_what_it_would_write_differently(tmp_path, args, message):
    hf = build_qwen_vl(tmp_path / "hf")
    proc, _ = _mf(tmp_path, "x", "--model", "qwenvl", "--input_path", hf, *args)
    assert (proc.returncode, proc.stderr) == (1, f"weightport: error: {message}\n")
    assert not (tmp_path / "x" / "out.ckpt").exists()


def test_qwen_and_qwenvl_keys_take_only_their_own_checkpoints(tmp_path):
    qwen, vl = build_qwen(tmp_path / "qwen"), build_qwen_vl(tmp_path / "vl")
    proc, _ = _mf(tmp_path, "a", "--model", "qwenvl", "--input_path", qwen)
    assert proc.stderr == (f"weightport: error: --model qwenvl: {qwen} is a Qwen (1) model without a vision "
                           "encoder (use --model qwen)\n")
    proc, _ = _mf(tmp_path, "b", "--model", "qwen", "--input_path", vl)
    assert proc.stderr == f"weightport: error: --model qwen: {vl} is a Qwen-VL model (use --model qwenvl)\n"


def test_internlm2_default_is_fused_in_both_commands(tmp_path):
    """research/internlm2's converter defaults to qkv_concat True (so do v1.3.2's command line and the
    shipped yamls); `convert --to mindspore` and `mindformers --model internlm2` write the same file."""
    hf = build(tmp_path / "hf", internlm2_state_dict(), INTERNLM2)
    proc, names = _mf(tmp_path, "mf", "--model", "internlm2", "--input_path", hf)
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.attention.w.weight" in names and "model.layers.0.attention.wq.weight" not in names
    conv = run_cli("convert", hf, tmp_path / "conv", "--to", "mindspore")
    assert conv.returncode == 0, conv.stderr
    assert (tmp_path / "conv" / "model.ckpt").read_bytes() == (tmp_path / "mf" / "out.ckpt").read_bytes()

    proc, names = _mf(tmp_path, "true", "--model", "internlm2", "--input_path", hf, "--qkv_concat", "True")
    assert (tmp_path / "true" / "out.ckpt").read_bytes() == (tmp_path / "mf" / "out.ckpt").read_bytes()
    # v1.5.0's meaning of --qkv_concat False (what its command line writes when the flag is absent)
    proc, names = _mf(tmp_path, "false", "--model", "internlm2", "--input_path", hf, "--qkv_concat", "False")
    assert proc.returncode == 0, proc.stderr
    assert [n for n in names if n.startswith("model.layers.0.attention.")] == [
        f"model.layers.0.attention.w{p}.weight" for p in "qkvo"]
    conv = run_cli("convert", hf, tmp_path / "conv2", "--to", "mindspore", "--layout", "separate")
    assert conv.returncode == 0, conv.stderr
    assert (tmp_path / "conv2" / "model.ckpt").read_bytes() == (tmp_path / "false" / "out.ckpt").read_bytes()

    rev = run_cli("mindformers", "--model", "internlm2", "--reversed", "--qkv_concat", "True",
                  "--input_path", tmp_path / "false" / "out.ckpt", "--output_path", tmp_path / "back")
    assert rev.returncode == 0, rev.stderr
    assert _notes(rev) == ["note: --qkv_concat ignored with --reversed: the .ckpt's names say whether wqkv is fused"]


@pytest.mark.parametrize("model", ["baichuan2", "internlm", "qwen", "cogvlm2"])
def test_qkv_concat_is_ignored_where_the_converter_ignores_it(tmp_path, model):
    """Their converters never read qkv_concat (MindFormers' root script passes it to each as a keyword
    argument): the file is the same as without it, and the summary says the flag was ignored."""
    hf = {"baichuan2": lambda p: build_baichuan(p, BAICHUAN["7b"]),
          "internlm": lambda p: build(p, internlm_state_dict(), INTERNLM),
          "qwen": build_qwen, "cogvlm2": lambda p: build_cogvlm2(p, "video")}[model](tmp_path / "hf")
    plain, names = _mf(tmp_path, "plain", "--model", model, "--input_path", hf)
    assert plain.returncode == 0, plain.stderr
    proc, _ = _mf(tmp_path, "flag", "--model", model, "--input_path", hf, "--qkv_concat", "True")
    assert proc.returncode == 0, proc.stderr
    assert _notes(proc) == [f"note: --qkv_concat ignored, as MindFormers' {model} converter ignores it"]
    assert (tmp_path / "flag" / "out.ckpt").read_bytes() == (tmp_path / "plain" / "out.ckpt").read_bytes()
    assert any(".wq." in n for n in names)
    # a flag of another family's converter: the same
    proc, _ = _mf(tmp_path, "other", "--model", model, "--input_path", hf, "--use_qkv_concat", "True")
    assert _notes(proc) == [f"note: --use_qkv_concat ignored, as MindFormers' {model} converter ignores it"]
    assert (tmp_path / "other" / "out.ckpt").read_bytes() == (tmp_path / "plain" / "out.ckpt").read_bytes()


def test_cogvlm2_flags(tmp_path):
    image = build_cogvlm2(tmp_path / "hf", "image")
    proc, names = _mf(tmp_path, "image", "--model", "cogvlm2", "--input_path", image)
    assert proc.returncode == 0, proc.stderr
    assert _notes(proc) == ["note: converted as --modal image, the checkpoint's (MindFormers' default --modal "
                            "video would rename an image model's weights as its video model's)"]
    proc, _ = _mf(tmp_path, "full", "--model", "cogvlm2", "--input_path", image, "--modal", "image", "--sft", "full")
    assert proc.returncode == 0 and not _notes(proc)
    proc, _ = _mf(tmp_path, "lora", "--model", "cogvlm2", "--input_path", image, "--sft", "lora")
    assert proc.stderr == ("weightport: error: --sft lora: weightport does not write the names of MindFormers' "
                           "CogVLM2 LoRA model (pet_model.lora_model.)\n")


def test_help_says_which_release_each_family_follows():
    proc = run_cli("mindformers", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    from weightport.formats.mindspore.compat import RELEASES

    assert RELEASES == {"baichuan2": "v1.3.2", "internlm": "v1.3.2", "qwen": "v1.3.2",
                        "internlm2": "v1.5.0", "qwenvl": "v1.5.0", "cogvlm2": "v1.5.0"}
    for family, release in RELEASES.items():
        assert f" {family} {release} " in text, family
    assert "--use_qkv_concat BOOL" in text and "--qkv_concat BOOL (True)" in text
    assert "Default fused" in text
