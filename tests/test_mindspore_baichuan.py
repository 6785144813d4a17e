"""Baichuan2 7B and 13B (remote-code checkpoints) <-> MindFormers' baichuan2 names, checked by the
real MindSpore loader.

modeling_baichuan.py lives on the Hugging Face Hub, not in transformers, so there is no model to
run here: the source directory is written from its names and shapes spelled out below, and the
MindFormers tensors are computed in this file from what research/baichuan2/convert_weight.py does.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import weightport
from conftest import assert_mindspore_holds, assert_same_tensors, ckpt_names, run_cli
from weightport.archs import model_from_hf_config
from weightport.formats.mindspore.families import names_for
from weightport.verify import verify

E, I, V, HEADS, LAYERS = 64, 96, 128, 4, 2
COMMON = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
          "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                       "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
          "hidden_size": E, "intermediate_size": I, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
          "vocab_size": V, "rms_norm_eps": 1e-6, "hidden_act": "silu", "model_max_length": 256, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float32"}
# 7B's configuration_baichuan.py has max_position_embeddings (rotary); 13B's only model_max_length (ALiBi)
CONFIGS = {"7b": {**COMMON, "max_position_embeddings": 256}, "13b": COMMON}
INV_FREQ = "model.layers.{l}.self_attn.rotary_emb.inv_freq"


def state_dict(buffers: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """modeling_baichuan.py's state_dict(); `buffers`: as Baichuan (1) 7B's persistent rotary buffer."""
    out = [("model.embed_tokens.weight", (V, E))]
    for l in range(LAYERS):
        p = f"model.layers.{l}"
        out += [(f"{p}.self_attn.W_pack.weight", (3 * E, E)), (f"{p}.self_attn.o_proj.weight", (E, E))]
        out += [(INV_FREQ.format(l=l), (E // HEADS // 2,))] if buffers else []
        out += [(f"{p}.mlp.gate_proj.weight", (I, E)), (f"{p}.mlp.down_proj.weight", (E, I)),
                (f"{p}.mlp.up_proj.weight", (I, E)), (f"{p}.input_layernorm.weight", (E,)),
                (f"{p}.post_attention_layernorm.weight", (E,))]
    return out + [("model.norm.weight", (E,)), ("lm_head.weight", (V, E))]


def build(path, cfg, buffers=False):
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    tensors = {n: torch.randn(s, generator=g) for n, s in state_dict(buffers)}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def expected(hf: dict) -> dict[str, torch.Tensor]:
    """research/baichuan2/convert_weight.py: name_replace over state_dict(), W_pack cut in three
    hidden_size-row parts written as wq, wk, wv where W_pack was."""
    pairs = [("embed_tokens.weight", "tok_embeddings.embedding_weight"), (".self_attn.o_proj.", ".attention.wo."),
             (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.down_proj.", ".feed_forward.w2."),
             (".mlp.up_proj.", ".feed_forward.w3."), (".input_layernorm.", ".attention_norm."),
             (".post_attention_layernorm.", ".ffn_norm."), (".norm.", ".norm_out.")]
    out = {}
    for name, t in hf.items():
        if "W_pack" in name:
            for part, rows in zip("qkv", (t[:E], t[E:2 * E], t[2 * E:])):
                out[name.replace(".self_attn.W_pack", f".attention.w{part}")] = rows
            continue
        for a, b in pairs:
            name = name.replace(a, b)
        out[name] = t
    return out


@pytest.mark.parametrize("size", list(CONFIGS))
def test_baichuan2_to_mindspore_loads_and_comes_back_exact(tmp_path, mindspore_peer, size):
    hf_dir = build(tmp_path / "hf", CONFIGS[size])
    hf = load_file(hf_dir / "model.safetensors")
    hf = {n: hf[n] for n, _ in state_dict()}  # in state_dict() order, which the converter keeps
    want = expected(hf)

    ms = tmp_path / "ms"
    plan = weightport.plan_conversion(hf_dir, ms, "mindspore")
    assert plan.dropped == []
    plan.source.close()
    weightport.convert(hf_dir, ms, "mindspore", layout="separate")
    assert ckpt_names(ms / "model.ckpt") == list(want)
    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, want, "Float32")

    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())
    assert mf["weightport"] == {"layout": "separate", "hf_architecture": "BaichuanForCausalLM"}
    mc = mf["model"]["model_config"]
    assert mf["model"]["arch"]["type"] == {"7b": "Baichuan7BV2ForCausalLM", "13b": "Baichuan13BV2ForCausalLM"}[size]
    assert (mc["type"], mc["num_heads"], mc["hidden_size"], mc["qkv_concat"]) == ("LlamaConfig", HEADS, E, False)

    weightport.convert(ms, tmp_path / "back", "hf")
    assert_same_tensors(hf, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["auto_map"] == COMMON["auto_map"]
    report = verify(hf_dir, ms, tensors_only=True)
    assert report.equivalent, report.render()

    # with only MindFormers' yaml beside it (its model_config is a LlamaConfig; the arch says Baichuan)
    (ms / "config.json").unlink()
    del mf["weightport"]
    (ms / "mindformers.yaml").write_text(yaml.safe_dump(mf))
    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert (plan.source.model.arch.name, plan.source.notes) == ("baichuan", ["config from mindformers.yaml"])
    plan.source.close()
    weightport.convert(ms, tmp_path / "back2", "hf")
    assert_same_tensors(hf, tmp_path / "back2")
    assert verify(hf_dir, tmp_path / "back2", tensors_only=True).equivalent


def test_13b_yaml_derives_its_feed_forward_size():
    """Baichuan13BV2's feed-forward takes no intermediate_size: multiple_of must round 8·5120/3 to 13696."""
    cfg = {**COMMON, "hidden_size": 5120, "intermediate_size": 13696, "num_attention_heads": 40,
           "num_hidden_layers": 40, "vocab_size": 125696, "model_max_length": 4096}
    model = model_from_hf_config(cfg, "Baichuan2-13B")
    mc = names_for(model).to_yaml(model, torch.bfloat16, "separate")["model"]["model_config"]
    assert (mc["multiple_of"], mc["seq_length"], mc["param_init_type"]) == (128, 4096, "bfloat16")


