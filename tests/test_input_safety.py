"""A run never writes, replaces or deletes an input, and --force replaces only what weightport wrote;
SIGTERM and SIGHUP leave nothing partial; added files break a manifest; FIFOs, devices and index
entries that leave the checkpoint are refused before anything is opened; wrong JSON types and
non-finite numbers are one line; NaN and Inf meet float16 only when asked (issue 19, items 1-3, 5-8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightport
from conftest import build_hf, run_cli, tree_digest
from test_lora_peft import make_adapter

TIMEOUT = 120  # a FIFO that is opened blocks forever: a hang fails the test instead


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return build_hf("llama3", tmp_path_factory.mktemp("safety") / "hf")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, hf):
    out = tmp_path_factory.mktemp("safety-sharded") / "hf"
    weightport.convert(hf, out, "hf", max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def copy_dir(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def one_line_error(proc, expected: str | None = None, startswith: str | None = None) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    if expected is not None:
        assert line == f"weightport: error: {expected}"
    if startswith is not None:
        assert line.startswith(f"weightport: error: {startswith}"), line
    return line


def cli(*args, **kw):
    return run_cli(*args, timeout=TIMEOUT, **kw)


# -- 1. every input is protected like the source ------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory, hf):
    return make_adapter(hf, tmp_path_factory.mktemp("safety-adapter") / "adapter")


def test_output_is_the_adapter(hf, adapter):
    before = tree_digest(adapter)
    proc = cli("convert", hf, adapter, "--to", "litgpt", "--merge-lora", adapter, "--force")
    one_line_error(proc, f"{adapter}: is, contains or lies inside the input {adapter} (--merge-lora); choose "
                         "another output")
    assert tree_digest(adapter) == before
    proc = cli("convert", hf, adapter, "--to", "litgpt", "--merge-lora", adapter, "--delete-existing")
    one_line_error(proc, startswith=f"{adapter}: is, contains or lies inside the input")
    assert tree_digest(adapter) == before


def test_output_containing_or_inside_the_adapter(hf, adapter, tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    copy_dir(adapter, outer / "adapter")
    (outer / "weightport-manifest.json").write_text('{"files": {}}')  # looks like ours: still refused
    inner = outer / "adapter"
    before = tree_digest(outer)
    for out in (outer, inner / "sub", tmp_path / "outer" / "x" / ".." / "adapter"):
        proc = cli("convert", hf, out, "--to", "hf", "--merge-lora", inner, "--force")
        one_line_error(proc, startswith=f"{out}: is, contains or lies inside the input {inner} (--merge-lora)")
    assert tree_digest(outer) == before


def test_output_through_a_symlink_to_an_input(hf, adapter, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(adapter)
    before = tree_digest(adapter)
    proc = cli("convert", hf, link, "--to", "hf", "--merge-lora", adapter, "--force")
    one_line_error(proc, startswith=f"{link}: is, contains or lies inside the input {adapter} (--merge-lora)")
    src_link = tmp_path / "src-link"
    src_link.symlink_to(hf)
    proc = cli("convert", src_link, hf / "out", "--to", "hf")
    one_line_error(proc, startswith=f"{hf / 'out'}: is, contains or lies inside the input {src_link} (SRC)")
    assert tree_digest(adapter) == before


@pytest.mark.parametrize("flag", ["--llm", "--visual-encoder"])
def test_output_is_a_base_part(hf, tmp_path, flag):
    part = copy_dir(hf, tmp_path / "part")
    before = tree_digest(part)
    proc = cli("convert", hf, part, "--to", "hf", flag, part, "--force")
    one_line_error(proc, f"{part}: is, contains or lies inside the input {part} ({flag}); choose another output")
    assert tree_digest(part) == before


@pytest.mark.parametrize("flag", ["--text", "--vision"])
def test_build_output_is_a_part(hf, tmp_path, flag):
    part = copy_dir(hf, tmp_path / "part")
    other = tmp_path / "other"
    other.mkdir()
    parts = {"--text": other, "--vision": other, flag: part}
    before = tree_digest(part)
    proc = cli("build", "idefics3", part, "--text", parts["--text"], "--vision", parts["--vision"], "--force")
    one_line_error(proc, f"{part}: is, contains or lies inside the input {part} ({flag}); choose another output")
    assert tree_digest(part) == before


def test_verify_report_never_lands_on_an_input(hf, tmp_path):
    b = tmp_path / "b"
    weightport.convert(hf, b, "litgpt")
    before_a, before_b = tree_digest(hf), tree_digest(b)
    for report in (hf / "config.json", b / "report.json", hf / "model.safetensors"):
        proc = cli("verify", hf, b, "--tensors-only", "--report", report)
        one_line_error(proc, startswith=f"{report}: is, contains or lies inside the input")
    assert tree_digest(hf) == before_a and tree_digest(b) == before_b
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    proc = cli("verify", hf, b, "--tensors-only", "--report", mine)
    one_line_error(proc, f"{mine}: exists and is not a report weightport wrote; not overwritten (--report: choose "
                         "another file or remove it)")
    assert mine.read_text() == '{"mine": true}'
    report = tmp_path / "report.json"
    for _ in range(2):  # an earlier report of ours is replaced
        proc = cli("verify", hf, b, "--tensors-only", "--report", report)
        assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["tool"] == "weightport"


def test_eval_captions_report_never_lands_on_its_model(hf):
    before = tree_digest(hf)
    proc = cli("eval-captions", hf, "--report", hf / "config.json", "--samples", "1")
    one_line_error(proc, startswith=f"{hf / 'config.json'}: is, contains or lies inside the input {hf} (MODEL)")
    assert tree_digest(hf) == before


# -- 2. --force replaces only what weightport wrote ---------------------------------------------

def test_force_refuses_a_directory_of_other_files(hf, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years")
    (out / "sub" / "notes.md").write_text("notes")
    proc = cli("convert", hf, out, "--to", "litgpt", "--force")
    one_line_error(proc, f"{out}: holds 2 file(s) that no weightport manifest in it lists (sub/notes.md, thesis.txt); "
                         "not replaced (pass --delete-existing to delete it anyway)")
    assert (out / "thesis.txt").read_text() == "four years" and (out / "sub" / "notes.md").read_text() == "notes"
    with pytest.raises(weightport.WeightportError, match="not replaced"):
        weightport.convert(hf, out, "litgpt", force=True)
    assert run_cli("convert", hf, out, "--to", "litgpt", "--delete-existing", "-q").returncode == 0
    assert not (out / "thesis.txt").exists() and (out / "lit_model.pth").is_file()


def test_force_replaces_an_empty_directory_and_its_own_output(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert cli("convert", hf, out, "--to", "litgpt", "--force", "-q").returncode == 0
    assert cli("convert", hf, out, "--to", "hf", "--force", "-q").returncode == 0
    assert (out / "model.safetensors").is_file() and not (out / "lit_model.pth").exists()


def test_force_refuses_its_own_output_with_a_file_added(hf, tmp_path):
    out = tmp_path / "out"
    weightport.convert(hf, out, "litgpt")
    (out / "evil.py").write_text("print('hi')")
    (out / "mine.txt").write_text("mine")
    proc = cli("convert", hf, out, "--to", "litgpt", "--force")
    one_line_error(proc, f"{out}: holds 2 file(s) that no weightport manifest in it lists (evil.py, mine.txt); not "
                         "replaced (pass --delete-existing to delete it anyway)")
    assert (out / "mine.txt").read_text() == "mine"


def test_force_refuses_a_no_manifest_output(hf, tmp_path):
    """Without a manifest nothing says weightport wrote it: replacing needs the explicit flag."""
    out = tmp_path / "out"
    weightport.convert(hf, out, "litgpt", manifest=False)
    proc = cli("convert", hf, out, "--to", "litgpt", "--force")
    one_line_error(proc, startswith=f"{out}: holds ")
    assert cli("convert", hf, out, "--to", "litgpt", "--delete-existing", "-q").returncode == 0


def test_plain_file_and_symlink_as_out(hf, tmp_path):
    f = tmp_path / "out"
    f.write_text("a file")
    for flags in ([], ["--force"]):
        proc = cli("convert", hf, f, "--to", "litgpt", *flags)
        assert proc.returncode == 1 and f.read_text() == "a file"
    one_line_error(proc, f"{f}: is a file, not a directory weightport wrote; not replaced (pass --delete-existing "
                         "to delete it anyway)")
    assert cli("convert", hf, f, "--to", "litgpt", "--delete-existing", "-q").returncode == 0
    assert (f / "lit_model.pth").is_file()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    one_line_error(cli("convert", hf, link, "--to", "litgpt", "--force"),
                   f"{link}: is a file, not a directory weightport wrote; not replaced (pass --delete-existing to "
                   "delete it anyway)")
    # the link is replaced, never what it points to
    assert cli("convert", hf, link, "--to", "litgpt", "--delete-existing", "-q").returncode == 0
    assert not link.is_symlink() and (link / "lit_model.pth").is_file()
    assert (target / "keep.txt").read_text() == "keep"


def test_peft_export_can_be_replaced_with_force(hf, litgpt_peer, tmp_path):
    from test_lora_litgpt import make_lora

    weightport.convert(hf, tmp_path / "lit", "litgpt")
    src = make_lora(litgpt_peer, tmp_path / "lit", tmp_path / "lora", "query,value")
    out = tmp_path / "peft"
    for _ in range(2):
        proc = cli("convert", src, out, "--to", "peft", "--force")
        assert proc.returncode == 0, proc.stderr
    check = cli("verify", "--manifest", out)
    assert check.returncode == 0 and "verdict:  intact" in check.stdout, check.stdout + check.stderr


def test_mindformers_command_protects_its_inputs(hf, tmp_path):
    """`weightport mindformers` (MindFormers' own flags) follows the same rules: --output_path may not lie
    in --input_path or --config's directory, and --force replaces only a MindSpore checkpoint."""
    src = copy_dir(hf, tmp_path / "hf")
    before = tree_digest(src)
    inside = src / "model.ckpt"
    one_line_error(cli("mindformers", "--model", "llama", "--input_path", src, "--output_path", inside, "--force"),
                   f"{inside}: is, contains or lies inside the input {src} (--input_path); choose another output")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    weightport.convert(src, tmp_path / "ms-ref", "mindspore")
    (cfg_dir / "llama.yaml").write_bytes((tmp_path / "ms-ref" / "mindformers.yaml").read_bytes())
    cfg = cfg_dir / "llama.yaml"
    one_line_error(cli("mindformers", "--model", "llama", "--input_path", src, "--config", cfg, "--output_path", cfg,
                       "--delete-existing"),
                   f"{cfg}: is, contains or lies inside the input {cfg} (--config); choose another output")
    proc = cli("mindformers", "--model", "llama", "--reversed", "--input_path", src, "--config", cfg,
               "--output_path", cfg_dir, "--delete-existing")
    one_line_error(proc, f"{cfg_dir}: is, contains or lies inside the input {cfg} (--config); choose another output")
    assert sorted(p.name for p in cfg_dir.iterdir()) == ["llama.yaml"]
    # a yaml is read alone: writing beside it is allowed, as MindFormers' own scripts are used
    assert cli("mindformers", "--model", "llama", "--input_path", src, "--config", cfg,
               "--output_path", cfg_dir / "out.ckpt").returncode == 0
    assert cfg.read_bytes() == (tmp_path / "ms-ref" / "mindformers.yaml").read_bytes()

    out = tmp_path / "ms" / "model.ckpt"
    out.parent.mkdir()
    out.write_text("my notes")
    for flags in ([], ["--force"]):
        proc = cli("mindformers", "--model", "llama", "--input_path", src, "--output_path", out, *flags)
        assert proc.returncode == 1 and out.read_text() == "my notes"
    one_line_error(proc, f"{out}: is not a MindSpore checkpoint; not replaced (pass --delete-existing to replace "
                         "it anyway)")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.ckpt"]
    assert cli("mindformers", "--model", "llama", "--input_path", src, "--output_path", out,
               "--delete-existing").returncode == 0
    first = out.read_bytes()
    assert first[:8] != b"my notes"
    assert cli("mindformers", "--model", "llama", "--input_path", src, "--output_path", out, "--force",
               "--dtype", "fp16").returncode == 0  # a checkpoint: --force is enough
    assert out.read_bytes() != first
    assert tree_digest(src) == before

    # reversed: a directory of the user's files is not replaced with --force, and the .ckpt is an input
    back = tmp_path / "back"
    back.mkdir()
    (back / "thesis.txt").write_text("years of work")
    proc = cli("mindformers", "--model", "llama", "--reversed", "--input_path", out, "--output_path", back, "--force")
    one_line_error(proc, f"{back}: holds 1 file(s) that no weightport manifest in it lists (thesis.txt); not "
                         "replaced (pass --delete-existing to delete it anyway)")
    assert (back / "thesis.txt").read_text() == "years of work"
    one_line_error(cli("mindformers", "--model", "llama", "--reversed", "--input_path", out, "--output_path",
                       out.parent / "hf"),
                   f"{out.parent / 'hf'}: is, contains or lies inside the input {out} (--input_path); choose another "
                   "output")


# -- 3. SIGTERM and SIGHUP are Ctrl-C ---------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    return build_hf("llama3", root / "hf", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                    num_hidden_layers=4, vocab_size=64000)


@pytest.mark.parametrize("sig,code,line", [
    (signal.SIGTERM, 143, "weightport: stopped by SIGTERM; no output was left"),
    (signal.SIGHUP, 129, "weightport: stopped by SIGHUP; no output was left"),
    (signal.SIGINT, 130, "weightport: interrupted; no output was left"),
])
def test_signals_leave_nothing(big, tmp_path, sig, code, line):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "weightport", "convert", str(big), str(out), "--to", "litgpt"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    partial = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".out.weightport-partial-")]  # noqa: E731
    while not partial() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert partial(), "the conversion ended before it could be signalled"
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- 5. files added after writing break the manifest ------------------------------------------------

