"""Idefics3 in the hf format and the nanotron format (the kisate fork's module tree), at any TP
size: tensors bit-identical after the round trip, logits equal in transformers with an image, the
file tree and shard metadata spelled out from ../shared/formats/nanotron.md §1.5 and §3, the
vocabulary padding, the config files, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weightport
from conftest import assert_same_tensors, rule_sets_round_trip
from weightport.archs import model_from_hf_config
from weightport.errors import WeightportError
from weightport.formats.nanotron.idefics3 import vocab_rows
from weightport.formats.nanotron.llama import FIELDS as LLAMA_FIELDS

# vision: hidden 32, 4 heads, MLP 48, 32 px images of 8 px patches, so 16 positions; text: Llama
# with 8 heads / 4 kv heads (every TP up to 4 gives each rank whole heads) and a vocabulary of 131,
# which Nanotron pads to 132
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=96, vocab_size=131, max_position_embeddings=256, rms_norm_eps=1e-6)
IMAGE_TOKEN = 129
CE = "model/model/combined_embeddings/pp_block"
NV = f"{CE}/vision_model"
SHARD = "_pp-rank-0-of-1_tp-rank-{r}-of-{T}.safetensors"
FULL = "None,None,None"


def build_idefics3(path, *, tied=False, vision=None, **text):
    """A tiny random Idefics3ForConditionalGeneration as transformers saves it, with weights drawn
    large enough that a misplaced tensor changes the logits."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(vision_config={**VISION, **(vision or {})}, text_config={**TEXT, **text},
                         image_token_id=IMAGE_TOKEN, scale_factor=2, tie_word_embeddings=tied)
    torch.manual_seed(11 + tied)
    model = Idefics3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def idefics3_logits(path) -> torch.Tensor:
    """Logits for one image between text tokens, its tokens expanded as the processor does:
    (image_size / patch_size)^2 / scale_factor^2 = 4 image tokens."""
    from transformers import Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    v = model.config.vision_config
    n = (v.image_size // v.patch_size) ** 2 // model.config.scale_factor ** 2
    pixels = torch.randn(1, 1, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 5, 130, *[IMAGE_TOKEN] * n, 130, 7, 9, 11]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    return build_idefics3(tmp_path_factory.mktemp("hf") / "idefics3")


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory):
    return build_idefics3(tmp_path_factory.mktemp("hf") / "tied", tied=True)


@pytest.fixture(scope="module")
def src_logits(hf_src):
    return idefics3_logits(hf_src)


def _read(path):
    with safe_open(path, "pt") as f:
        return f.get_tensor("data"), f.metadata()