def test_baichuan_1_rotary_buffer_is_dropped(tmp_path):
    """Baichuan (1) 7B shares model_type and names and saved its inv_freq; the model recomputes it."""
    hf_dir = build(tmp_path / "hf", CONFIGS["7b"], buffers=True)
    plan = weightport.plan_conversion(hf_dir, tmp_path / "ms", "mindspore")
    assert plan.dropped == [(INV_FREQ.format(l=l), "recomputed by the model") for l in range(LAYERS)]
    plan.source.close()


def test_mindformers_command_line(tmp_path, mindspore_peer):
    hf_dir = build(tmp_path / "hf", CONFIGS["7b"])
    src = load_file(hf_dir / "model.safetensors")
    out = tmp_path / "ms" / "baichuan2.ckpt"
    out.parent.mkdir()
    # MindFormers <= 1.3 took a file inside the Hugging Face directory
    proc = run_cli("mindformers", "--model", "baichuan2", "--input_path", hf_dir / "config.json", "--output_path", out)
    assert proc.returncode == 0, proc.stderr
    assert_mindspore_holds(mindspore_peer, out, tmp_path, expected(src), "Float32")
    proc = run_cli("mindformers", "--model", "baichuan2", "--reversed", "--input_path", out,
                   "--output_path", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(src, tmp_path / "back")

    # its converter splits W_pack always and ignores --qkv_concat, as weightport does (and says)
    proc = run_cli("mindformers", "--model", "baichuan2", "--qkv_concat", "True", "--input_path", hf_dir,
                   "--output_path", tmp_path / "fused.ckpt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == ["note: --qkv_concat ignored, as MindFormers' baichuan2 converter ignores it"]
    assert "model.layers.0.attention.wq.weight" in ckpt_names(tmp_path / "fused.ckpt")
    proc = run_cli("mindformers", "--model", "internlm", "--input_path", hf_dir, "--output_path", tmp_path / "x.ckpt")
    assert proc.stderr == f"weightport: error: --model internlm: {hf_dir} is a baichuan model (BaichuanForCausalLM)\n"
