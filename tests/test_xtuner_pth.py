"""xtuner training checkpoints: an mmengine iter_N.pth and DeepSpeed ZeRO-2/ZeRO-3 directories built
here by the documented layouts, read without DeepSpeed, completed from their bases, converted in
one step to llava-hf (with Phi-3 -> Llama on the way) and computing what the trained parts compute."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import weightport
from llava_parts import (VOCAB, build_clip, build_llm, llava_hf_logits, projector_weights, reference_logits,
                         save_mmengine_checkpoint, save_zero_checkpoint, trained_state_dict)
from weightport.errors import WeightportError


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return build_llm(root / "llm"), build_clip(root / "clip")


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """The trained parts as their own checkpoints, for the reference forward pass."""
    llm, clip = bases
    root = tmp_path_factory.mktemp("trained")
    proj = projector_weights()
    sd = trained_state_dict(llm, clip, proj)
    import shutil

    from safetensors.torch import save_file

    for part, base in (("llm", llm), ("clip", clip)):
        shutil.copytree(base, root / part)
        prefix = "llm." if part == "llm" else "visual_encoder."
        save_file({k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)},
                  root / part / "model.safetensors", metadata={"format": "pt"})
    return sd, root / "llm", root / "clip", proj


def test_iter_pth_to_llava_hf_in_one_step(bases, trained, tmp_path):
    llm, clip = bases
    sd, llm_t, clip_t, proj = trained
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_50.pth", sd)
    plan = weightport.convert(pth, tmp_path / "hf", "llava-hf", llm=llm, visual_encoder=clip)
    text = plan.render()
    assert f"note:    language model: 21 tensors from the checkpoint, 0 from --llm {llm}" in text
    assert f"note:    vision encoder: 55 tensors from the checkpoint, 0 from --visual-encoder {clip}" in text
    want = reference_logits(llm_t, clip_t, proj, image_id=120)
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - want).abs().max() < 1e-5


def test_pretrain_checkpoint_takes_the_rest_from_its_bases(bases, tmp_path):
    llm, clip = bases
    proj = projector_weights(seed=4)
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_10.pth", trained_state_dict(llm, clip, proj, parts=("projector",)))
    plan = weightport.convert(pth, tmp_path / "x", "xtuner-llava", llm=llm, visual_encoder=clip)
    assert f"note:    language model: 0 tensors from the checkpoint, 21 from --llm {llm}" in plan.render()
    assert torch.equal(load_file(tmp_path / "x" / "projector" / "model.safetensors")["model.0.weight"],
                       proj["model.0.weight"])
    assert torch.equal(load_file(tmp_path / "x" / "model.safetensors")["lm_head.weight"],
                       load_file(llm / "model.safetensors")["lm_head.weight"])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_directories_read_as_the_single_file(bases, trained, tmp_path, stage):
    llm, clip = bases
    sd = trained[0]
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_50.pth", sd)
    zero = save_zero_checkpoint(tmp_path / "zero" / "iter_50.pth", sd, stage=stage)
    plan = weightport.convert(zero, tmp_path / "from-zero", "xtuner-llava", llm=llm, visual_encoder=clip)
    assert plan.source.format.name == "xtuner"
    assert plan.source.variant.startswith(f"DeepSpeed ZeRO-{stage}")
    weightport.convert(pth, tmp_path / "from-pth", "xtuner-llava", llm=llm, visual_encoder=clip)
    for f in ("model.safetensors", "projector/model.safetensors", "visual_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "from-zero" / f), load_file(tmp_path / "from-pth" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_phi3_training_checkpoint_to_llava_hf_as_llama(tmp_path):
    llm, clip = build_llm(tmp_path / "phi3", kind="phi3"), build_clip(tmp_path / "clip")
    proj = projector_weights()
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_5.pth", trained_state_dict(llm, clip, proj, shift=0.0))
    plan = weightport.convert(pth, tmp_path / "hf", "llava-hf", llm=llm, visual_encoder=clip, to_arch="llama")
    assert "architecture changed: phi3 -> llama" in plan.render()
    want = reference_logits(llm, clip, proj, image_id=120)
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - want).abs().max() < 1e-5


@pytest.mark.parametrize("case, message", [
    ("lora", "{pth}: holds LoRA weights (llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight, "
             "...) but not their alpha, which is in the training config (llm_lora=dict(..., lora_alpha=...)); pass "
             "--lora-alpha"),
    ("unknown", "{pth}: tensor data_preprocessor.mean is not part of xtuner's LLaVAModel (expected llm.*, "
                "visual_encoder.* or projector.model.*)"),
    ("no-bases", "{pth}: an xtuner training checkpoint holds no configs; pass --llm and --visual-encoder with the "
                 "base checkpoints named in the training config (llm_name_or_path, visual_encoder_name_or_path)"),
])
def test_bad_training_checkpoints_are_refused(bases, tmp_path, case, message):
    llm, clip = bases
    sd = trained_state_dict(llm, clip, projector_weights(), parts=("projector",))
    if case == "lora":
        sd["llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(4, 64)
    if case == "unknown":
        sd["data_preprocessor.mean"] = torch.zeros(3)
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_1.pth", sd)
    kw = {} if case == "no-bases" else dict(llm=llm, visual_encoder=clip)
    with pytest.raises(WeightportError) as e:
        weightport.convert(pth, tmp_path / "out", "llava-hf", **kw)
    assert str(e.value) == message.format(pth=pth)
    assert not (tmp_path / "out").exists()


def test_a_pickle_that_would_run_code_is_still_refused(bases, tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    pth = tmp_path / "work" / "evil.pth"
    pth.parent.mkdir()
    torch.save({"state_dict": trained_state_dict(*bases, projector_weights(), parts=("projector",)),
                "meta": Payload()}, pth)
    llm, clip = bases
    with pytest.raises(WeightportError, match="refused, the pickle is not weights-only and would run code"):
        weightport.convert(pth, tmp_path / "out", "llava-hf", llm=llm, visual_encoder=clip, source_format="xtuner")


@pytest.mark.parametrize("via", ["xtuner-llava", "llava", "llava-hf"])
def test_every_format_gives_back_the_training_checkpoints_tensors(bases, trained, tmp_path, via):
    llm, clip = bases
    sd = trained[0]
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_50.pth", sd)
    weightport.convert(pth, tmp_path / via, via, llm=llm, visual_encoder=clip)
    weightport.convert(tmp_path / via, tmp_path / "back", "xtuner-llava")
    got = {}
    for f, prefix in (("model.safetensors", "llm."), ("visual_encoder/model.safetensors", "visual_encoder."),
                      ("projector/model.safetensors", "projector.")):
        got.update({prefix + k: v for k, v in load_file(tmp_path / "back" / f).items()})
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_reads_the_zero_layouts_as_weightport_does(bases, trained, deepspeed_peer, tmp_path, stage):
    """DeepSpeed's own reader on the directories these tests build: the layout is DeepSpeed's, and
    weightport's ZeRO reader returns exactly what it returns."""
    from weightport.formats.llava.zero import ZeroSource

    sd = trained[0]
    zero = save_zero_checkpoint(tmp_path / "work" / "iter_50.pth", sd, stage=stage)
    theirs = deepspeed_peer(tmp_path / "work", "iter_50.pth", tmp_path)
    ours = ZeroSource(zero)
    assert theirs.keys() == ours.tensors.keys() == sd.keys()
    for name in sd:
        assert torch.equal(theirs[name], ours.load(name).float()), name