def _refused(src, tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(WeightportError, match=match) as e:
        weightport.convert(src, out, kw.pop("to", "hf"), **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.weightport-partial-*"))


# --- the hf format -----------------------------------------------------------------------------------

def test_hf_names_are_what_transformers_saves(hf_src, hf_tied, tmp_path):
    for src in (hf_src, hf_tied):
        model = model_from_hf_config(json.loads((src / "config.json").read_text()), "config.json")
        stored = {k: tuple(v.shape) for k, v in load_file(src / "model.safetensors").items()}
        assert stored == {k: tuple(s) for k, s in model.hub_tensors().items()}
        # tied by the top-level flag: no lm_head.weight in the files
        assert ("lm_head.weight" in stored) is (src == hf_src)
        weightport.convert(src, tmp_path / src.name, "hf")
        assert_same_tensors(load_file(src / "model.safetensors"), tmp_path / src.name)
    assert torch.equal(idefics3_logits(tmp_path / hf_src.name), idefics3_logits(hf_src))


def test_transformers_4_configs_leave_out_default_keys():
    """4.x left sub-config keys equal to their class defaults out of config.json: Idefics3-8B's
    text_config has no hidden_size, num_hidden_layers or num_attention_heads (Llama's 4096/32/32)."""
    cfg = {"model_type": "idefics3", "pad_token_id": 128002, "scale_factor": 2,
           "text_config": {"model_type": "llama", "intermediate_size": 14336, "num_key_value_heads": 8,
                           "vocab_size": 128259},
           "vision_config": {"hidden_size": 1152, "image_size": 364, "intermediate_size": 4304,
                             "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}}
    model = model_from_hf_config(cfg, "config.json")
    d = model.dims
    assert (d.hidden, d.n_layer, d.n_head, d.n_kv, d.vocab, d.tied) == (4096, 32, 32, 8, 128259, False)
    hub = model.hub_tensors()
    assert hub["model.vision_model.embeddings.position_embedding.weight"] == (676, 1152)
    assert hub["model.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert hub["model.connector.modality_projection.proj.weight"] == (4096, 4608)
    assert vocab_rows(model, 1) == vocab_rows(model, 2) == vocab_rows(model, 4) == 128260


def test_every_rule_set_is_reversible(hf_src, hf_tied):
    for src in (hf_src, hf_tied):
        model = model_from_hf_config(json.loads((src / "config.json").read_text()), "config.json")
        checked = rule_sets_round_trip(model, torch.float32)
        assert checked == [("hf", None), ("nanotron", "rotate-half"), ("nanotron", "interleaved")]


# --- the nanotron format: round trips ----------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_at_every_tp(hf_src, src_logits, tmp_path, tp):
    nt, back = tmp_path / "nt", tmp_path / "back"
    weightport.convert(hf_src, nt, "nanotron", tp=tp)
    plan = weightport.convert(nt, back, "hf")
    assert_same_tensors(load_file(hf_src / "model.safetensors"), back)
    assert torch.equal(idefics3_logits(back), src_logits)
    assert "vocabulary padding undone: 132 stored rows, 131 in config.json" in plan.source.notes
    assert f"TP={tp} PP=1" in plan.source.variant
    # weight and bias of the vision qkv are both sharded: one file per rank each
    assert len(list((nt / NV / "encoder/0/self_attn/qkv_proj").iterdir())) == 2 * tp
    assert json.loads((nt / "checkpoint_metadata.json").read_text())["tp"] == tp


@pytest.mark.parametrize("tp", [1, 2])
def test_tied_is_written_as_a_copy_and_tied_again(hf_tied, tmp_path, tp):
    nt, back = tmp_path / "nt", tmp_path / "back"
    plan = weightport.convert(hf_tied, nt, "nanotron", tp=tp)
    assert "lm_head written as a copy of the embedding (Nanotron's Idefics3 cannot tie them)" in plan.render()
    embed = torch.cat([_read(nt / f"{CE}/text_embeddings/token_embedding/model_weight{SHARD.format(r=r, T=tp)}")[0]
                       for r in range(tp)])
    head = torch.cat([_read(nt / f"model/model/lm_head/pp_block/model_weight{SHARD.format(r=r, T=tp)}")[0]
                      for r in range(tp)])
    assert torch.equal(embed, head) and embed.shape == (132, 64)
    mc = json.loads((nt / "model_config.json").read_text())
    assert mc["text_config"]["tie_word_embeddings"] is False and "tie_word_embeddings" not in mc
    weightport.convert(nt, back, "hf")
    assert_same_tensors(load_file(hf_tied / "model.safetensors"), back)
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.equal(idefics3_logits(back), idefics3_logits(hf_tied))


def test_tied_read_back_refuses_an_lm_head_that_differs(hf_tied, tmp_path):
    nt = tmp_path / "nt"
    weightport.convert(hf_tied, nt, "nanotron")
    path = nt / f"model/model/lm_head/pp_block/model_weight{SHARD.format(r=0, T=1)}"
    data, meta = _read(path)
    data[3, 5] += 1.0  # as training the untied Nanotron model would
    save_file({"data": data}, path, meta)
    _refused(nt, tmp_path, "tensors stored as tied differ")
    # without config.json the checkpoint reads as what Nanotron holds: untied, padded
    (nt / "config.json").unlink()
    weightport.convert(nt, tmp_path / "untied", "hf")
    back = load_file(tmp_path / "untied" / "model.safetensors")
    assert torch.equal(back["lm_head.weight"], data)


def test_tp2_reads_back_as_the_tp1_checkpoint(hf_src, tmp_path):
    weightport.convert(hf_src, tmp_path / "tp1", "nanotron")
    weightport.convert(hf_src, tmp_path / "tp2", "nanotron", tp=2)
    weightport.convert(tmp_path / "tp2", tmp_path / "again", "nanotron")  # reassembled, rewritten at TP=1
    a = sorted(p.relative_to(tmp_path / "tp1") for p in (tmp_path / "tp1").rglob("*.safetensors"))
    b = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.safetensors"))
    assert a == b and len(a) == 3 + 2 * 12 + 2 + 1 + 2 * 6 + 3  # vision, connector, text
    for rel in a:
        (x, mx), (y, my) = _read(tmp_path / "tp1" / rel), _read(tmp_path / "again" / rel)
        assert torch.equal(x, y) and mx == my, rel
    for name in ("model_config.json", "config.json"):
        assert (tmp_path / "tp1" / name).read_text() == (tmp_path / "again" / name).read_text()


def test_interleaved_rotary_round_trip(hf_src, src_logits, tmp_path):
    weightport.convert(hf_src, tmp_path / "nt", "nanotron", tp=2, layout="interleaved")
    assert json.loads((tmp_path / "nt" / "model_config.json").read_text())["text_config"]["rope_interleaved"] is True
    weightport.convert(tmp_path / "nt", tmp_path / "back", "hf")
    assert_same_tensors(load_file(hf_src / "model.safetensors"), tmp_path / "back")


# --- the nanotron format: what is on disk ------------------------------------------------------------

def test_tree_and_metadata_strings_at_tp2(hf_src, tmp_path):
    """Vision Hv=32 (4 heads), Iv=48, 16 positions; text H=64, 8/4 heads of 8, I=96, V=131 -> 132:
    what the fork's Idefics3 saves at TP=2."""
    nt = tmp_path / "nt"
    weightport.convert(hf_src, nt, "nanotron", tp=2)
    shard = [SHARD.format(r=r, T=2) for r in range(2)]
    plain = ".safetensors"
    expected = [f"{NV}/embeddings/patch_embedding/model_{w}{plain}" for w in ("weight", "bias")]
    expected += [f"{NV}/embeddings/position_embedding/model_weight{s}" for s in shard]
    expected += [f"{NV}/post_layernorm/model_{w}{plain}" for w in ("weight", "bias")]
    expected += [f"{CE}/connector/modality_projector/proj/model_weight{plain}",
                 "model/model/llama/final_layer_norm/pp_block/model_weight.safetensors"]
    expected += [f"{CE}/text_embeddings/token_embedding/model_weight{s}" for s in shard]
    expected += [f"model/model/lm_head/pp_block/model_weight{s}" for s in shard]
    for j in range(2):
        e = f"{NV}/encoder/{j}"
        expected += [f"{e}/{m}/model_{w}{plain}" for m in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")]
        # column linears: weight and bias sharded; row linears: weight sharded, bias one rank-0 file
        expected += [f"{e}/{m}/model_{w}{s}" for m in ("self_attn/qkv_proj", "mlp/fc1") for w in ("weight", "bias")
                     for s in shard]
        expected += [f"{e}/{m}/model_weight{s}" for m in ("self_attn/o_proj", "mlp/fc2") for s in shard]
        expected += [f"{e}/{m}/model_bias{plain}" for m in ("self_attn/o_proj", "mlp/fc2")]
    for l in range(2):
        d = f"model/model/llama/decoder/{l}/pp_block"
        expected += [f"{d}/{m}/model_weight{plain}" for m in ("input_layernorm", "post_attention_layernorm")]
        expected += [f"{d}/{m}/model_weight{s}" for m in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_up_proj",
                                                          "mlp/down_proj") for s in shard]
    files = sorted(str(p.relative_to(nt)) for p in nt.rglob("*") if p.is_file())
    assert files == sorted(expected + ["checkpoint_metadata.json", "config.json", "config.yaml",
                                       "generation_config.json", "model_config.json", "weightport-manifest.json"])

    e = f"{NV}/encoder/1"
    want = {  # file under the checkpoint -> (unsharded_shape, pairs of rank 0, pairs of rank 1)
        f"{e}/self_attn/qkv_proj/model_weight": ("(96, 32)",
            f"0,16,None|{FULL}#0,16,None|{FULL};16,32,None|{FULL}#32,48,None|{FULL};32,48,None|{FULL}#64,80,None|{FULL}",
            f"0,16,None|{FULL}#16,32,None|{FULL};16,32,None|{FULL}#48,64,None|{FULL};32,48,None|{FULL}#80,96,None|{FULL}"),
        f"{e}/self_attn/qkv_proj/model_bias": ("(96,)",
            "0,16,None#0,16,None;16,32,None#32,48,None;32,48,None#64,80,None",
            "0,16,None#16,32,None;16,32,None#48,64,None;32,48,None#80,96,None"),
        f"{e}/self_attn/o_proj/model_weight": ("(32, 32)", f"{FULL}|{FULL}#{FULL}|0,16,None",
                                               f"{FULL}|{FULL}#{FULL}|16,32,None"),
        # fc1 is a column linear with one contiguous chunk (Iv,): its local slice is explicit
        f"{e}/mlp/fc1/model_weight": ("(48, 32)", f"0,24,None|{FULL}#0,24,None|{FULL}",
                                      f"0,24,None|{FULL}#24,48,None|{FULL}"),
        f"{e}/mlp/fc1/model_bias": ("(48,)", "0,24,None#0,24,None", "0,24,None#24,48,None"),
        f"{e}/mlp/fc2/model_weight": ("(32, 48)", f"{FULL}|{FULL}#{FULL}|0,24,None",
                                      f"{FULL}|{FULL}#{FULL}|24,48,None"),
        f"{NV}/embeddings/position_embedding/model_weight": ("(16, 32)", f"{FULL}|{FULL}#0,8,None|{FULL}",
                                                             f"{FULL}|{FULL}#8,16,None|{FULL}"),
        f"{CE}/text_embeddings/token_embedding/model_weight": ("(132, 64)", f"{FULL}|{FULL}#0,66,None|{FULL}",
                                                               f"{FULL}|{FULL}#66,132,None|{FULL}"),
        "model/model/lm_head/pp_block/model_weight": ("(132, 64)", f"{FULL}|{FULL}#0,66,None|{FULL}",
                                                      f"{FULL}|{FULL}#66,132,None|{FULL}"),
        "model/model/llama/decoder/1/pp_block/attn/qkv_proj/model_weight": ("(128, 64)",
            f"0,32,None|{FULL}#0,32,None|{FULL};32,48,None|{FULL}#64,80,None|{FULL};48,64,None|{FULL}#96,112,None|{FULL}",
            f"0,32,None|{FULL}#32,64,None|{FULL};32,48,None|{FULL}#80,96,None|{FULL};48,64,None|{FULL}#112,128,None|{FULL}"),
    }
    for stem, (shape, *pairs) in want.items():
        for r in range(2):
            _, meta = _read(nt / f"{stem}{shard[r]}")
            assert meta == {"version": "1.4", "local_global_slices_pairs": pairs[r], "unsharded_shape": shape}, stem
    for stem in (f"{e}/self_attn/o_proj/model_bias", f"{e}/mlp/fc2/model_bias", f"{e}/layer_norm1/model_weight",
                 f"{CE}/connector/modality_projector/proj/model_weight", f"{NV}/embeddings/patch_embedding/model_weight"):
        assert _read(nt / f"{stem}{plain}")[1] == {}, stem

    hf = load_file(hf_src / "model.safetensors")
    a = "model.vision_model.encoder.layers.1.self_attn."
    qkv_b, _ = _read(nt / f"{e}/self_attn/qkv_proj/model_bias{shard[1]}")
    assert torch.equal(qkv_b, torch.cat([hf[a + f"{p}_proj.bias"][16:] for p in "qkv"]))
    qkv_w, _ = _read(nt / f"{e}/self_attn/qkv_proj/model_weight{shard[1]}")
    assert torch.equal(qkv_w, torch.cat([hf[a + f"{p}_proj.weight"][16:] for p in "qkv"]))
    o_w, _ = _read(nt / f"{e}/self_attn/o_proj/model_weight{shard[1]}")
    assert torch.equal(o_w, hf[a + "out_proj.weight"][:, 16:])
    assert torch.equal(_read(nt / f"{e}/self_attn/o_proj/model_bias{plain}")[0], hf[a + "out_proj.bias"])
    m = "model.vision_model.encoder.layers.1.mlp."
    assert torch.equal(_read(nt / f"{e}/mlp/fc1/model_bias{shard[1]}")[0], hf[m + "fc1.bias"][24:])
    assert torch.equal(_read(nt / f"{e}/mlp/fc2/model_bias{plain}")[0], hf[m + "fc2.bias"])
    assert torch.equal(_read(nt / f"{CE}/connector/modality_projector/proj/model_weight{plain}")[0],
                       hf["model.connector.modality_projection.proj.weight"])


def test_model_config_and_config_yaml(hf_src, tmp_path):
    nt = tmp_path / "nt"
    weightport.convert(hf_src, nt, "nanotron", tp=2)
    mc = json.loads((nt / "model_config.json").read_text())
    assert mc == {
        "vision_config": {"hidden_size": 32, "image_size": 32, "patch_size": 8, "num_channels": 3,
                          "num_attention_heads": 4, "num_key_value_heads": 4, "is_using_mup": False,
                          "intermediate_size": 48, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                          "attention_dropout": 0.0, "num_hidden_layers": 2},
        "text_config": {"bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64,
                        "initializer_range": 0.02, "intermediate_size": 96, "is_llama_config": True,
                        "max_position_embeddings": 256, "num_attention_heads": 8, "num_hidden_layers": 2,
                        "num_key_value_heads": 4, "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": 1e-6,
                        "rope_scaling": None, "rope_theta": 10000.0, "rope_interleaved": False,
                        "tie_word_embeddings": False, "use_cache": True, "vocab_size": 132},
        # transformers' Idefics3Config default pad id (saved by transformers 5 as _pad_token_id): never null,
        # which the fork's strict parser would refuse
        "image_token_id": IMAGE_TOKEN, "pad_token_id": 128002, "scale_factor": 2, "vocab_size": 132}
    assert list(mc) == ["vision_config", "text_config", "image_token_id", "pad_token_id", "scale_factor", "vocab_size"]
    assert sorted(mc["text_config"]) == sorted(LLAMA_FIELDS)
    cfg = yaml.safe_load((nt / "config.yaml").read_text())
    assert cfg["model"] == {"ddp_bucket_cap_mb": 25, "dtype": "float32", "init_method": {"path": str(nt.resolve())},
                            "make_vocab_size_divisible_by": 1, "model_config": mc}
    assert cfg["parallelism"]["tp"] == 2 and cfg["parallelism"]["pp"] == 1
    assert json.loads((nt / "checkpoint_metadata.json").read_text())["version"] == "1.4"
    # config.json beside it: the HF config as it was, which is what undoes the padding
    sidecar = json.loads((nt / "config.json").read_text())
    original = json.loads((hf_src / "config.json").read_text())
    assert sidecar == original


# --- vocabulary padding ------------------------------------------------------------------------------

def test_padded_vocabulary_size():
    def rows(vocab, tp):
        return vocab_rows(model_from_hf_config({"model_type": "idefics3", "text_config": dict(TEXT, vocab_size=vocab),
                                                "vision_config": VISION}, "cfg"), tp)

    assert [rows(128259, tp) for tp in (1, 2, 4, 8)] == [128260, 128260, 128260, 128264]
    assert [rows(128256, tp) for tp in (1, 2, 4, 8)] == [128256] * 4  # a multiple already: unpadded
    assert rows(131, 3) == 132 and rows(133, 3) == 144  # multiples of lcm(4, 3) = 12


def test_padding_rows_are_zero_and_undone(hf_src, src_logits, tmp_path):
    nt = tmp_path / "nt"
    plan = weightport.convert(hf_src, nt, "nanotron", tp=4)
    assert "note:    vocabulary padded from 131 to 132 rows (a multiple of lcm(4, TP=4)) with zero rows in the " \
           "embedding and the lm_head; config.json keeps the true size, so reading back drops them" in plan.render()
    hf = load_file(hf_src / "model.safetensors")
    for stem, name in ((f"{CE}/text_embeddings/token_embedding/model_weight", "model.text_model.embed_tokens.weight"),
                       ("model/model/lm_head/pp_block/model_weight", "lm_head.weight")):
        last, _ = _read(nt / f"{stem}{SHARD.format(r=3, T=4)}")  # rows 99..131
        assert last.shape == (33, 64) and torch.equal(last[:32], hf[name][99:]) and not last[32:].any()
    # without config.json the padded vocabulary is kept, and said so; transformers still runs it
    (nt / "config.json").unlink()
    plan = weightport.convert(nt, tmp_path / "padded", "hf")
    assert any("vocabulary kept as stored (132 rows, padding included)" in n for n in plan.source.notes)
    back = load_file(tmp_path / "padded" / "model.safetensors")
    assert back["lm_head.weight"].shape == (132, 64) and not back["lm_head.weight"][131:].any()
    assert torch.equal(back["model.text_model.embed_tokens.weight"][:131], hf["model.text_model.embed_tokens.weight"])
    logits = idefics3_logits(tmp_path / "padded")
    # a 132-row lm_head matmul may round the last bit differently (BLAS blocks by shape)
    assert (logits[..., :131] - src_logits).abs().max() < 1e-6 and not logits[..., 131:].any()


def test_vocabulary_already_a_multiple_is_not_padded(tmp_path):
    src = build_idefics3(tmp_path / "v132", vocab_size=132)
    plan = weightport.convert(src, tmp_path / "nt", "nanotron", tp=4)
    assert "pad_rows" not in plan.render() and not plan.notes
    assert json.loads((tmp_path / "nt" / "model_config.json").read_text())["vocab_size"] == 132
    weightport.convert(tmp_path / "nt", tmp_path / "back", "hf")
    assert_same_tensors(load_file(src / "model.safetensors"), tmp_path / "back")


# --- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp, pp, vision, text, match", [
    (2, 1, dict(image_size=24), {}, r"--tp 2 does not divide the 9 vision positions of "
                                    r"model\.vision_model\.embeddings\.position_embedding\.weight"),
    (4, 1, dict(num_attention_heads=2), {}, r"--tp 4 does not divide vision_config num_attention_heads \(2\)"),
    (3, 1, {}, {}, r"--tp 3 does not divide text_config num_attention_heads \(8\)"),
    (4, 1, {}, dict(num_key_value_heads=2), r"--tp 4 does not divide text_config num_key_value_heads \(2\)"),
    (4, 1, dict(intermediate_size=50), {}, r"--tp 4 does not divide the vision intermediate_size \(50\) of "
                                           r"model\.combined_embeddings\.pp_block\.vision_model\.encoder\.0\.mlp\.fc1"),
    (1, 2, {}, {}, r"--pp 2: weightport writes Nanotron's Idefics3 at PP=1 only"),
    (1, 1, dict(hidden_act="gelu"), {}, r"vision_config hidden_act 'gelu': Nanotron's Idefics3 vision MLP always uses"),
    (1, 1, {}, dict(attention_bias=True), r"attention_bias=true: Nanotron's Llama has no bias parameters"),
])
def test_what_nanotron_cannot_hold_is_refused_with_nothing_written(tmp_path, tp, pp, vision, text, match):
    src = build_idefics3(tmp_path / "src", vision=vision, **text)
    _refused(src, tmp_path, match, to="nanotron", tp=tp, pp=pp)


@pytest.mark.parametrize("edit, match", [
    (lambda mc: mc["vision_config"].update(use_flash=True), "unknown Idefics3VisionConfig key 'use_flash'"),
    (lambda mc: mc.update(image_seq_len=4), "unknown Idefics3Config key 'image_seq_len'"),
    (lambda mc: mc["text_config"].update(sliding_window=8), "text_config: unknown LlamaConfig key 'sliding_window'"),
    (lambda mc: mc.update(llama_config=mc.pop("text_config")), "llama_config is from a Nanotron fork before commit"),
    (lambda mc: mc["vision_config"].update(is_using_mup=True), "is_using_mup=true"),
])
def test_unknown_or_unsupported_config_is_refused(hf_src, tmp_path, edit, match):
    nt = tmp_path / "nt"
    weightport.convert(hf_src, nt, "nanotron")
    mc = json.loads((nt / "model_config.json").read_text())
    edit(mc)
    (nt / "model_config.json").write_text(json.dumps(mc))
    _refused(nt, tmp_path, match)


def test_reads_config_yaml_alone(hf_src, src_logits, tmp_path):
    nt = tmp_path / "nt"
    weightport.convert(hf_src, nt, "nanotron", tp=2)
    (nt / "model_config.json").unlink()
    weightport.convert(nt, tmp_path / "back", "hf")
    assert_same_tensors(load_file(hf_src / "model.safetensors"), tmp_path / "back")
