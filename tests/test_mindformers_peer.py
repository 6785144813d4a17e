"""weightport's HF -> MindSpore `.ckpt` against MindFormers' own Llama and CogVLM2 converters.

The peer (tests/peers/mindformers_peer.py) runs `mindformers.models.llama.convert_weight.
convert_pt_to_ms` unmodified on the same Hugging Face directory. Both files are read twice: with
weightport's reader and with the real `mindspore.load_checkpoint`, and must agree name for name,
in shape, dtype and every value. Beyond that, each serialized record (tag, dims, tensor_type,
content) must be the same bytes in both files, and for untied models the whole files are identical:
weightport writes in MindFormers' order (the HF `state_dict()`'s, layer by layer). With tied
embeddings weightport writes lm_head right after the embedding it is tied to, MindFormers last.

Importing transformers and mindspore costs most of a peer run, so every case is converted up
front by one module fixture: one MindFormers process for all conversions, one MindSpore process
for all loads. Each test then checks its own case (and reports its own failure).

CogVLM2 (the end of this file): its converter is in no mindformers wheel after 1.3.2, so the
fixture downloads that wheel with pip (pinned by sha256) and the peer runs
`mindformers/models/cogvlm2/convert_weight.py` from it, unmodified, as MindFormers' root script
calls it; both files are compared through mindspore.load_checkpoint inside the peer.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import weightport
from conftest import build_hf
from weightport.formats.mindspore.ckpt import TORCH_TO_MS, MsCkptFile

# source dtype, weightport's dtype= (None: its default), the peer's --dtype, the tensor_type both write
CASES = {
    "fp32": (torch.float32, None, "fp32", "Float32"),
    "bf16": (torch.float32, "bfloat16", "bf16", "BFloat16"),  # fp32 -> bf16 rounding, on both sides
    "fp16": (torch.float32, "float16", "fp16", "Float16"),
    "bf16-source": (torch.bfloat16, None, None, "BFloat16"),  # neither casts
}
LLAMA = [
    ("llama2", "fp32"),
    ("llama3", "fp32"), ("llama3", "bf16"), ("llama3", "fp16"), ("llama3", "bf16-source"),
    ("llama3.2", "fp32"), ("llama3.2", "bf16"),  # tied embeddings
]
ALL = LLAMA + [("qwen2", "fp32")]


def _weightport_view(path: Path) -> dict[str, tuple[list[int], str, torch.Tensor]]:
    f = MsCkptFile(path)
    try:
        return {n: (list(shape), TORCH_TO_MS[dt], f.load(n)) for n, (shape, dt) in f.entries.items()}
    finally:
        f.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, mindformers_peer, mindspore_peer) -> dict[tuple[str, str], dict]:
    """Every case of ALL: the HF dir, both .ckpt files read by both readers, or how it failed."""
    root = tmp_path_factory.mktemp("mindformers_peer")
    cases, jobs = {}, []
    for model, case in ALL:
        src_dtype, wp_dtype, peer_dtype, _ = CASES[case]
        d = root / f"{model}-{case}"
        c = cases[model, case] = {"hf": build_hf(model, d / "hf", dtype=src_dtype),
                                  "ours": d / "wp" / "model.ckpt", "theirs": d / "mf" / "model.ckpt"}
        try:
            weightport.convert(c["hf"], d / "wp", "mindspore", **({"dtype": wp_dtype} if wp_dtype else {}))
        except Exception:
            c["error"] = "weightport.convert failed:\n" + traceback.format_exc()
        (d / "mf").mkdir()
        jobs.append({"hf_dir": c["hf"], "out_ckpt": c["theirs"], "dtype": peer_dtype})

    peer = mindformers_peer.convert_many(jobs, root)
    for c, r in zip(cases.values(), peer["results"]):
        c["versions"] = {k: peer[k] for k in ("mindformers", "mindspore", "transformers")}
        if "error" in r:
            c["error"] = c.get("error", "") + "\nMindFormers' converter failed:\n" + r["error"]

    ops, where = [], []
    for key, c in cases.items():
        for side in ("ours", "theirs"):
            if c[side].is_file():
                c[f"wp_{side}"] = _weightport_view(c[side])
                ops.append({"op": "load", "path": str(c[side]), "crc_check": False,
                            "out_dir": str(c[side].parent / "ms_npy")})
                where.append((key, side))
    for (key, side), result in zip(where, mindspore_peer(ops, root)):
        c = cases[key]
        if "error" in result:
            c["error"] = c.get("error", "") + f"\nmindspore.load_checkpoint({side}): {result['error']}"
            continue
        assert all(p["kind"] == "tensor" and p["param_name"] == p["name"] for p in result["params"])
        c[f"ms_{side}"] = {p["name"]: (p["shape"], p["dtype"], np.load(p["npy"])) for p in result["params"]}
    return cases


def _records(path: Path) -> list[bytes]:
    """The file's top-level records (`0x0A <varint len> Value`), as bytes; no CRC trailer."""
    data = path.read_bytes()
    end = len(data) - 17 if data[-17:-10] == b"crc_num" else len(data)
    out, i = [], 0
    while i < end:
        assert data[i] == 0x0A, f"{path}: no record at byte {i}"
        j, n, shift = i + 1, 0, 0
        while True:
            n |= (data[j] & 0x7F) << shift
            shift += 7
            j += 1
            if data[j - 1] < 0x80:
                break
        out.append(data[i:j + n])
        i = j + n
    assert i == end, f"{path}: last record runs past the end"
    return out