def test_cli_one_command_and_one_line_errors(bases, trained, tmp_path):
    from conftest import run_cli

    llm, clip = bases
    pth = tmp_path / "work" / "iter_50.pth"
    pth.parent.mkdir()
    torch.save(trained[0], pth)  # a bare state dict, as some tools re-save it
    r = run_cli("convert", pth, tmp_path / "hf", "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip,
                "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "source:  " in r.stdout and "[xtuner: single file]" in r.stdout and "dry run: nothing written" in r.stdout
    r = run_cli("convert", pth, tmp_path / "hf", "--to", "llava-hf", "--llm", llm, "--visual-encoder", clip, "-q")
    assert r.returncode == 0 and (tmp_path / "hf" / "config.json").is_file()
    r = run_cli("convert", pth, tmp_path / "hf2", "--to", "llava-hf", "--llm", llm)
    assert r.returncode == 1
    assert r.stderr == (f"weightport: error: {pth}: an xtuner training checkpoint holds no configs; pass "
                        "--visual-encoder with the base checkpoints named in the training config (llm_name_or_path, "
                        "visual_encoder_name_or_path)\n")
    r = run_cli("convert", llm, tmp_path / "x", "--to", "hf", "--llm", llm)
    assert r.returncode == 1
    assert r.stderr == ("weightport: error: --llm: only for LLaVA checkpoints that lack a part (xtuner, xtuner-llava, "
                        "llava), not format hf\n")


def test_lora_weights_in_a_training_checkpoint_are_merged(bases, tmp_path):
    """xtuner's LLaVAModel.state_dict() after LoRA training of the LLM: only llm.*lora_* and the
    projector; merged with --lora-alpha, the result computes what peft's merged LLM computes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    llm, clip = bases
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    proj = projector_weights()
    sd = {f"llm.{k}": v for k, v in model.state_dict().items() if "lora_" in k}
    sd.update({f"projector.{k}": v for k, v in proj.items()})
    assert "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in sd
    model.merge_and_unload().save_pretrained(tmp_path / "merged-llm")
    pth = save_mmengine_checkpoint(tmp_path / "work" / "iter_7.pth", sd)
    plan = weightport.convert(pth, tmp_path / "hf", "llava-hf", llm=llm, visual_encoder=clip, lora_alpha=16)
    assert "note:    LoRA from" in plan.render()
    want = reference_logits(tmp_path / "merged-llm", clip, proj, image_id=120)
    assert (llava_hf_logits(tmp_path / "hf")[..., :VOCAB] - want).abs().max() < 1e-5