@pytest.mark.parametrize("plant", ["evil.py", "model-00009-of-00009.safetensors", "tokenizer.json", "dir/",
                                   "link"])
def test_manifest_reports_added_files(hf, tmp_path, plant):
    out = tmp_path / "out"
    weightport.convert(hf, out, "hf")
    assert cli("verify", "--manifest", out).returncode == 0
    if plant == "dir/":
        (out / "dir").mkdir()
    elif plant == "link":
        (out / "link").symlink_to("/etc/hostname")
    else:
        (out / plant).write_text("planted")
    proc = cli("verify", "--manifest", out)
    assert proc.returncode == 1
    assert f"added file:     {plant.rstrip('/')}" in proc.stdout.splitlines()
    assert proc.stdout.strip().endswith("verdict:  CHANGED since it was written")
    assert "1 added" in proc.stdout


# -- 6. FIFOs, devices and index entries leaving the directory ---------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
def test_fifo_in_a_checkpoint_is_refused_without_hanging(hf, tmp_path, name):
    src = copy_dir(hf, tmp_path / "src")
    (src / name).unlink(missing_ok=True)
    os.mkfifo(src / name)
    proc = cli("convert", src, tmp_path / "out", "--to", "litgpt")
    one_line_error(proc, f"{src / name}: is a FIFO (named pipe), not a regular file; not opened (SRC {src})")
    assert not (tmp_path / "out").exists()


