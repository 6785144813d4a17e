"""DeepSeek-V2 in the `mindspore` format: HF -> MindFormers .ckpt -> HF, checked by the real MindSpore loader."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import weightport
from conftest import assert_mindspore_holds, hf_logits, mindspore_values, run_cli
from weightport.archs import model_from_hf_config
from weightport.formats import FORMATS
from weightport.plan import Step
from weightport.verify import verify

# tiny, but with every kind of layer: one dense, two MoE; the q head (16 + 8) differs from v (12)
CONFIG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
              moe_intermediate_size=32, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
              first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
Q_LORA = {"q_lora": 24, "no_q_lora": None}  # V2 / V2.5 compress q; V2-Lite projects it directly


def build(path, q_lora_rank, **overrides):
    """As conftest.build_hf, for a config its Llama-shaped BASE cannot express."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("deepseek_v2", **{**CONFIG, "q_lora_rank": q_lora_rank, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # large enough that a misplaced tensor moves the logits far beyond 1e-5
        for _, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _expected(hf: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """MindFormers' research/deepseek2 names, written out here independently of the format's rules."""
    out = {"model.tok_embeddings.embedding_weight": hf["model.embed_tokens.weight"],
           "model.norm_out.weight": hf["model.norm.weight"], "lm_head.weight": hf["lm_head.weight"]}
    attention = {"q_a_proj": "q2l_proj", "q_a_layernorm": "lq_norm", "q_b_proj": "l2q_proj", "q_proj": "q_proj",
                 "kv_a_proj_with_mqa": "kv2l", "kv_a_layernorm": "lkv_norm", "kv_b_proj": "lkv2kv", "o_proj": "wo"}
    ffn = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    for l in range(cfg["num_hidden_layers"]):
        h = m = f"model.layers.{l}"
        out[f"{m}.attention_norm.weight"] = hf[f"{h}.input_layernorm.weight"]
        out[f"{m}.ffn_norm.weight"] = hf[f"{h}.post_attention_layernorm.weight"]
        for a, b in attention.items():
            if f"{h}.self_attn.{a}.weight" in hf:
                out[f"{m}.attention.{b}.weight"] = hf[f"{h}.self_attn.{a}.weight"]
        if l < cfg["first_k_dense_replace"]:
            out.update({f"{m}.feed_forward.{b}.weight": hf[f"{h}.mlp.{a}.weight"] for a, b in ffn.items()})
            continue
        out[f"{m}.feed_forward.routed_experts.router.dense.weight"] = hf[f"{h}.mlp.gate.weight"]
        for a, b in ffn.items():
            out[f"{m}.feed_forward.shared_experts.{b}.weight"] = hf[f"{h}.mlp.shared_experts.{a}.weight"]
            out[f"{m}.feed_forward.routed_experts.ffn.{b}.weight"] = torch.stack(
                [hf[f"{h}.mlp.experts.{e}.{a}.weight"] for e in range(cfg["n_routed_experts"])])
    return out




def _same_tensors(a_dir, b_dir):
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", list(Q_LORA))
def test_hf_to_mindspore_loads_in_mindspore_and_comes_back_exact(tmp_path, mindspore_peer, variant):
    hf_dir = build(tmp_path / "hf", Q_LORA[variant])
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore")
    cfg = json.loads((hf_dir / "config.json").read_text())
    hf = load_file(hf_dir / "model.safetensors")
    assert ("model.layers.0.self_attn.q_proj.weight" in hf) == (variant == "no_q_lora")
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in hf  # what transformers saves: one tensor per expert
    expected = _expected(hf, cfg)

    assert_mindspore_holds(mindspore_peer, ms / "model.ckpt", tmp_path, expected, "Float32")

    mf = yaml.safe_load((ms / "mindformers.yaml").read_text())
    assert mf["weightport"] == {"layout": "separate", "hf_architecture": "DeepseekV2ForCausalLM"}
    mc = mf["model"]["model_config"]
    assert (mc["type"], mf["model"]["arch"]["type"]) == ("DeepseekV2Config", "DeepseekV2ForCausalLM")
    assert (mc["q_lora_rank"], mc["kv_lora_rank"], mc["qk_nope_head_dim"]) == (Q_LORA[variant], 16, 16)
    assert (mf["moe_config"]["expert_num"], mf["moe_config"]["first_k_dense_replace"]) == (4, 1)

    back = tmp_path / "back"
    weightport.convert(ms, back, "hf")
    _same_tensors(hf_dir, back)
    assert (hf_logits(hf_dir) - hf_logits(back)).abs().max().item() < 1e-5
    report = verify(hf_dir, ms, tensors_only=True)
    assert report.equivalent, report.render()


def test_mindformers_yaml_alone_suffices(tmp_path):
    """A .ckpt with only the MindFormers yaml beside it (as MindFormers itself leaves one), yarn rope included."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 64}
    hf_dir = build(tmp_path / "hf", 24, rope_parameters=rope, topk_method="group_limited_greedy", n_group=2,
                   topk_group=1, routed_scaling_factor=2.0)
    ms = tmp_path / "ms"
    weightport.convert(hf_dir, ms, "mindspore")
    (ms / "config.json").unlink()
    y = yaml.safe_load((ms / "mindformers.yaml").read_text())
    assert y["model"]["model_config"]["extend_method"] == "YARN"
    del y["weightport"]
    (ms / "mindformers.yaml").unlink()
    (ms / "predict_deepseek2.yaml").write_text(yaml.safe_dump(y))
    back = tmp_path / "back"
    weightport.convert(ms, back, "hf")
    _same_tensors(hf_dir, back)
    assert (hf_logits(hf_dir) - hf_logits(back)).abs().max().item() < 1e-5
    report = verify(hf_dir, back, tensors_only=True)
    assert report.equivalent, report.render()  # the config level: every DeepSeek setting came back


def test_hf_to_hf_round_trip(tmp_path):
    hf_dir = build(tmp_path / "hf", Q_LORA["q_lora"])
    out = tmp_path / "out"
    weightport.convert(hf_dir, out, "hf")
    _same_tensors(hf_dir, out)
    assert (hf_logits(hf_dir) - hf_logits(out)).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(Q_LORA))
def test_rules_round_trip(variant, dtype):
    """As tests/test_rules.py does for the Llama family: every format's rules, both directions, bit-exact."""
    model = model_from_hf_config({**CONFIG, "model_type": "deepseek_v2", "q_lora_rank": Q_LORA[variant]}, variant)
    hub_shapes = model.hub_tensors()
    g = torch.Generator().manual_seed(0)
    hub = {n: torch.randn(s, generator=g).to(dtype) for n, s in hub_shapes.items()}
    for name in ("hf", "mindspore"):
        rules = FORMATS[name].target_rules(model)
        stored, back = {}, {}
        for r in rules:
            stored.update(zip(r.fmt, Step(r.hub, r.fmt, r.op, backward=False).run([hub[h] for h in r.hub])))
            assert [tuple(stored[f].shape) for f in r.fmt] == [tuple(s) for s in
                                                                r.op.forward_shapes([hub_shapes[h] for h in r.hub])]
        assert len(stored) == sum(len(r.fmt) for r in rules), name
        for r in rules:
            back.update(zip(r.hub, Step(r.fmt, r.hub, r.op, backward=True).run([stored[f] for f in r.fmt])))
        assert sorted(back) == sorted(hub) and all(torch.equal(back[n], hub[n]) for n in hub), name


def test_mindformers_command_line(tmp_path, mindspore_peer):
    hf_dir = build(tmp_path / "hf", None)
    out = tmp_path / "ms" / "deepseek2.ckpt"
    out.parent.mkdir()
    proc = run_cli("mindformers", "--model", "deepseek2", "--input_path", hf_dir, "--output_path", out)
    assert proc.returncode == 0, proc.stderr
    loaded = mindspore_values(mindspore_peer, out, tmp_path)
    assert loaded["model.layers.0.attention.q_proj.weight"][:2] == ([96, 64], "Float32")
    back = tmp_path / "back"
    proc = run_cli("mindformers", "--model", "deepseek2", "--reversed", "--input_path", out, "--output_path", back)
    assert proc.returncode == 0, proc.stderr
    _same_tensors(hf_dir, back)


def test_what_mindformers_deepseek2_cannot_hold_is_refused(tmp_path):
    hf_dir = build(tmp_path / "bias", 24, attention_bias=True)
    proc = run_cli("convert", hf_dir, tmp_path / "bias-ms", "--to", "mindspore")
    assert (proc.returncode, proc.stderr) == (1, "weightport: error: MindFormers' DeepSeek-V2 has no attention / MLP "
                                                 "biases matching attention_bias / mlp_bias\n")
    assert not (tmp_path / "bias-ms").exists()
    # DeepSeek's own code would make only every 2nd layer MoE; transformers (and so the hub) ignores the key
    cfg_path = hf_dir / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "moe_layer_freq": 2}))
    proc = run_cli("inspect", hf_dir)
    assert proc.returncode == 1 and "moe_layer_freq=2 is not supported" in proc.stderr, proc.stderr