def _case(converted, model: str, case: str) -> dict:
    c = converted[model, case]
    if "error" in c:
        pytest.fail(c["error"], pytrace=False)
    return c


def _assert_same(ours: dict, theirs: dict, want_dtype: str, reader: str) -> None:
    assert sorted(ours) == sorted(theirs), (
        f"{reader}: only weightport {sorted(set(ours) - set(theirs))}, only MindFormers {sorted(set(theirs) - set(ours))}")
    for name in theirs:
        (s1, d1, v1), (s2, d2, v2) = ours[name], theirs[name]
        assert (s1, d1) == (s2, d2) == (s2, want_dtype), f"{reader}: {name}: weightport {s1} {d1}, MindFormers {s2} {d2}"
        same = torch.equal(v1, v2) if isinstance(v1, torch.Tensor) else np.array_equal(v1, v2)
        assert same, f"{reader}: {name}: values differ"


@pytest.mark.parametrize("model,case", LLAMA)
def test_llama_ckpt_matches_mindformers_converter(converted, model, case):
    c = _case(converted, model, case)
    want = CASES[case][3]
    _assert_same(c["wp_ours"], c["wp_theirs"], want, "weightport reader")
    _assert_same(c["ms_ours"], c["ms_theirs"], want, "mindspore.load_checkpoint")
    assert sorted(_records(c["ours"])) == sorted(_records(c["theirs"])), "same values, different record bytes"
    cfg = json.loads((c["hf"] / "config.json").read_text())
    if not cfg.get("tie_word_embeddings"):
        assert c["ours"].read_bytes() == c["theirs"].read_bytes()

    assert len(c["wp_theirs"]) == 3 + 9 * cfg["num_hidden_layers"], sorted(c["wp_theirs"])  # it wrote it all
    if cfg.get("tie_word_embeddings"):  # absent from model.safetensors; both write it from the embedding
        assert "lm_head.weight" not in load_file(c["hf"] / "model.safetensors")
        assert torch.equal(c["wp_ours"]["lm_head.weight"][2], c["wp_ours"]["model.tok_embeddings.embedding_weight"][2])


