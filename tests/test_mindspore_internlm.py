"""InternLM (1) and InternLM2 (remote-code checkpoints) <-> MindFormers' internlm / internlm2 names,
checked by the real MindSpore loader.

Their modeling code lives on the Hugging Face Hub, not in transformers, so there is no model to
run here: each source directory is written from the names and shapes of modeling_internlm.py /
modeling_internlm2.py spelled out below, and the MindFormers tensors are computed in this file
from what MindFormers' research/internlm{,2}/convert_weight.py do.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import weightport
from conftest import apply_rules, assert_mindspore_holds, assert_same_tensors, ckpt_names, run_cli
from weightport.archs import model_from_hf_config
from weightport.formats.mindspore.families import names_for
from weightport.verify import verify

E, I, V, HEADS, KV, LAYERS = 64, 96, 128, 4, 2, 2
HD = E // HEADS
INTERNLM = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm",
            "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                         "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
            "hidden_size": E, "intermediate_size": I, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
            "vocab_size": V, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu", "bias": True,
            "rotary": {"base": 10000, "type": "dynamic"}, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "torch_dtype": "float32"}
INTERNLM2 = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
             "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                          "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
             "hidden_size": E, "intermediate_size": I, "num_attention_heads": HEADS, "num_key_value_heads": KV,
             "num_hidden_layers": LAYERS, "vocab_size": V, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
             "hidden_act": "silu", "bias": False, "rope_theta": 1000000, "rope_scaling": None, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
INV_FREQ = "model.layers.{l}.self_attn.rotary_emb.inv_freq"


def internlm_state_dict(cfg=INTERNLM) -> list[tuple[str, tuple[int, ...]]]:
    """modeling_internlm.py's state_dict(), with the persistent rotary buffer internlm-7b files carry."""
    out = [("model.embed_tokens.weight", (V, E))]
    for l in range(LAYERS):
        p = f"model.layers.{l}"
        for x in "qkvo":
            out += [(f"{p}.self_attn.{x}_proj.weight", (E, E))] + ([(f"{p}.self_attn.{x}_proj.bias", (E,))]
                                                                   if cfg["bias"] else [])
        out += [(INV_FREQ.format(l=l), (HD // 2,)), (f"{p}.mlp.gate_proj.weight", (I, E)),
                (f"{p}.mlp.down_proj.weight", (E, I)), (f"{p}.mlp.up_proj.weight", (I, E)),
                (f"{p}.input_layernorm.weight", (E,)), (f"{p}.post_attention_layernorm.weight", (E,))]
    return out + [("model.norm.weight", (E,)), ("lm_head.weight", (V, E))]


def internlm2_state_dict(cfg=INTERNLM2) -> list[tuple[str, tuple[int, ...]]]:
    """modeling_internlm2.py's state_dict() (its rotary buffers are not persistent)."""
    out = [("model.tok_embeddings.weight", (V, E))]
    for l in range(LAYERS):
        p = f"model.layers.{l}"
        out += [(f"{p}.attention.wqkv.weight", ((HEADS + 2 * KV) * HD, E))]
        out += [(f"{p}.attention.wqkv.bias", ((HEADS + 2 * KV) * HD,))] if cfg["bias"] else []
        out += [(f"{p}.attention.wo.weight", (E, E))] + ([(f"{p}.attention.wo.bias", (E,))] if cfg["bias"] else [])
        out += [(f"{p}.feed_forward.w1.weight", (I, E)), (f"{p}.feed_forward.w3.weight", (I, E)),
                (f"{p}.feed_forward.w2.weight", (E, I)), (f"{p}.attention_norm.weight", (E,)),
                (f"{p}.ffn_norm.weight", (E,))]
    return out + [("model.norm.weight", (E,)), ("output.weight", (V, E))]


def build(path, spec, cfg):
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(11)
    tensors = {n: torch.randn(s, generator=g) for n, s in spec}
    for l in range(LAYERS):
        if INV_FREQ.format(l=l) in tensors:
            tensors[INV_FREQ.format(l=l)] = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def expected_internlm(hf: dict) -> dict[str, torch.Tensor]:
    """research/internlm/convert_weight.py's name_replace over state_dict(), in its order; the
    rotary buffer, which it copies too, is what weightport leaves out."""
    pairs = [("embed_tokens.weight", "tok_embeddings.embedding_weight"), (".self_attn.q_proj.", ".attention.wq."),
             (".self_attn.k_proj.", ".attention.wk."), (".self_attn.v_proj.", ".attention.wv."),
             (".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
             (".mlp.down_proj.", ".feed_forward.w2."), (".mlp.up_proj.", ".feed_forward.w3."),
             (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
             (".norm.", ".norm_out.")]
    out = {}
    for name, t in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        for a, b in pairs:
            name = name.replace(a, b)
        out[name] = t
    return out


def expected_internlm2(hf: dict, layout: str) -> dict[str, torch.Tensor]:
    """research/internlm2/convert_weight.py over named_parameters(): wqkv -> w, or with qkv_concat
    false each kv group's [q.., k, v] rows taken apart."""
    out = {}
    for name, t in hf.items():
        name = name.replace("tok_embeddings.weight", "tok_embeddings.embedding_weight").replace("wqkv", "w")
        name = name.replace(".norm.", ".norm_out.").replace("output", "lm_head")
        if ".w." in name and layout == "separate":
            groups = t.reshape(KV, HEADS // KV + 2, HD, E)
            out[name.replace(".w.", ".wq.")] = groups[:, :-2].reshape(-1, E)
            out[name.replace(".w.", ".wk.")] = groups[:, -2].reshape(-1, E)
            out[name.replace(".w.", ".wv.")] = groups[:, -1].reshape(-1, E)
        else:
            out[name] = t
    return out


def _yaml_only(ms, name):
    """Leave only a MindFormers yaml beside the .ckpt, as MindFormers' own run yaml would be."""
    (ms / "config.json").unlink()
    y = yaml.safe_load((ms / "mindformers.yaml").read_text())
    del y["weightport"]
    (ms / "mindformers.yaml").unlink()
    (ms / name).write_text(yaml.safe_dump(y))
    return y


CASES = {"internlm-separate": ("internlm", "separate"),
         "internlm2-fused-interleaved": ("internlm2", "fused-interleaved"),
         "internlm2-separate": ("internlm2", "separate")}


@pytest.mark.parametrize("case", list(CASES))
def test_internlm_to_mindspore_loads_and_comes_back_exact(tmp_path, mindspore_peer, case):
    arch, layout = CASES[case]
    cfg, spec = (INTERNLM, internlm_state_dict()) if arch == "internlm" else (INTERNLM2, internlm2_state_dict())
    hf_dir = build(tmp_path / "hf", spec, cfg)
    hf = load_file(hf_dir / "model.safetensors")
    hf = {n: hf[n] for n, _ in spec}  # in state_dict() order, which the converters keep
    expected = expected_internlm(hf) if arch == "internlm" else expected_internlm2(hf, layout)

    ms = tmp_path / "ms"
    plan = weightport.plan_conversion(hf_dir, ms, "mindspore", layout=layout)
    buffers = [(INV_FREQ.format(l=l), "recomputed by the model") for l in range(LAYERS)] if arch == "internlm" else []
    assert plan.dropped == buffers
    plan.source.close()
    weightport.convert(hf_dir, ms, "mindspore", layout=layout)
    assert ckpt_names(ms / "model.ckpt") == list(expected)
    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, expected, "Float32")

    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())
    mc = mf["model"]["model_config"]
    kind = "InternLM" if arch == "internlm" else "InternLM2"
    assert (mc["type"], mf["model"]["arch"]["type"]) == (f"{kind}Config", f"{kind}ForCausalLM")
    kv = KV if arch == "internlm2" else HEADS
    assert (mc["num_heads"], mc["n_kv_heads"], mc["intermediate_size"]) == (HEADS, kv, I)
    if arch == "internlm":
        assert (mc["has_bias"], mc["theta"]) == (True, 10000.0)
    else:
        assert (mc["qkv_concat"], mc["theta"]) == (layout == "fused-interleaved", 1000000.0)

    src = {n: t for n, t in hf.items() if not n.endswith("inv_freq")}
    weightport.convert(ms, tmp_path / "back", "hf")
    assert_same_tensors(src, tmp_path / "back")
    report = verify(hf_dir, ms, tensors_only=True)
    assert report.equivalent, report.render()

    # with only MindFormers' yaml beside it: the config and the layout come from its model_config
    _yaml_only(ms, f"predict_{arch}_7b.yaml")
    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert plan.source.variant == f".ckpt, {layout} layout"
    plan.source.close()
    weightport.convert(ms, tmp_path / "back2", "hf")
    assert_same_tensors(src, tmp_path / "back2")
    report = verify(hf_dir, tmp_path / "back2", tensors_only=True)
    assert report.equivalent, report.render()  # the config level too: bias, rotary base, kv heads came back


def test_internlm2_layout_is_read_from_the_names(tmp_path):
    """The two InternLM2 layouts differ in names, so a file without a record still reads right,
    and a record that contradicts the names is refused."""
    hf_dir = build(tmp_path / "hf", internlm2_state_dict(), INTERNLM2)
    src = load_file(hf_dir / "model.safetensors")
    for layout in ("separate", "fused-interleaved"):
        ms = tmp_path / layout
        weightport.convert(hf_dir, ms, "mindspore", layout=layout)
        (ms / "mindformers.yaml").rename(tmp_path / f"{layout}.yaml")
        weightport.convert(ms, tmp_path / f"back-{layout}", "hf")
        assert_same_tensors(src, tmp_path / f"back-{layout}")
    fused_yaml = yaml.safe_load((tmp_path / "fused-interleaved.yaml").read_text())
    del fused_yaml["weightport"]  # so only its qkv_concat: true speaks
    (tmp_path / "separate" / "run_internlm2.yaml").write_text(yaml.safe_dump(fused_yaml))
    proc = run_cli("convert", tmp_path / "separate", tmp_path / "bad", "--to", "hf")
    assert proc.returncode == 1
    want = "its names and shapes are those of layout separate, not fused-interleaved\n"
    assert proc.stderr.endswith(want), proc.stderr


def test_what_mindformers_cannot_hold_is_refused(tmp_path):
    cfg = {**INTERNLM2, "bias": True}
    hf_dir = build(tmp_path / "bias", internlm2_state_dict(cfg), cfg)
    proc = run_cli("convert", hf_dir, tmp_path / "bias-ms", "--to", "mindspore")
    assert (proc.returncode, proc.stderr) == (1, "weightport: error: MindFormers' InternLM2 has no wqkv / wo biases "
                                                 "(this config has bias: true)\n")
    assert not (tmp_path / "bias-ms").exists()
    hf_dir = build(tmp_path / "internlm", internlm_state_dict(), INTERNLM)
    proc = run_cli("convert", hf_dir, tmp_path / "x", "--to", "mindspore", "--layout", "fused-interleaved")
    assert proc.stderr == ("weightport: error: format mindspore has no layout 'fused-interleaved' for internlm "
                           "(choose one of separate)\n")


@pytest.mark.parametrize("arch", ["internlm", "internlm2"])
def test_mindformers_command_line(tmp_path, mindspore_peer, arch):
    cfg, spec = (INTERNLM, internlm_state_dict()) if arch == "internlm" else (INTERNLM2, internlm2_state_dict())
    hf_dir = build(tmp_path / "hf", spec, cfg)
    src = {n: t for n, t in load_file(hf_dir / "model.safetensors").items() if not n.endswith("inv_freq")}
    out = tmp_path / "ms" / f"{arch}.ckpt"
    out.parent.mkdir()
    proc = run_cli("mindformers", "--model", arch, "--input_path", hf_dir, "--output_path", out)
    assert proc.returncode == 0, proc.stderr
    # InternLM: wq/wk/wv always; InternLM2: wqkv kept fused by default, as its converter's own default
    assert ("model.layers.0.attention.wq.weight" in ckpt_names(out)) == (arch == "internlm")
    proc = run_cli("mindformers", "--model", arch, "--reversed", "--input_path", out,
                   "--output_path", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(src, tmp_path / "back")

    other = "internlm2" if arch == "internlm" else "internlm"
    proc = run_cli("mindformers", "--model", other, "--input_path", hf_dir, "--output_path", tmp_path / "o.ckpt")
    assert proc.stderr == (f"weightport: error: --model {other}: {hf_dir} is a {arch} model "
                           f"({cfg['architectures'][0]})\n")
    if arch == "internlm":
        return
    loaded = [n for n in ckpt_names(out) if n.startswith("model.layers.0.attention.")]
    assert loaded == ["model.layers.0.attention.w.weight", "model.layers.0.attention.wo.weight"]
    expected = expected_internlm2({n: load_file(hf_dir / "model.safetensors")[n] for n, _ in spec}, "fused-interleaved")
    assert_mindspore_holds(mindspore_peer, out, tmp_path, expected, "Float32")
    split = tmp_path / "split" / "internlm2.ckpt"
    split.parent.mkdir()
    proc = run_cli("mindformers", "--model", arch, "--qkv_concat", "False", "--input_path", hf_dir,
                   "--output_path", split)
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.attention.wq.weight" in ckpt_names(split)
    proc = run_cli("mindformers", "--model", arch, "--reversed", "--input_path", split,
                   "--output_path", tmp_path / "b2")
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(src, tmp_path / "b2")


@pytest.mark.parametrize("arch", ["internlm", "internlm2"])
def test_tied_and_bias_free_variants_round_trip(arch):
    """No shipped config ties or (InternLM) drops the biases, but both are config switches: a tied
    embedding is also written as MindFormers' lm_head, and read back with or without it."""
    cfg = {**(INTERNLM if arch == "internlm" else INTERNLM2), "tie_word_embeddings": True, "bias": False}
    model = model_from_hf_config(cfg, arch)
    hub = {n: torch.randn(s) for n, s in model.hub_tensors().items()}
    assert not any(n.endswith(".bias") or n in ("lm_head.weight", "output.weight") for n in hub)
    names = names_for(model)
    for layout in names.layouts:
        stored = apply_rules(names.rules(model, layout, None), hub, backward=False)
        assert torch.equal(stored["lm_head.weight"], stored["model.tok_embeddings.embedding_weight"])
        for kept in (stored, {n: t for n, t in stored.items() if n != "lm_head.weight"}):
            back = apply_rules(names.rules(model, layout, set(kept)), kept, backward=True)
            assert sorted(back) == sorted(hub) and all(torch.equal(back[n], hub[n]) for n in hub), layout