def test_device_as_a_tokenizer_file_is_refused(hf, tmp_path):
    src = copy_dir(hf, tmp_path / "src")
    (src / "tokenizer.json").symlink_to("/dev/zero")
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "litgpt"),
                   f"{src / 'tokenizer.json'}: is a character device, not a regular file; not opened (SRC {src})")


def test_fifo_in_an_adapter_is_refused(hf, adapter, tmp_path):
    bad = copy_dir(adapter, tmp_path / "adapter")
    (bad / "adapter_model.safetensors").unlink()
    os.mkfifo(bad / "adapter_model.safetensors")
    one_line_error(cli("convert", hf, tmp_path / "out", "--to", "hf", "--merge-lora", bad),
                   f"{bad / 'adapter_model.safetensors'}: is a FIFO (named pipe), not a regular file; not opened "
                   f"(--merge-lora {bad})")


def test_fifo_read_through_the_api_is_refused(hf, tmp_path):
    from weightport.hf_config import load_json
    from weightport.io import open_files

    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    for read in (lambda: open_files([fifo]), lambda: load_json(fifo)):
        with pytest.raises(weightport.WeightportError, match="is a FIFO"):
            read()


def _with_index(sharded, tmp_path, edit) -> tuple:
    src = copy_dir(sharded, tmp_path / "src")
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"], src)
    index.write_text(json.dumps(data))
    return src, index


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entries_must_stay_in_the_directory(sharded, tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    if how == "symlink":  # a FIFO behind a symlink in the directory is refused as a FIFO, before this
        save_file({"lm_head.weight": torch.zeros(2)}, outside / "x.safetensors")
    else:
        os.mkfifo(outside / "x.safetensors")  # opened, it would hang the run: it must not be reached
    name = {"dotdot": "../outside/x.safetensors", "absolute": str(outside / "x.safetensors"),
            "symlink": "link.safetensors"}[how]

    def edit(weight_map, src):
        weight_map["lm_head.weight"] = name
        if how == "symlink":
            (src / name).symlink_to(outside / "x.safetensors")

    src, index = _with_index(sharded, tmp_path, edit)
    line = one_line_error(cli("convert", src, tmp_path / "out", "--to", "litgpt"),
                          startswith=f"{index}: names {name!r}, ")
    assert line.endswith(f"outside {src}; not opened")


def test_hub_cache_blobs_are_inside_their_snapshot(sharded, tmp_path):
    """The Hub cache stores a snapshot's files as symlinks into ../../blobs: those are its own."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(sharded.iterdir())):
        if f.is_file():
            (blobs / f"blob{i}").write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    weightport.convert(snap, tmp_path / "out", "hf")
    want = {}
    for shard in sharded.glob("*.safetensors"):
        want.update(load_file(shard))
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- 7. wrong JSON types and non-finite numbers --------------------------------------------------------

@pytest.mark.parametrize("value,shown", [(7, "7"), (None, "None"), (["a"], "['a']"), ({"f": 1}, "{'f': 1}")])
def test_index_value_of_the_wrong_type(sharded, tmp_path, value, shown):
    def edit(weight_map, src):
        weight_map["lm_head.weight"] = value

    src, index = _with_index(sharded, tmp_path, edit)
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "litgpt"),
                   f"{index}: weight_map gives tensor lm_head.weight the shard {shown}, not a file name")


@pytest.mark.parametrize("text,key", [
    ('"rms_norm_eps": NaN', "rms_norm_eps"), ('"rope_theta": Infinity', "rope_theta"),
    ('"initializer_range": -Infinity', "initializer_range"), ('"rms_norm_eps": 1e999', "rms_norm_eps"),
    ('"rope_scaling": {"rope_type": "llama3", "factor": NaN}', "rope_scaling.factor"),
])
def test_non_finite_numbers_in_config_are_refused(hf, tmp_path, text, key):
    src = copy_dir(hf, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop(key.split(".")[0], None)
    (src / "config.json").write_text(json.dumps(cfg)[:-1] + ", " + text + "}")
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "litgpt"),
                   f"{src / 'config.json'}: {key} is not a finite number (NaN or infinity); refused")


# -- 8. NaN and Inf meet float16 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_inf(tmp_path_factory, hf):
    root = tmp_path_factory.mktemp("nan")
    out = {}
    for kind, value in (("nan", float("nan")), ("inf", float("inf"))):
        src = copy_dir(hf, root / kind)
        tensors = load_file(src / "model.safetensors")
        tensors["model.layers.0.mlp.up_proj.weight"][0, 3] = value
        save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
        out[kind] = src
    return out


def test_nan_refused_unless_allowed(nan_inf, tmp_path):
    src = nan_inf["nan"]
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "hf", "--dtype", "float16"),
                   "tensor model.layers.0.mlp.up_proj.weight: the source holds NaN values; pass --allow-nan to cast "
                   "it to float16 anyway (they stay NaN)")
    assert not (tmp_path / "out").exists()
    assert cli("convert", src, tmp_path / "out", "--to", "hf", "--dtype", "float16", "--allow-nan", "-q").returncode == 0
    w = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float16 and torch.isnan(w[0, 3]) and int(torch.isnan(w).sum()) == 1
    # casts that cannot lose it, and no cast at all, carry it without a word
    assert cli("convert", src, tmp_path / "bf16", "--to", "hf", "--dtype", "bfloat16", "-q").returncode == 0


def test_inf_message_says_the_source_holds_it(nan_inf, tmp_path):
    one_line_error(cli("convert", nan_inf["inf"], tmp_path / "out", "--to", "litgpt", "--dtype", "float16"),
                   "tensor transformer.h.0.mlp.fc_2.weight: the source holds infinite values; pass --allow-overflow "
                   "to cast it to float16 anyway (they stay infinite)")
    assert cli("convert", nan_inf["inf"], tmp_path / "out", "--to", "litgpt", "--dtype", "float16",
               "--allow-overflow", "-q").returncode == 0


def test_key_given_twice_in_config_or_index_is_refused(hf, sharded, tmp_path):
    src = copy_dir(hf, tmp_path / "src")
    raw = (src / "config.json").read_text().rstrip()
    (src / "config.json").write_text(raw[:-1] + ', "num_hidden_layers": 1}')
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "litgpt"),
                   f"{src / 'config.json'}: key 'num_hidden_layers' is given twice; refused")
    src2 = copy_dir(sharded, tmp_path / "src2")
    index = src2 / "model.safetensors.index.json"
    raw = index.read_text().rstrip()
    close = raw[:-1].rstrip().rindex("}")  # the weight_map's closing brace
    index.write_text(raw[:close] + ', "lm_head.weight": "model-00001-of-00002.safetensors"}}')
    one_line_error(cli("convert", src2, tmp_path / "out", "--to", "litgpt"),
                   f"{index}: key 'lm_head.weight' is given twice; refused")


def test_non_finite_number_in_a_litgpt_yaml_is_refused(hf, tmp_path):
    lit = tmp_path / "lit"
    weightport.convert(hf, lit, "litgpt")
    yaml_path = lit / "model_config.yaml"
    text = yaml_path.read_text()
    assert "norm_eps:" in text
    yaml_path.write_text("\n".join("norm_eps: .nan" if line.startswith("norm_eps:") else line
                                   for line in text.splitlines()) + "\n")
    one_line_error(cli("convert", lit, tmp_path / "out", "--to", "hf"),
                   f"{yaml_path}: norm_eps is not a finite number (NaN or infinity); refused")