def test_qwen2_matches_except_the_qkv_bias_mindformers_llama_converter_drops(converted):
    """MindFormers' Llama converter loads a Qwen2 directory as `LlamaForCausalLM`, whose config has
    attention_bias=False, so transformers drops q/k/v biases as unexpected keys and they never
    reach the .ckpt (MindFormers converts Qwen2 elsewhere). Everything else must still match."""
    c = _case(converted, "qwen2", "fp32")
    biases = {n for n in c["wp_ours"] if n.endswith(".bias")}
    assert biases == {f"model.layers.{l}.attention.w{p}.bias" for l in range(2) for p in "qkv"}
    assert not any(n.endswith(".bias") for n in c["wp_theirs"])
    hf = load_file(c["hf"] / "model.safetensors")
    for n in biases:
        layer, p = n.split(".")[2], n.split(".")[4][1]
        assert torch.equal(c["wp_ours"][n][2], hf[f"model.layers.{layer}.self_attn.{p}_proj.bias"]), n
    for reader in ("wp", "ms"):
        ours = {n: v for n, v in c[f"{reader}_ours"].items() if n not in biases}
        _assert_same(ours, c[f"{reader}_theirs"], "Float32", reader)


def test_single_conversion_command_line(tmp_path, mindformers_peer):
    """The one-job form, `mindformers_peer.py convert-llama HF_DIR OUT_CKPT --dtype ...`."""
    hf_dir = build_hf("llama3", tmp_path / "hf")
    out = tmp_path / "mf" / "model.ckpt"
    out.parent.mkdir()
    info = mindformers_peer.convert(hf_dir, out, "bf16")
    assert info["output"] == str(out) and info["mindformers"] and info["mindspore"]
    view = _weightport_view(out)
    assert {d for _, d, _ in view.values()} == {"BFloat16"}
    src = load_file(hf_dir / "model.safetensors")
    assert torch.equal(view["model.layers.0.attention.wq.weight"][2],
                       src["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))


# ---- CogVLM2: MindFormers' own cogvlm2 converter, from the mindformers 1.3.2 wheel

# The last mindformers wheel on PyPI with mindformers/models/cogvlm2/convert_weight.py (its converter
# is the same file in the v1.5.0 sources); pinned by hash, so the code run is the code read.
COGVLM2_WHEEL = "mindformers==1.3.2"
COGVLM2_WHEEL_SHA256 = "e3c96ac5b08b8f2cd34b89883dd49f4a250555c7b615251543ba76b44f16353e"
# CogVLM2-Video-Llama3's sizes where MindFormers' converter hard-codes them: it cuts the language
# expert's qkv at rows 4096 and 5120 (q = hidden 4096, k = v = 8 kv heads x 128)
COGVLM2_19B = {"hidden_size": 4096, "num_attention_heads": 32, "num_multi_query_heads": 8, "num_hidden_layers": 1,
               "intermediate_size": 16, "vocab_size": 16}
# case: (modal, config overrides, source dtype, weightport dtype= / peer --dtype, --modal given to both)
COGVLM2 = {
    "image-fp32": ("image", {}, torch.float32, None, "image"),
    "image-to-bf16": ("image", {}, torch.float32, "bf16", "image"),
    "video-19b-sizes-bf16": ("video", COGVLM2_19B, torch.bfloat16, None, None),  # --modal video is its default
    "video-tiny": ("video", {}, torch.float32, None, "video"),
}
FREQS = "llm_model.model.freqs_mgr.freqs"  # its copy of the rotary inv_freq buffer; weightport leaves it out


@pytest.fixture(scope="module")
def cogvlm2_wheel(tmp_path_factory) -> Path:
    """mindformers 1.3.2's wheel, downloaded with pip at test time (nothing of it is kept in the repo)."""
    import hashlib
    import os
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "--disable-pip-version-check", "-q", "-d", str(d), COGVLM2_WHEEL],
                          capture_output=True, text=True)
    wheels = sorted(d.glob("mindformers-1.3.2-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        why = f"pip download {COGVLM2_WHEEL} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    assert hashlib.sha256(wheels[0].read_bytes()).hexdigest() == COGVLM2_WHEEL_SHA256, "not the wheel read"
    return wheels[0]


@pytest.fixture(scope="module")
def cogvlm2_converted(tmp_path_factory, mindformers_peer, cogvlm2_wheel) -> dict[str, dict]:
    """Every COGVLM2 case converted by weightport's `mindformers --model cogvlm2` and by MindFormers'
    converter (one peer process), both read back there with mindspore.load_checkpoint."""
    from test_mindspore_cogvlm2 import CONFIGS as COG_CONFIGS
    from test_mindspore_cogvlm2 import build_cogvlm2
    from weightport import cli

    root = tmp_path_factory.mktemp("cogvlm2_peer")
    cases, jobs = {}, []
    for case, (modal, over, src_dtype, dtype, flag) in COGVLM2.items():
        d = root / case
        hf = build_cogvlm2(d / "hf", modal, {**COG_CONFIGS[modal], **over}, dtype=src_dtype)
        ours = d / "wp" / "cogvlm2.ckpt"
        ours.parent.mkdir()
        argv = ["mindformers", "--model", "cogvlm2", "--input_path", str(hf), "--output_path", str(ours)]
        argv += (["--dtype", dtype] if dtype else []) + (["--modal", flag] if flag else [])
        c = cases[case] = {"hf": hf, "code": cli.main(argv)}
        jobs.append({"model": "cogvlm2", "wheel": cogvlm2_wheel, "hf_dir": hf, "out_ckpt": d / "mf" / "model.ckpt",
                     "dtype": dtype, "modal": flag, "compare_with": ours})
    peer = mindformers_peer.convert_many(jobs, root)
    for c, r in zip(cases.values(), peer["results"]):
        c.update(r)
    return cases


def _cog_case(cogvlm2_converted, case):
    c = cogvlm2_converted[case]
    if c["code"] != 0:
        pytest.fail(f"weightport mindformers --model cogvlm2 exited {c['code']}", pytrace=False)
    if "error" in c:
        pytest.fail("MindFormers' cogvlm2 converter failed:\n" + c["error"], pytrace=False)
    return c


@pytest.mark.parametrize("case", [c for c in COGVLM2 if c != "video-tiny"])
def test_cogvlm2_ckpt_matches_mindformers_converter(cogvlm2_converted, case):
    """Name for name, shape, dtype and value, as mindspore.load_checkpoint reads both files; the
    only record MindFormers has beyond weightport's is its copy of the rotary inv_freq buffer."""
    c = _cog_case(cogvlm2_converted, case)
    ours, theirs = c["compare"]["ours"], c["compare"]["theirs"]
    extra = set(theirs) - set(ours)
    assert extra == {FREQS}, sorted(extra)
    assert not set(ours) - set(theirs), sorted(set(ours) - set(theirs))
    assert {n: theirs[n] for n in ours} == ours
    assert c["compare"]["values_differ"] == []
    want = {"image-fp32": "Float32", "image-to-bf16": "BFloat16", "video-19b-sizes-bf16": "BFloat16"}[case]
    assert {d for _, d in ours.values()} == {want}
    if case.startswith("video"):
        assert ours["llm_model.model.layers.0.attention.wk.weight"][0] == [1024, 4096]


def test_cogvlm2_video_of_other_sizes_mindformers_cuts_qkv_at_4096(cogvlm2_converted):
    """Off the 19B sizes MindFormers' cut (rows :4096, 4096:5120, 5120:) is wrong: on this 64-wide
    model its wq holds every qkv row and wk / wv are empty (load_checkpoint drops them); weightport
    cuts by the config. Every other record is the same."""
    c = _cog_case(cogvlm2_converted, "video-tiny")
    ours, theirs = c["compare"]["ours"], c["compare"]["theirs"]
    wq, wk = "llm_model.model.layers.{}.attention.wq.weight", "llm_model.model.layers.{}.attention.wk.weight"
    for l in range(2):
        assert ours[wq.format(l)][0] == [64, 64] and theirs[wq.format(l)][0] == [128, 64]
        assert ours[wk.format(l)][0] == [32, 64] and wk.format(l) not in theirs
    split = {n for n in ours if ".attention.w" in n and n.rsplit(".", 2)[-2] in ("wq", "wk", "wv")}
    assert set(theirs) - set(ours) == {FREQS}
    assert {n: theirs[n] for n in set(ours) - split} == {n: ours[n] for n in set(ours) - split}
    assert set(c["compare"]["values_differ"]) <= split
