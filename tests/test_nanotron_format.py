"""The nanotron adapter: HF Llama <-> Nanotron at any TP size, the on-disk tree and shard metadata
spelled out from ../shared/formats/nanotron.md, rope_interleaved, and refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weightport
from weightport.hf_config import rope_scaling
from conftest import assert_same_tensors, build_hf, hf_logits, run_cli
from weightport.errors import WeightportError
from weightport.formats.nanotron.llama import FIELDS
from weightport.formats.nanotron.shards import Sharding, pairs_to_str, shape_from_str, shard_pairs

# nH=8, nKV=4 so every TP size up to 4 gives each rank whole heads
GQA8 = dict(num_attention_heads=8, num_key_value_heads=4)
QKV = "model/model/decoder/{l}/pp_block/attn/qkv_proj/model_weight"


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    return build_hf("llama3", tmp_path_factory.mktemp("hf") / "llama3")


@pytest.fixture(scope="module")
def hf_gqa8(tmp_path_factory):
    return build_hf("llama3", tmp_path_factory.mktemp("hf") / "gqa8", **GQA8)


def _read(path):
    with safe_open(path, "pt") as f:
        return f.get_tensor("data"), f.metadata()


def _round_trip(src, tmp_path, tp, **kw):
    nt, back = tmp_path / f"nt{tp}", tmp_path / f"back{tp}"
    weightport.convert(src, nt, "nanotron", tp=tp, **kw)
    weightport.convert(nt, back, "hf")
    assert_same_tensors(load_file(src / "model.safetensors"), back)
    assert torch.equal(hf_logits(back), hf_logits(src))
    return nt


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_at_every_tp(hf_gqa8, tmp_path, tp):
    nt = _round_trip(hf_gqa8, tmp_path, tp)
    meta = json.loads((nt / "checkpoint_metadata.json").read_text())
    assert meta["tp"] == tp and meta["version"] == "1.4"
    assert yaml.safe_load((nt / "config.yaml").read_text())["parallelism"]["tp"] == tp
    assert len(list((nt / "model/model/decoder/0/pp_block/attn/qkv_proj").iterdir())) == tp


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_gqa_and_tied(tmp_path, tp):
    _round_trip(build_hf("llama3", tmp_path / "gqa"), tmp_path / "a", tp)
    tied = build_hf("llama3.2", tmp_path / "tied")
    nt = _round_trip(tied, tmp_path / "b", tp)
    # tied: stored once, under the embedding; there is no lm_head directory
    assert not (nt / "model/model/lm_head").exists()
    assert json.loads((nt / "model_config.json").read_text())["tie_word_embeddings"] is True


def test_tp2_reads_back_as_the_tp1_checkpoint(hf_src, tmp_path):
    weightport.convert(hf_src, tmp_path / "tp1", "nanotron")
    weightport.convert(hf_src, tmp_path / "tp2", "nanotron", tp=2)
    weightport.convert(tmp_path / "tp2", tmp_path / "again", "nanotron")  # reassembled, rewritten at TP=1
    a = sorted(p.relative_to(tmp_path / "tp1") for p in (tmp_path / "tp1").rglob("*.safetensors"))
    b = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.safetensors"))
    assert a == b and len(a) == 2 * 6 + 3
    for rel in a:
        (x, mx), (y, my) = _read(tmp_path / "tp1" / rel), _read(tmp_path / "again" / rel)
        assert torch.equal(x, y) and mx == my, rel
    for name in ("model_config.json", "config.json"):
        assert (tmp_path / "tp1" / name).read_text() == (tmp_path / "again" / name).read_text()


def test_tree_and_metadata_strings_at_tp2(hf_src, tmp_path):
    """H=64, 4 heads / 2 kv heads of 16, I=96, V=128, 2 layers: what Nanotron's TP=2 ranks save."""
    nt = tmp_path / "nt"
    weightport.convert(hf_src, nt, "nanotron", tp=2)
    shard = "_pp-rank-0-of-1_tp-rank-{r}-of-2.safetensors"
    expected = ["model/model/final_layer_norm/pp_block/model_weight.safetensors"]
    for r in range(2):
        expected += [f"model/model/token_position_embeddings/pp_block/token_embedding/model_weight{shard.format(r=r)}",
                     f"model/model/lm_head/pp_block/model_weight{shard.format(r=r)}"]
    for l in range(2):
        d = f"model/model/decoder/{l}/pp_block"
        expected += [f"{d}/input_layernorm/model_weight.safetensors",
                     f"{d}/post_attention_layernorm/model_weight.safetensors"]
        for r in range(2):
            expected += [f"{d}/{m}/model_weight{shard.format(r=r)}"
                         for m in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_up_proj", "mlp/down_proj")]
    files = sorted(str(p.relative_to(nt)) for p in nt.rglob("*") if p.is_file())
    assert files == sorted(expected + ["checkpoint_metadata.json", "config.json", "config.yaml",
                                       "generation_config.json", "model_config.json", "weightport-manifest.json"])

    full = "None,None,None"
    want = {
        "attn/qkv_proj": ("(128, 64)", [
            f"0,32,None|{full}#0,32,None|{full};32,48,None|{full}#64,80,None|{full};"
            f"48,64,None|{full}#96,112,None|{full}",
            f"0,32,None|{full}#32,64,None|{full};32,48,None|{full}#80,96,None|{full};"
            f"48,64,None|{full}#112,128,None|{full}"]),
        "mlp/gate_up_proj": ("(192, 64)", [
            f"0,48,None|{full}#0,48,None|{full};48,96,None|{full}#96,144,None|{full}",
            f"0,48,None|{full}#48,96,None|{full};48,96,None|{full}#144,192,None|{full}"]),
        "attn/o_proj": ("(64, 64)", [f"{full}|{full}#{full}|0,32,None", f"{full}|{full}#{full}|32,64,None"]),
        "mlp/down_proj": ("(64, 96)", [f"{full}|{full}#{full}|0,48,None", f"{full}|{full}#{full}|48,96,None"]),
    }
    hf = load_file(hf_src / "model.safetensors")
    p = "model.layers.1."
    for mod, (shape, pairs) in want.items():
        for r in range(2):
            _, meta = _read(nt / f"model/model/decoder/1/pp_block/{mod}/model_weight{shard.format(r=r)}")
            assert meta == {"version": "1.4", "local_global_slices_pairs": pairs[r], "unsharded_shape": shape}
    emb = nt / f"model/model/token_position_embeddings/pp_block/token_embedding/model_weight{shard.format(r=1)}"
    data, meta = _read(emb)
    assert meta == {"version": "1.4", "local_global_slices_pairs": f"{full}|{full}#64,128,None|{full}",
                    "unsharded_shape": "(128, 64)"}
    assert torch.equal(data, hf["model.embed_tokens.weight"][64:])
    _, meta = _read(nt / "model/model/decoder/1/pp_block/input_layernorm/model_weight.safetensors")
    assert meta == {}
    # rank 1's fused shards are [q_1; k_1; v_1] and [gate_1; up_1], not slices of the fused matrix
    qkv, _ = _read(nt / f"model/model/decoder/1/pp_block/attn/qkv_proj/model_weight{shard.format(r=1)}")
    attn = p + "self_attn."
    assert torch.equal(qkv, torch.cat([hf[attn + "q_proj.weight"][32:], hf[attn + "k_proj.weight"][16:],
                                       hf[attn + "v_proj.weight"][16:]]))
    gu, _ = _read(nt / f"model/model/decoder/1/pp_block/mlp/gate_up_proj/model_weight{shard.format(r=1)}")
    assert torch.equal(gu, torch.cat([hf[p + "mlp.gate_proj.weight"][48:], hf[p + "mlp.up_proj.weight"][48:]]))
    o, _ = _read(nt / f"model/model/decoder/1/pp_block/attn/o_proj/model_weight{shard.format(r=1)}")
    assert torch.equal(o, hf[attn + "o_proj.weight"][:, 32:])

    mc = json.loads((nt / "model_config.json").read_text())
    assert tuple(sorted(mc)) == tuple(sorted(FIELDS)) and mc["rope_interleaved"] is False
    assert mc["is_llama_config"] is True and mc["num_key_value_heads"] == 2 and mc["rope_scaling"] is None
    assert json.loads((nt / "checkpoint_metadata.json").read_text()) == {
        "custom_metas": None, "dp": 1, "tp": 2, "version": "1.4",
        "metas": {"consumed_train_samples": 0, "last_stage_idx": None, "last_train_step": 0,
                  "data_stages": [{"consumed_train_samples": 0, "name": "Empty", "start_training_step": 0}]}}
    cfg = yaml.safe_load((nt / "config.yaml").read_text())
    assert cfg["model"]["model_config"] == mc and cfg["model"]["init_method"] == {"path": str(nt.resolve())}


def test_spec_metadata_strings_for_llama3_8b_sizes():
    """The exact strings of nanotron.md §1.5 (H=4096, 32/8 heads of 128, I=14336, V=128256)."""
    n = "None,None,None"
    qkv = Sharding(0, (4096, 1024, 1024))
    assert pairs_to_str(shard_pairs((6144, 4096), qkv, 0, 1)) == (
        f"0,4096,None|{n}#0,4096,None|{n};4096,5120,None|{n}#4096,5120,None|{n};5120,6144,None|{n}#5120,6144,None|{n}")
    assert pairs_to_str(shard_pairs((6144, 4096), qkv, 1, 2)) == (
        f"0,2048,None|{n}#2048,4096,None|{n};2048,2560,None|{n}#4608,5120,None|{n};"
        f"2560,3072,None|{n}#5632,6144,None|{n}")
    assert pairs_to_str(shard_pairs((28672, 4096), Sharding(0, (14336, 14336)), 1, 2)) == (
        f"0,7168,None|{n}#7168,14336,None|{n};7168,14336,None|{n}#21504,28672,None|{n}")
    assert pairs_to_str(shard_pairs((4096, 4096), Sharding(1), 1, 2)) == f"{n}|{n}#{n}|2048,4096,None"
    assert pairs_to_str(shard_pairs((128256, 4096), Sharding(0), 1, 2)) == f"{n}|{n}#64128,128256,None|{n}"
    # Nanotron under numpy >= 2 writes numpy ints into unsharded_shape
    assert shape_from_str("(np.int64(6144), 4096)") == (6144, 4096) and shape_from_str("(3456,)") == (3456,)


def test_rope_interleaved_both_ways(hf_src, tmp_path):
    nt = _round_trip(hf_src, tmp_path, 2, layout="interleaved")
    assert json.loads((nt / "model_config.json").read_text())["rope_interleaved"] is True
    hf = load_file(hf_src / "model.safetensors")
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    fused = torch.cat([_read(nt / f"{QKV.format(l=0)}_pp-rank-0-of-1_tp-rank-{r}-of-2.safetensors")[0][:32]
                       for r in range(2)])
    # per head of 16 rows: Nanotron row 2i is HF row i, row 2i+1 is HF row i + 8 (GPT-J pairs)
    for h in range(4):
        for i in range(8):
            assert torch.equal(fused[16 * h + 2 * i], q[16 * h + i])
            assert torch.equal(fused[16 * h + 2 * i + 1], q[16 * h + i + 8])
    # a config that does not record rope_interleaved means different things in fork and upstream
    (nt / "config.json").unlink()
    mc = json.loads((nt / "model_config.json").read_text())
    del mc["rope_interleaved"]
    (nt / "model_config.json").write_text(json.dumps(mc))
    with pytest.raises(WeightportError, match="rope_interleaved.*--from-layout"):
        weightport.convert(nt, tmp_path / "x", "hf")
    weightport.convert(nt, tmp_path / "y", "hf", source_layout="interleaved")
    assert_same_tensors(hf, tmp_path / "y")


def test_reads_without_the_hf_sidecar(hf_src, tmp_path):
    nt = tmp_path / "nt"
    weightport.convert(hf_src, nt, "nanotron", tp=2)
    (nt / "config.json").unlink()
    (nt / "model_config.json").unlink()  # config.yaml alone, as the trainer's readers use
    weightport.convert(nt, tmp_path / "back", "hf")
    assert_same_tensors(load_file(hf_src / "model.safetensors"), tmp_path / "back")
    assert torch.equal(hf_logits(tmp_path / "back"), hf_logits(hf_src))


@pytest.fixture()
def nt2(hf_src, tmp_path):
    nt = tmp_path / "nt2"
    weightport.convert(hf_src, nt, "nanotron", tp=2)
    return nt


def _refused(src, tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(WeightportError, match=match) as e:
        weightport.convert(src, out, kw.pop("to", "hf"), **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.weightport-partial-*"))


def test_missing_shard(nt2, tmp_path):
    (nt2 / f"{QKV.format(l=1)}_pp-rank-0-of-1_tp-rank-1-of-2.safetensors").unlink()
    _refused(nt2, tmp_path, "missing tp-rank 1")


def test_stale_shard_of_another_tp_size(nt2, hf_src, tmp_path):
    weightport.convert(hf_src, tmp_path / "nt1", "nanotron")
    stale = f"{QKV.format(l=0)}_pp-rank-0-of-1_tp-rank-0-of-1.safetensors"
    shutil.copy(tmp_path / "nt1" / stale, nt2 / stale)
    _refused(nt2, tmp_path, r"different parallel sizes \(TP=1 PP=1, TP=2 PP=1\)")


@pytest.mark.parametrize("change, match", [
    (lambda m: dict(m, local_global_slices_pairs=m["local_global_slices_pairs"].replace("#32,64", "#0,32")),
     "do not cover"),
    (lambda m: dict(m, unsharded_shape="(130, 64)"), "disagrees with the other shards"),
    (lambda m: dict(m, format="pt"), "expected exactly"),
    (lambda m: dict(m, local_global_slices_pairs="0,32,None#0,32,None"), "bad shard metadata"),
    (lambda m: dict(m, version="2.0"), "newer than"),
])
def test_inconsistent_metadata(nt2, tmp_path, change, match):
    path = nt2 / f"{QKV.format(l=0)}_pp-rank-0-of-1_tp-rank-1-of-2.safetensors"
    data, meta = _read(path)
    save_file({"data": data}, path, change(meta))
    _refused(nt2, tmp_path, match)


def test_unknown_config_key(nt2, tmp_path):
    mc = json.loads((nt2 / "model_config.json").read_text())
    (nt2 / "model_config.json").write_text(json.dumps(dict(mc, sliding_window=8)))
    _refused(nt2, tmp_path, "unknown LlamaConfig key 'sliding_window'")


@pytest.mark.parametrize("tp, overrides, match", [
    (3, {}, r"--tp 3 does not divide num_attention_heads \(4\): Nanotron gives each TP rank whole heads"),
    (4, {}, r"--tp 4 does not divide num_key_value_heads \(2\): Nanotron gives each TP rank whole heads"),
    (2, {"vocab_size": 129}, r"--tp 2 does not divide vocab_size \(129\) of model\.token_position_embeddings"),
    (2, {"intermediate_size": 129}, r"--tp 2 does not divide its gate block \(129\) of model\.decoder\.0"),
])
def test_tp_not_dividing(hf_src, tmp_path, tp, overrides, match):
    src = build_hf("llama3", tmp_path / "src", **overrides) if overrides else hf_src
    _refused(src, tmp_path, match, to="nanotron", tp=tp)


@pytest.mark.parametrize("key, overrides, match", [
    ("llama3.1", {}, "rope scaling 'llama3'.*never applies.*pass --allow-approximate"),
    ("llama-bias", {}, "attention_bias=true: Nanotron.s Llama has no bias parameters"),
    ("llama3", {"head_dim": 32}, "head_dim 32 != hidden_size 64 / num_attention_heads 4"),
])
def test_unrepresentable_is_refused(tmp_path, key, overrides, match):
    src = build_hf(key, tmp_path / "src", **overrides)
    _refused(src, tmp_path, match, to="nanotron")


def test_allow_approximate_drops_rope_scaling_with_a_warning(tmp_path):
    src = build_hf("llama3.1", tmp_path / "src")
    plan = weightport.convert(src, tmp_path / "nt", "nanotron", allow_approximate=True)
    assert plan.warnings == ["rope scaling 'llama3': Nanotron's Llama stores rope_scaling but never applies it, so "
                             "every position's rotary frequencies would change (converted without it: "
                             "--allow-approximate)"]
    assert "warning: rope scaling 'llama3'" in plan.render()
    assert json.loads((tmp_path / "nt" / "model_config.json").read_text())["rope_scaling"] is None
    # back to HF, the original config (kept in config.json) returns with its rope scaling
    weightport.convert(tmp_path / "nt", tmp_path / "back", "hf")
    assert_same_tensors(load_file(src / "model.safetensors"), tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert rope_scaling(back) == rope_scaling(original) and rope_scaling(back)["rope_type"] == "llama3"


def test_cli_tp(hf_src, tmp_path):
    out = tmp_path / "nt"
    r = run_cli("convert", hf_src, out, "--to", "nanotron", "--tp", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert (out / f"{QKV.format(l=0)}_pp-rank-0-of-1_tp-rank-1-of-2.safetensors").is_file()
    r = run_cli("inspect", out)
    assert r.returncode == 0 and "nanotron (TP=2 PP=1, rotate-half rotary)" in r.stdout, r.stdout + r.stderr
    r = run_cli("convert", hf_src, tmp_path / "bad", "--to", "nanotron", "--tp", "3")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--tp 3 does not divide" in r.stderr
    r = run_cli("convert", hf_src, tmp_path / "bad", "--to", "hf", "--tp", "2")
    assert r.returncode == 1 and "--tp applies to nanotron" in r.stderr
    assert not (tmp_path / "bad").exists()
    usage = run_cli("convert", "--help").stdout
    assert "--tp N" in usage and "--pp N" in usage


def test_bfloat16_and_lazy_headers(tmp_path):
    src = build_hf("llama3", tmp_path / "bf16", dtype=torch.bfloat16)
    nt = _round_trip(src, tmp_path, 2)
    assert yaml.safe_load((nt / "config.yaml").read_text())["model"]["dtype"] == "bfloat16"
    from weightport.formats.nanotron.shards import NanotronSource

    with NanotronSource(nt / "model") as source:
        qkv = "model.decoder.0.pp_block.attn.qkv_proj.weight"
        assert source.tensors[qkv].shape == (128, 64) and source.tensors[qkv].dtype == torch.bfloat16
        # only headers were read, and no file is held open
        assert all(f._fd is None for f in source._files)
        source.load(qkv)
        assert all(f._fd is None for f in source._files)


def test_stale_or_foreign_files(nt2, tmp_path):
    d = nt2 / "model/model/decoder/0/pp_block/attn/qkv_proj"
    shutil.copy(d / "model_weight_pp-rank-0-of-1_tp-rank-0-of-2.safetensors", d / "model_weight.safetensors")
    _refused(nt2, tmp_path, "both an unsharded model_weight.safetensors and TP shard files")
    legacy = "model_model_weight.safetensors_pp-rank-0-of-1_tp-rank-0-of-2.safetensors"  # before Apr 2024
    (d / "model_weight.safetensors").rename(d / legacy)
    _refused(nt2, tmp_path, "legacy Nanotron file name")


def test_pp_ranks_follow_nanotrons_cost_balance(tmp_path):
    """4 layers (cost 4H^2 + 3IH each) and the lm_head (VH) over 2 stages: layers 0-2 on
    stage 0, layer 3 and the lm_head on stage 1, as Nanotron's build_model splits them."""
    src = build_hf("llama3", tmp_path / "hf", num_hidden_layers=4)
    nt = _round_trip(src, tmp_path, 2, pp=2)
    names = {str(p.relative_to(nt / "model/model")) for p in nt.rglob("*_tp-rank-*.safetensors")}
    for l, stage in ((0, 0), (2, 0), (3, 1)):
        assert f"decoder/{l}/pp_block/attn/o_proj/model_weight_pp-rank-{stage}-of-2_tp-rank-1-of-2.safetensors" in names
    assert "lm_head/pp_block/model_weight_pp-rank-1-of-2_tp-rank-0-of-2.safetensors" in names
    assert "token_position_embeddings/pp_block/token_embedding/model_weight_pp-rank-0-of-2_tp-rank-0-of-2.safetensors" \
        in names
    assert yaml.safe_load((nt / "config.yaml").read_text())["parallelism"] == {
        "dp": 1, "expert_parallel_size": 1, "pp": 2, "pp_engine": "1f1b", "tp": 2,
        "tp_linear_async_communication": False, "tp_mode": "ALL_REDUCE"}


def test_pp_split_of_llama3_8b_over_8_stages():
    """The split Nanotron prints for Llama-3-8B at PP=8: 5 layers (with the embedding) on stage 0,
    4 on stages 1-2 and 5-6, and 2 with the final norm and lm_head on stage 7."""
    from collections import Counter

    from weightport.format import OutputTensor
    from weightport.formats.nanotron.llama import EMBED, pp_ranks

    H, I, V = 4096, 14336, 128256
    ts = [OutputTensor(EMBED, (V, H), torch.bfloat16),
          OutputTensor("model.lm_head.pp_block.weight", (V, H), torch.bfloat16)]
    ts += [OutputTensor(f"model.decoder.{l}.pp_block.mlp.gate_up_proj.weight", (2 * I, H), torch.bfloat16)
           for l in range(32)]
    ranks = pp_ranks(ts, 8)
    layers = Counter(r for n, r in ranks.items() if ".decoder." in n)
    assert [layers[s] for s in (0, 1, 2, 5, 6, 7)] == [5, 4, 4, 4, 4, 2] and sum(layers.values()) == 32
    assert ranks[EMBED] == 0 and ranks["model.lm_head.pp_block.weight"] == 7


def test_nanotron_version_is_checked_and_written(hf_src, tmp_path):
    _refused(hf_src, tmp_path, r"--nanotron-version 9 is not one of 1\.2, 1\.3, 1\.4, 1\.5", to="nanotron",
             nanotron_version="9")
    _refused(hf_src, tmp_path, "--nanotron-version applies to nanotron, not hf", to="hf", nanotron_version="1.2")
    weightport.convert(hf_src, tmp_path / "v12", "nanotron", tp=2, nanotron_version="1.2")
    _, meta = _read(tmp_path / "v12" / f"{QKV.format(l=0)}_pp-rank-0-of-1_tp-rank-1-of-2.safetensors")
    assert meta["version"] == "1.2"
    assert json.loads((tmp_path / "v12" / "checkpoint_metadata.json").read_text())["version"] == "1.2"
