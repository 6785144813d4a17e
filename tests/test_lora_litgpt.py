"""--merge-lora with LitGPT LoRA checkpoints (lit_model.pth.lora + hyperparameters.yaml): the merge
equals LitGPT's own `merge_lora` bit for bit, also when only some of q/k/v are adapted, and also when
the merged model is written in another format."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import weightport
from conftest import build_hf, word_tokenizer
from weightport.errors import WeightportError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lit-lora")
    hf = build_hf("llama3", root / "hf")
    word_tokenizer(hf, 128)  # LitGPT's merge_lora wants tokenizer files beside the weights
    weightport.convert(hf, root / "lit", "litgpt")
    return hf, root / "lit"


def make_lora(litgpt_peer, lit, out, enabled, r=4, alpha=8, seed=0):
    litgpt_peer("make-lora", lit, out, r, alpha, enabled, seed)
    return out


@pytest.mark.parametrize("enabled", ["query,value,projection,mlp,head", "query,key,value", "key"])
def test_merge_equals_litgpt_merge_lora(base, litgpt_peer, tmp_path, enabled):
    hf, lit = base
    lora = make_lora(litgpt_peer, lit, tmp_path / "lora", enabled)
    plan = weightport.convert(hf, tmp_path / "ours", "litgpt", merge_lora=lora)
    litgpt_peer("merge-lora", lora)
    theirs = torch.load(lora / "lit_model.pth", weights_only=True)
    ours = torch.load(tmp_path / "ours" / "lit_model.pth", weights_only=True)
    original = torch.load(lit / "lit_model.pth", weights_only=True)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    changed = {k for k in ours if not torch.equal(ours[k], original[k])}
    assert changed and all(".attn.qkv." in k for k in changed) == (enabled in ("query,key,value", "key"))
    assert "LoRA from" in plan.render()


def test_merged_into_hf_equals_litgpt_merged_converted(base, litgpt_peer, tmp_path):
    hf, lit = base
    lora = make_lora(litgpt_peer, lit, tmp_path / "lora", "query,value,mlp", seed=3)
    weightport.convert(hf, tmp_path / "ours-hf", "hf", merge_lora=lora)
    litgpt_peer("merge-lora", lora)
    weightport.convert(lora, tmp_path / "theirs-hf", "hf")
    ours, theirs = load_file(tmp_path / "ours-hf" / "model.safetensors"), load_file(tmp_path / "theirs-hf" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_hyperparameters_that_do_not_describe_the_weights_are_refused(base, litgpt_peer, tmp_path):
    hf, lit = base
    lora = make_lora(litgpt_peer, lit, tmp_path / "lora", "query,value")
    hp = yaml.safe_load((lora / "hyperparameters.yaml").read_text())
    (lora / "hyperparameters.yaml").write_text(yaml.safe_dump(dict(hp, lora_key=True)))
    with pytest.raises(WeightportError) as e:
        weightport.convert(hf, tmp_path / "out", "hf", merge_lora=lora)
    assert str(e.value) == (f"{lora / 'lit_model.pth.lora'}: transformer.h.0.attn.qkv LoRA is A [8, 64] / B [96, 4], "
                            "which does not match lora_r 4 on query, key, value (hyperparameters.yaml)")
    assert not (tmp_path / "out").exists()


def test_litgpt_lora_as_a_peft_adapter(base, litgpt_peer, tmp_path):
    """--to peft: the LitGPT adapter as a PEFT one; peft's own merge of it equals LitGPT's merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import run_cli

    hf, lit = base
    lora = make_lora(litgpt_peer, lit, tmp_path / "lora", "query,key,value,projection,mlp", seed=5)
    r = run_cli("convert", lora, tmp_path / "peft", "--to", "peft")
    assert r.returncode == 0, r.stderr
    cfg = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), tmp_path / "peft")
    peft_merged = model.merge_and_unload().state_dict()
    litgpt_peer("merge-lora", lora)
    weightport.convert(lora, tmp_path / "theirs-hf", "hf")
    theirs = load_file(tmp_path / "theirs-hf" / "model.safetensors")
    assert all(torch.equal(peft_merged[k], theirs[k]) for k in theirs)
    r = run_cli("convert", hf, tmp_path / "x", "--to", "peft")
    assert r.returncode == 1 and "--to peft takes a LitGPT LoRA checkpoint" in r.stderr
