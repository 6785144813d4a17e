"""CogVLM2 (THUDM's remote-code image and video checkpoints) <-> MindFormers cogvlm2, against the real
MindSpore loader.

The modeling code of these checkpoints lives on the Hugging Face Hub, not in transformers, so there
is no transformers model to run and no logits to compare: the source directory is written here from
the names and shapes of modeling_cogvlm.py and visual.py, spelled out below independently of
weightport's declaration, and the expected MindFormers tensors are worked out here from what
MindFormers' cogvlm2 convert_weight.py does. Its model code was removed from MindFormers in June
2025 (the installed 2.0.0 has none); tests/test_mindformers_peer.py runs the converter itself from
the mindformers 1.3.2 wheel on these inputs.

The Hub's config.json has no model_type (CogVLMConfig declares none); weightport then takes the
architecture from `architectures`, which test_hub_config_without_model_type checks; the other
tests add the model_type.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import weightport
from conftest import assert_mindspore_holds, ckpt_names, run_cli
from weightport.verify import verify

VISION = {"dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": 8, "in_channels": 3,
          "intermediate_size": 48, "layer_norm_eps": 1e-6, "num_heads": 4, "num_hidden_layers": 2,
          "num_positions": 5, "patch_size": 4}
BASE = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_multi_query_heads": 2, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "float32", "vocab_size": 128, "vision_config": VISION}
CONFIGS = {
    "image": {"architectures": ["CogVLMForCausalLM"], "model_type": "cogvlm2", "template_version": "chat",
              "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                           "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"}, **BASE},
    "video": {"architectures": ["CogVLMVideoForCausalLM"], "model_type": "cogvlm2_video", "template_version": "base",
              "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                           "AutoModelForCausalLM": "modeling_cogvlm.CogVLMVideoForCausalLM"}, **BASE},
}
MODALS = list(CONFIGS)
HD = BASE["hidden_size"] // BASE["num_attention_heads"]


def _hub_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """What the Hub's modeling_cogvlm.py / visual.py save, with FastRotaryEmbedding's inv_freq buffer."""
    E, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = E // cfg["num_attention_heads"]
    qkv = E + 2 * cfg["num_multi_query_heads"] * hd
    vc = cfg["vision_config"]
    H, VI, P = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    image = cfg["architectures"] == ["CogVLMForCausalLM"]
    out = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,), "lm_head.weight": (V, E)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        experts = ("language", "vision") if image else ("language",)
        out |= {f"{p}.input_layernorm.weight": (E,), f"{p}.post_attention_layernorm.weight": (E,),
                f"{p}.self_attn.rotary_emb.inv_freq": (hd // 2,)}
        for e in experts:
            out |= {f"{p}.self_attn.{e}_expert_query_key_value.weight": (qkv, E),
                    f"{p}.self_attn.{e}_expert_dense.weight": (E, E),
                    f"{p}.mlp.{e}_mlp.gate_proj.weight": (I, E), f"{p}.mlp.{e}_mlp.up_proj.weight": (I, E),
                    f"{p}.mlp.{e}_mlp.down_proj.weight": (E, I)}
        if image:  # the vision expert's qkv alone has a bias
            out[f"{p}.self_attn.vision_expert_query_key_value.bias"] = (qkv,)
    v = "model.vision"
    out |= {f"{v}.patch_embedding.proj.weight": (H, vc["in_channels"], P, P), f"{v}.patch_embedding.proj.bias": (H,),
            f"{v}.patch_embedding.cls_embedding": (1, H),
            f"{v}.patch_embedding.position_embedding.weight": (vc["num_positions"], H),
            f"{v}.linear_proj.linear_proj.weight": (E, H), f"{v}.linear_proj.norm1.weight": (E,),
            f"{v}.linear_proj.norm1.bias": (E,), f"{v}.linear_proj.dense_h_to_4h.weight": (I, E),
            f"{v}.linear_proj.gate_proj.weight": (I, E), f"{v}.linear_proj.dense_4h_to_h.weight": (E, I),
            f"{v}.conv.weight": (H, H, 2, 2), f"{v}.conv.bias": (H,),
            f"{v}.boi": (1, 1, E), f"{v}.eoi": (1, 1, E)}
    for l in range(vc["num_hidden_layers"]):
        p = f"{v}.transformer.layers.{l}"
        for m, shape in (("input_layernorm", (H,)), ("post_attention_layernorm", (H,)),
                         ("attention.query_key_value", (3 * H, H)), ("attention.dense", (H, H)),
                         ("mlp.fc1", (VI, H)), ("mlp.fc2", (H, VI))):
            out |= {f"{p}.{m}.weight": shape, f"{p}.{m}.bias": shape[:1]}
    return out


def build_cogvlm2(path, modal, cfg=None, dtype=torch.float32):
    cfg = cfg or CONFIGS[modal]
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(11)
    tensors = {n: torch.randn(s, generator=g).to(dtype) for n, s in _hub_tensors(cfg).items()}
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = 1.0 / (500000 ** (torch.arange(0, hd, 2).float() / hd))
    tensors |= {n: inv_freq.clone() for n in tensors if n.endswith("rotary_emb.inv_freq")}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _expected(hf: dict, modal: str) -> dict[str, torch.Tensor]:
    """MindFormers' names and values, by its cogvlm2 convert_weight.py's renames (--modal image|video),
    without the rotary inv_freq it copies once as llm_model.model.freqs_mgr.freqs."""
    kv = BASE["num_multi_query_heads"] * HD
    out = {}
    for name, t in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "model.vision.patch_embedding.cls_embedding":
            out["vision_encoder.cls_token"] = t.unsqueeze(0)
        elif name == "model.vision.patch_embedding.position_embedding.weight":
            out["vision_encoder.pos_embed"] = t.unsqueeze(0)
        elif name.startswith("model.vision.patch_embedding."):
            out[name.replace("model.vision.patch_embedding", "vision_encoder.patch_embed")] = t
        elif name.startswith("model.vision.transformer.layers."):
            n = name.replace("model.vision.transformer.layers", "vision_encoder.blocks")
            for a, b in (("attention.dense", "attn.proj"), ("attention.query_key_value", "attn.qkv"),
                         ("input_layernorm.weight", "norm1.gamma"), ("input_layernorm.bias", "norm1.beta"),
                         ("post_attention_layernorm.weight", "norm2.gamma"),
                         ("post_attention_layernorm.bias", "norm2.beta")):
                n = n.replace(a, b)
            out[n] = t
        elif name.startswith("model.vision."):
            n = name.replace("model.vision", "mlp_adapter")
            out[n.replace("norm1.weight", "norm1.gamma").replace("norm1.bias", "norm1.beta")] = t
        elif name == "model.embed_tokens.weight":
            out["llm_model.model.tok_embeddings.embedding_weight"] = t
        elif modal == "video" and name.endswith("language_expert_query_key_value.weight"):
            base = "llm_model." + name.replace("self_attn.language_expert_query_key_value", "attention.w")
            q, k, v = t.split([BASE["hidden_size"], kv, kv])
            out |= {base.replace("w.weight", "wq.weight"): q, base.replace("w.weight", "wk.weight"): k,
                    base.replace("w.weight", "wv.weight"): v}
        else:
            n = "llm_model." + name.replace("model.norm.weight", "model.norm_out.weight")
            pairs = [(f"{e}_mlp.{h}", f"{e}_mlp.{m}") for e in ("language", "vision")
                     for h, m in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
            if modal == "video":
                pairs = [("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"),
                         ("self_attn.language_expert_dense", "attention.wo"),
                         ("mlp.language_mlp.gate_proj", "feed_forward.w1"),
                         ("mlp.language_mlp.up_proj", "feed_forward.w3"),
                         ("mlp.language_mlp.down_proj", "feed_forward.w2")]
            for a, b in pairs:
                n = n.replace(a, b)
            out[n] = t
    return out


def _without_inv_freq(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


@pytest.mark.parametrize("modal", MODALS)
def test_cogvlm2_to_mindspore_and_back(tmp_path, mindspore_peer, modal):
    hf = build_cogvlm2(tmp_path / "hf", modal)
    src = load_file(hf / "model.safetensors")
    ms = tmp_path / "ms"
    weightport.convert(hf, ms, "mindspore")
    expected = _expected(src, modal)
    # the names MindFormers' model has, e.g. both experts kept fused (image) or Llama's wq/wk/wv (video)
    assert ("llm_model.model.layers.1.self_attn.vision_expert_query_key_value.bias" in expected) == (modal == "image")
    assert ("llm_model.model.layers.1.attention.wk.weight" in expected) == (modal == "video")
    assert expected["vision_encoder.pos_embed"].shape == (1, 5, 32)
    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, expected, "Float32")

    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())
    assert mf["model"]["arch"]["type"] == {"image": "CogVLM2ImageForCausalLM", "video": "CogVLM2ForCausalLM"}[modal]
    assert mf["model"]["model_config"]["vision_model"]["model_config"]["image_size"] == 8

    weightport.convert(ms, tmp_path / "back", "hf")
    back = load_file(tmp_path / "back" / "model.safetensors")
    want = _without_inv_freq(src)  # recomputed by the model; weightport leaves it out
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_cfg["architectures"] == CONFIGS[modal]["architectures"]
    plan = weightport.plan_conversion(hf, tmp_path / "x", "mindspore")
    assert sorted(plan.dropped) == [(f"model.layers.{l}.self_attn.rotary_emb.inv_freq", "recomputed by the model")
                                    for l in range(2)]
    plan.source.close()
    assert verify(hf, ms, tensors_only=True).equivalent


@pytest.mark.parametrize("modal", MODALS)
def test_cogvlm2_reads_a_file_as_mindformers_writes_it(tmp_path, mindspore_peer, modal):
    """MindSpore's own save_checkpoint, with the FreqsMgr parameter MindFormers' converter adds and
    only a MindFormers yaml beside it (no config.json): read back to the Hugging Face tensors."""
    hf = build_cogvlm2(tmp_path / "hf", modal)
    src = load_file(hf / "model.safetensors")
    ours = tmp_path / "ours"
    weightport.convert(hf, ours, "mindspore")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    params = []
    freqs = src["model.layers.0.self_attn.rotary_emb.inv_freq"]
    stored = {**_expected(src, modal), "llm_model.model.freqs_mgr.freqs": freqs}
    for i, (name, t) in enumerate(stored.items()):
        np.save(tmp_path / f"{i}.npy", t.numpy())
        params.append({"name": name, "npy": str(tmp_path / f"{i}.npy"), "dtype": None})
    (saved,) = mindspore_peer([{"op": "save", "path": str(theirs / "cogvlm2.ckpt"), "params": params}], tmp_path)
    assert saved == {"ok": True}
    mf = yaml.safe_load((ours / "mindformers.yaml").read_text())
    del mf["weightport"]
    (theirs / "predict_cogvlm2.yaml").write_text(yaml.safe_dump(mf))

    plan = weightport.plan_conversion(theirs, tmp_path / "x", "hf")
    assert plan.dropped == [("llm_model.model.freqs_mgr.freqs", "recomputed by the model")]
    assert plan.source.model.arch.name == {"image": "cogvlm2", "video": "cogvlm2_video"}[modal]
    plan.source.close()
    weightport.convert(theirs, tmp_path / "back", "hf")
    back = load_file(tmp_path / "back" / "model.safetensors")
    want = _without_inv_freq(src)
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["vision_config"]["num_positions"] == VISION["num_positions"]
    assert cfg["num_multi_query_heads"] == BASE["num_multi_query_heads"]


@pytest.mark.parametrize("modal", MODALS)
def test_cogvlm2_mindformers_command_line(tmp_path, modal):
    """MindFormers' converter is one-way (its reversed_convert_map has no cogvlm2); weightport does both."""
    hf = build_cogvlm2(tmp_path / "hf", modal)
    out = tmp_path / "out" / "cogvlm2.ckpt"
    out.parent.mkdir()
    other = "image" if modal == "video" else "video"
    proc = run_cli("mindformers", "--model", "cogvlm2", "--modal", other, "--input_path", hf, "--output_path", out)
    assert proc.stderr == f"weightport: error: --modal {other}: {hf} is a CogVLM2 {modal} model\n"
    proc = run_cli("mindformers", "--model", "cogvlm2", "--modal", modal, "--input_path", hf, "--output_path", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(ckpt_names(out)) == sorted(_expected(load_file(hf / "model.safetensors"), modal))
    rev = tmp_path / "rev"
    proc = run_cli("mindformers", "--model", "cogvlm2", "--reversed", "--input_path", out, "--output_path", rev)
    assert proc.returncode == 0, proc.stderr
    src = _without_inv_freq(load_file(hf / "model.safetensors"))
    back = load_file(rev / "model.safetensors")
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)

    # reversed with MindFormers' own yaml (--config) in place of the config.json and our yaml
    (out.parent / "config.json").unlink()
    mf = yaml.safe_load((out.parent / "mindformers.yaml").read_text())
    (out.parent / "mindformers.yaml").unlink()
    del mf["weightport"]
    config = tmp_path / "predict_cogvlm2.yaml"
    config.write_text(yaml.safe_dump(mf))
    (out.parent / config.name).write_text(config.read_text())
    rev2 = tmp_path / "rev2"
    proc = run_cli("mindformers", "--model", "cogvlm2", "--reversed", "--input_path", out, "--output_path", rev2,
                   "--config", config)
    assert proc.returncode == 0, proc.stderr
    back = load_file(rev2 / "model.safetensors")
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)


def test_cogvlm2_refuses_what_mindformers_cannot_hold(tmp_path):
    """MindFormers' EVA sizes its position table from image_size / patch_size."""
    cfg = {**CONFIGS["image"], "vision_config": {**VISION, "image_size": 12}}
    hf = build_cogvlm2(tmp_path / "hf", "image", cfg)
    proc = run_cli("convert", hf, tmp_path / "ms", "--to", "mindspore")
    assert proc.returncode != 0
    assert "(image_size / patch_size)^2 + 1 = 10 positions, but vision_config.num_positions is 5" in proc.stderr


@pytest.mark.parametrize("modal", MODALS)
def test_hub_config_without_model_type(tmp_path, modal):
    cfg = {k: v for k, v in CONFIGS[modal].items() if k != "model_type"}
    src = build_cogvlm2(tmp_path / "hf", modal, cfg)
    info = weightport.inspect(src)
    assert info.arch == CONFIGS[modal]["model_type"]
