"""Qwen and Qwen-VL, first generation (remote-code QWenLMHeadModel) <-> MindFormers `--model qwen` /
`qwenvl`, checked by the real MindSpore loader.

The modeling code of these checkpoints lives on the Hugging Face Hub, not in transformers, so
there is no transformers model to run and no logits to compare: the source directory is written
here from the names and shapes of modeling_qwen.py (and Qwen-VL's visual.py), spelled out below
independently of weightport's declaration. MindFormers' converters (research/qwen and
research/qwenvl, never in its wheel) are described, not run: `_expected` and `_expected_vl` follow
their convert_weight.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import weightport
from conftest import ckpt_names, run_cli
from weightport.errors import WeightportError
from weightport.verify import verify

CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16,
    "intermediate_size": 192, "vocab_size": 128, "no_bias": True, "layer_norm_epsilon": 1e-6,
    "seq_length": 32, "max_position_embeddings": 64, "rotary_pct": 1.0, "rotary_emb_base": 10000,
    "use_dynamic_ntk": True, "use_logn_attn": True, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def _state_dict_order(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """modeling_qwen.py's state_dict(): module order. w1 and w2 are intermediate_size // 2 wide;
    c_attn is Linear(hidden, 3 * kv_channels * heads) with a bias, c_proj Linear(hidden, kv_channels
    * heads), and with no_bias false c_proj and the MLP have biases too."""
    E, V, ff = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"] // 2
    P = cfg["kv_channels"] * cfg["num_attention_heads"]
    bias = not cfg["no_bias"]
    out = [("transformer.wte.weight", (V, E))]
    for l in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{l}"
        out += [(f"{p}.ln_1.weight", (E,)), (f"{p}.attn.c_attn.weight", (3 * P, E)),
                (f"{p}.attn.c_attn.bias", (3 * P,)), (f"{p}.attn.c_proj.weight", (P, E))]
        out += [(f"{p}.attn.c_proj.bias", (P,))] * bias + [(f"{p}.ln_2.weight", (E,))]
        for m, shape in (("w1", (ff, E)), ("w2", (ff, E)), ("c_proj", (E, ff))):
            out += [(f"{p}.mlp.{m}.weight", shape)] + [(f"{p}.mlp.{m}.bias", shape[:1])] * bias
    return out + [("transformer.ln_f.weight", (E,)), ("lm_head.weight", (V, E))]


def build_qwen(path, cfg=CONFIG):
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(11)
    tensors = {n: torch.randn(s, generator=g) for n, s in _state_dict_order(cfg)}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _expected(hf: dict[str, torch.Tensor], cfg=CONFIG) -> dict[str, torch.Tensor]:
    """MindFormers' qwen names, values and order, as research/qwen/convert_weight.py makes them:
    its _name_replace on every state_dict() name, in order, and c_attn cut into three equal parts."""
    out = {}
    for name, _ in _state_dict_order(cfg):
        t = hf[name]
        for a, b in ((".h.", ".layers."), (".wte.weight", ".wte.embedding_weight"), ("attn.c_proj.", "attention.wo."),
                     ("ln_1.", "attention_norm."), ("ln_2.", "ffn_norm."), ("mlp.w1.", "feed_forward.w1."),
                     ("mlp.w2.", "feed_forward.w3."), ("mlp.c_proj.", "feed_forward.w2.")):
            name = name.replace(a, b)
        if "attn.c_attn." in name:
            for part, x in zip(("wq", "wk", "wv"), t.chunk(3)):
                out[name.replace("attn.c_attn.", f"attention.{part}.")] = x
        else:
            out[name] = t
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_qwen_loads_in_mindspore_and_comes_back_exact(tmp_path, mindspore_peer):
    hf = build_qwen(tmp_path / "hf")
    src = load_file(hf / "model.safetensors")
    expected = _expected(src)
    ms = tmp_path / "ms"
    weightport.convert(hf, ms, "mindspore")

    # what MindSpore reads: MindFormers' names in its converter's order, shapes, dtype and values
    (loaded,) = mindspore_peer([{"op": "load", "path": str(ms / "model.ckpt"), "out_dir": str(tmp_path / "npy")}],
                               tmp_path)
    assert [p["name"] for p in loaded["params"]] == list(expected)
    for p in loaded["params"]:
        assert p["shape"] == list(expected[p["name"]].shape) and p["dtype"] == "Float32", p["name"]
        assert np.array_equal(np.load(p["npy"]), expected[p["name"]].numpy()), p["name"]
    # the gated branch: Hugging Face mlp.w2 goes through silu, as MindFormers' feed_forward.w3 does
    assert torch.equal(expected["transformer.layers.1.feed_forward.w3.weight"], src["transformer.h.1.mlp.w2.weight"])

    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())
    mc = mf["model"]["model_config"]
    assert mf["weightport"] == {"layout": "separate", "hf_architecture": "QWenLMHeadModel"}
    assert (mc["type"], mf["model"]["arch"]["type"]) == ("QwenConfig", "QwenForCausalLM")
    assert {k: mc[k] for k in ("num_layers", "num_heads", "hidden_size", "intermediate_size", "vocab_size")} == \
        {"num_layers": 2, "num_heads": 4, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 128}

    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert plan.source.variant == ".ckpt, separate layout" and plan.dropped == []
    plan.source.close()
    weightport.convert(ms, tmp_path / "back", "hf")
    _assert_same(load_file(tmp_path / "back" / "model.safetensors"), src)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["intermediate_size"] == 192
    assert verify(hf, ms, tensors_only=True).equivalent

    # with only the yaml beside it, the config comes back from the yaml
    (ms / "config.json").unlink()
    assert verify(hf, ms, tensors_only=True).equivalent


def test_qwen_reads_a_file_mindformers_wrote(tmp_path, mindspore_peer):
    """A .ckpt written by MindSpore's own save_checkpoint, in the converter's names and order, with
    the model yaml MindFormers ships (no config.json, no weightport record)."""
    hf = build_qwen(tmp_path / "hf")
    src = load_file(hf / "model.safetensors")
    params = []
    for i, (name, t) in enumerate(_expected(src).items()):
        np.save(tmp_path / f"{i}.npy", t.numpy())
        params.append({"name": name, "npy": str(tmp_path / f"{i}.npy"), "dtype": None})
    ms = tmp_path / "ms"
    ms.mkdir()
    (result,) = mindspore_peer([{"op": "save", "path": str(ms / "qwen.ckpt"), "params": params}], tmp_path)
    assert "error" not in result, result
    (ms / "predict_qwen.yaml").write_text(yaml.safe_dump({"model": {"model_config": {
        "type": "QwenConfig", "auto_register": "qwen_config.QwenConfig", "seq_length": 32, "hidden_size": 64,
        "num_layers": 2, "num_heads": 4, "vocab_size": 128, "intermediate_size": 96, "rms_norm_eps": 1.0e-6,
        "rotary_pct": 1.0, "rotary_emb_base": 10000, "kv_channels": 16},
        "arch": {"type": "QwenForCausalLM", "auto_register": "qwen_model.QwenForCausalLM"}}}))
    weightport.convert(ms, tmp_path / "back", "hf")
    _assert_same(load_file(tmp_path / "back" / "model.safetensors"), src)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (cfg["model_type"], cfg["intermediate_size"], cfg["kv_channels"], cfg["no_bias"]) == ("qwen", 192, 16, True)


@pytest.mark.parametrize("key", ["qwen", "qwenvl"])
def test_qwen_mindformers_command_line(tmp_path, key):
    build, expected = (build_qwen, _expected) if key == "qwen" else (build_qwen_vl, _expected_vl)
    hf = build(tmp_path / "hf")
    out = tmp_path / "out" / f"{key}.ckpt"
    out.parent.mkdir()
    proc = run_cli("mindformers", "--model", key, "--input_path", hf, "--output_path", out)
    assert proc.returncode == 0, proc.stderr
    assert ckpt_names(out) == list(expected(load_file(hf / "model.safetensors")))
    rev = tmp_path / "rev"
    proc = run_cli("mindformers", "--model", key, "--reversed", "--input_path", out, "--output_path", rev)
    assert proc.returncode == 0, proc.stderr
    _assert_same(load_file(rev / "model.safetensors"), load_file(hf / "model.safetensors"))
    other = run_cli("mindformers", "--model", "llama", "--input_path", hf, "--output_path", tmp_path / "l.ckpt")
    assert other.returncode != 0 and "is a qwen model (QWenLMHeadModel)" in other.stderr


@pytest.mark.parametrize("change,why", [
    ({"no_bias": False}, "has no biases on attn.c_proj or the MLP (no_bias is false)"),
    ({"kv_channels": 8}, "derives head_dim as hidden_size / num_heads = 16, but kv_channels is 8"),
    ({"rotary_pct": 0.5}, "rotates every head dimension; rotary_pct is 0.5"),
])
def test_qwen_mindspore_refuses_what_mindformers_cannot_run(tmp_path, change, why):
    hf = build_qwen(tmp_path / "hf", {**CONFIG, **change})
    with pytest.raises(WeightportError, match="MindFormers' Qwen ") as e:
        weightport.convert(hf, tmp_path / "ms", "mindspore")
    assert why in str(e.value)
    assert not (tmp_path / "ms").exists()
    # the Hugging Face side holds them all
    weightport.convert(hf, tmp_path / "copy", "hf")
    _assert_same(load_file(tmp_path / "copy" / "model.safetensors"), load_file(hf / "model.safetensors"))


# Qwen-VL: the same LLM (hidden_size is the resampler's output_dim) and visual.py's encoder
VL_CONFIG = {**CONFIG, "hidden_size": 128, "kv_channels": 32, "visual": {
    "heads": 4, "image_size": 56, "image_start_id": 120, "layers": 2, "mlp_ratio": 2.5, "output_dim": 128,
    "patch_size": 14, "width": 48}}


def _visual_order(v) -> list[tuple[str, tuple[int, ...]]]:
    """visual.py's VisionTransformer under transformer.visual, in named_parameters() order (a module's
    own parameters before its children's): in_proj is Linear(w, 3w), the resampler an
    nn.MultiheadAttention (in_proj_weight / in_proj_bias / out_proj) after kv_proj = Linear(w, out, bias=False)."""
    w, out, mlp, V = v["width"], v["output_dim"], int(v["width"] * v["mlp_ratio"]), "transformer.visual"
    t = [(f"{V}.positional_embedding", (256, w)), (f"{V}.proj", (out, out)), (f"{V}.conv1.weight", (w, 3, 14, 14)),
         (f"{V}.ln_pre.weight", (w,)), (f"{V}.ln_pre.bias", (w,))]
    for l in range(v["layers"]):
        b = f"{V}.transformer.resblocks.{l}"
        t += [(f"{b}.ln_1.weight", (w,)), (f"{b}.ln_1.bias", (w,)),
              (f"{b}.ln_2.weight", (w,)), (f"{b}.ln_2.bias", (w,)),
              (f"{b}.attn.in_proj.weight", (3 * w, w)), (f"{b}.attn.in_proj.bias", (3 * w,)),
              (f"{b}.attn.out_proj.weight", (w, w)), (f"{b}.attn.out_proj.bias", (w,)),
              (f"{b}.mlp.c_fc.weight", (mlp, w)), (f"{b}.mlp.c_fc.bias", (mlp,)),
              (f"{b}.mlp.c_proj.weight", (w, mlp)), (f"{b}.mlp.c_proj.bias", (w,))]
    p = f"{V}.attn_pool"
    return t + [(f"{p}.pos_embed", (256, out)), (f"{p}.query", (256, out)), (f"{p}.kv_proj.weight", (out, w)),
                (f"{p}.attn.in_proj_weight", (3 * out, out)), (f"{p}.attn.in_proj_bias", (3 * out,)),
                (f"{p}.attn.out_proj.weight", (out, out)), (f"{p}.attn.out_proj.bias", (out,)),
                (f"{p}.ln_q.weight", (out,)), (f"{p}.ln_q.bias", (out,)), (f"{p}.ln_kv.weight", (out,)),
                (f"{p}.ln_kv.bias", (out,)), (f"{V}.ln_post.weight", (out,)), (f"{V}.ln_post.bias", (out,))]


def _vl_order(cfg=VL_CONFIG):
    llm = _state_dict_order(cfg)
    return llm[:-1] + _visual_order(cfg["visual"]) + llm[-1:]  # QWenModel builds visual after ln_f


def build_qwen_vl(path, cfg=VL_CONFIG):
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(13)
    save_file({n: torch.randn(s, generator=g) for n, s in _vl_order(cfg)}, path / "model.safetensors",
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _expected_vl(hf, cfg=VL_CONFIG, qkv_concat=False) -> dict[str, torch.Tensor]:
    """research/qwenvl/convert_weight.py's output, restated: its name rules (substring tests
    included) and splits, in named_parameters() order."""
    heads, out = cfg["visual"]["heads"], {}
    for name, _ in _vl_order(cfg):
        t = hf[name]
        if "visual" not in name:
            continue
        name = "vision_encoder." + name.replace("transformer.visual.", "")
        if "attn_pool" in name and "ln" in name:
            out[name.replace("weight", "gamma").replace("bias", "beta")] = t
        elif "attn_pool" in name and "in_proj_" in name:
            for i, x in enumerate(t.chunk(3)):
                d = f"dense{i + 1}"
                out[name.replace("in_proj_weight", f"{d}.weight").replace("in_proj_bias", f"{d}.bias")] = x
        elif "attn" in name and "in_proj" in name:  # per head [q, k, v]: every third chunk of 3 * heads
            chunks = t.chunk(3 * heads)
            for i in range(3):
                out[name.replace("in_proj", f"dense{i + 1}")] = torch.cat(chunks[i::3])
        elif "attn" in name and "out_proj" in name:
            out[name.replace("out_proj", "projection")] = t.T if name.endswith("weight") else t
        elif "ln" in name:
            out[name.replace("weight", "gamma").replace("bias", "beta")] = t
        else:
            out[name] = t
    llm = {}
    for n, t in _expected(hf, cfg).items():  # --use_qkv_concat keeps c_attn whole, as attention.w
        part = n.split(".")[-2] if ".attention.w" in n else None
        if qkv_concat and part in ("wq", "wk", "wv"):
            if part == "wq":
                l, w = n.split(".")[2], n.split(".")[-1]
                llm[f"transformer.layers.{l}.attention.w.{w}"] = hf[f"transformer.h.{l}.attn.c_attn.{w}"]
            continue
        llm[n] = t
    head = llm.pop("lm_head.weight")
    return {**{"llm_model." + n: t for n, t in llm.items()}, **out, "llm_model.lm_head.weight": head}


@pytest.mark.parametrize("layout", ["separate", "fused"])
def test_qwen_vl_loads_in_mindspore_and_comes_back_exact(tmp_path, mindspore_peer, layout):
    hf = build_qwen_vl(tmp_path / "hf")
    src = load_file(hf / "model.safetensors")
    expected = _expected_vl(src, qkv_concat=layout == "fused")
    ms = tmp_path / "ms"
    weightport.convert(hf, ms, "mindspore", layout=layout)

    (loaded,) = mindspore_peer([{"op": "load", "path": str(ms / "model.ckpt"), "out_dir": str(tmp_path / "npy")}],
                               tmp_path)
    assert [p["name"] for p in loaded["params"]] == list(expected)
    for p in loaded["params"]:
        assert p["shape"] == list(expected[p["name"]].shape) and p["dtype"] == "Float32", p["name"]
        assert np.array_equal(np.load(p["npy"]), expected[p["name"]].numpy()), p["name"]

    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())
    mc = mf["model"]["model_config"]
    assert (mc["type"], mf["model"]["arch"]["type"]) == ("QwenVLConfig", "QwenVL")
    assert mc["llm_model"]["model_config"]["qkv_concat"] is (layout == "fused")
    vc = mc["vision_model"]["model_config"]
    assert (vc["hidden_size"], vc["intermediate_size"], vc["num_attention_heads"]) == (48, 120, 4)

    weightport.convert(ms, tmp_path / "back", "hf")
    _assert_same(load_file(tmp_path / "back" / "model.safetensors"), src)
    assert verify(hf, ms, tensors_only=True).equivalent
    # from MindFormers' yaml alone (no config.json, no weightport record): qkv_concat says the layout
    (ms / "config.json").unlink()
    del mf["weightport"]
    (ms / "mindformers.yaml").write_text(yaml.safe_dump(mf))
    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert plan.source.variant == f".ckpt, {layout} layout" and plan.dropped == []
    plan.source.close()
    assert verify(hf, ms, tensors_only=True).equivalent


def test_qwen_drops_the_buffers_its_model_ignores(tmp_path):
    """QWenLMHeadModel's _keys_to_ignore_on_load_*: a file holding them still converts, without them."""
    hf = build_qwen(tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    src = dict(tensors)
    tensors["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    plan = weightport.plan_conversion(hf, tmp_path / "ms", "mindspore")
    assert sorted(plan.dropped) == [("transformer.h.0.attn.rotary_emb.inv_freq", "recomputed by the model"),
                                    ("transformer.h.1.attn.masked_bias", "recomputed by the model")]
    plan.source.close()
    weightport.convert(hf, tmp_path / "ms", "mindspore")
    weightport.convert(tmp_path / "ms", tmp_path / "back", "hf")
    _assert_same(load_file(tmp_path / "back" / "model.safetensors"), src)


def test_qwen_fused_layout_is_qwen_vl_only(tmp_path):
    hf = build_qwen(tmp_path / "hf")
    with pytest.raises(WeightportError, match="layout fused is Qwen-VL's"):
        weightport.convert(hf, tmp_path / "ms", "mindspore", layout="fused")
