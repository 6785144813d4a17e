"""--merge-lora with PEFT adapters: merged tensors equal peft's own merge_and_unload(), and the merged
model's logits equal base + adapter run unmerged in peft; bad adapters are refused, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightport
from conftest import TOKENS, build_hf, hf_logits
from weightport.errors import WeightportError

peft = pytest.importorskip("peft")


def make_adapter(base, path, seed=0, **config):
    """A PEFT LoRA adapter on `base`, with lora_B drawn non-zero (a fresh adapter's B is zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


def peft_merged(base, adapter) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return {k: v.contiguous() for k, v in model.merge_and_unload().state_dict().items()}


def peft_logits(base, adapter, tokens) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                                          attn_implementation="eager"), adapter).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits


CASES = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-linear-rslora-patterns": dict(r=8, lora_alpha=16, target_modules=r".*\.(q|k|v|o|gate|up|down)_proj",
                                       use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 2},
                                       alpha_pattern={"down_proj": 3}),
    "embedding-and-modules-to-save": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "up_proj"],
                                          modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_hf("llama3", tmp_path_factory.mktemp("lora") / "base")


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_peft_merge_and_logits_equal_unmerged(base, tmp_path, case):
    adapter = make_adapter(base, tmp_path / "adapter", **CASES[case])
    plan = weightport.convert(base, tmp_path / "merged", "hf", merge_lora=adapter)
    assert "LoRA from" in plan.render()
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    theirs = peft_merged(base, adapter)
    assert ours.keys() == theirs.keys()
    changed = 0
    for k in ours:
        # peft adds the float32 delta to the float32 weight exactly as weightport does: bit-identical
        assert torch.equal(ours[k], theirs[k]), k
        changed += not torch.equal(ours[k], load_file(base / "model.safetensors")[k])
    assert changed >= 2
    for tokens in TOKENS:
        assert (hf_logits(tmp_path / "merged", [tokens]) - peft_logits(base, adapter, [tokens])).abs().max() < 1e-5


def test_merge_while_converting_to_litgpt_and_scaled(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", **CASES["attention"])
    weightport.convert(base, tmp_path / "lit", "litgpt", merge_lora=adapter)
    weightport.convert(tmp_path / "lit", tmp_path / "back", "hf")
    theirs = peft_merged(base, adapter)
    ours = load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    weightport.convert(base, tmp_path / "half", "hf", merge_lora=adapter, lora_scale=0.5)
    half = load_file(tmp_path / "half" / "model.safetensors")
    w0 = load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    full = theirs["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(half["model.layers.0.self_attn.q_proj.weight"], w0 + 0.5 * (full - w0), atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("other-base", "{adapter}: the adapter targets model.layers.0.self_attn.q_proj, which the base model does not "
                   "have (an adapter for another base model?)"),
    ("rank", "{adapter}/adapter_model.safetensors: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has "
             "rank 4, but adapter_config.json gives model.layers.0.self_attn.q_proj rank 2 (r / rank_pattern); the "
             "config does not describe these weights"),
    ("shape", "{adapter}: LoRA of model.layers.0.self_attn.q_proj is B [48, 4] @ A [4, 64], which does not fit its "
              "weight [64, 64] (an adapter for another base model?)"),
])
def test_bad_adapters_are_refused_with_nothing_written(base, tmp_path, case, message):
    adapter = make_adapter(base, tmp_path / "adapter", **CASES["attention"])
    src = base
    if case == "other-base":
        src = build_hf("phi3", tmp_path / "phi3")
    if case == "rank":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(dict(cfg, r=2)))
    if case == "shape":
        sd = load_file(adapter / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        save_file(dict(sd, **{key: torch.zeros(48, 4)}), adapter / "adapter_model.safetensors")
    with pytest.raises(WeightportError) as e:
        weightport.convert(src, tmp_path / "out", "hf", merge_lora=adapter)
    assert str(e.value) == message.format(adapter=adapter)
    assert not (tmp_path / "out").exists()


def test_adapter_with_added_tokens_resizes_the_vocabulary(base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(131, mean_resizing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                             modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    plan = weightport.convert(base, tmp_path / "merged", "hf", merge_lora=tmp_path / "adapter")
    assert "vocab 131" in plan.render()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 131
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref.resize_token_embeddings(131, mean_resizing=False)
    theirs = PeftModel.from_pretrained(ref, tmp_path / "adapter").merge_and_unload().state_dict()
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
