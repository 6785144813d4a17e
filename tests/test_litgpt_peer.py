"""HF <-> LitGPT for every architecture, checked against LitGPT itself.

For each model: HF -> LitGPT with weightport; LitGPT's own GPT loads it strictly and its
logits equal transformers' (fp32, < 1e-5); LitGPT's own convert_hf_checkpoint produces the
same tensors; LitGPT -> HF with weightport gives back the source tensors bit for bit and a
directory `from_pretrained` loads with equal logits.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import weightport
from conftest import MODELS, PEER_CONVERTER_UNSUPPORTED, build_hf, hf_logits, litgpt_logits

TOL = 1e-5


def _hf_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("key", list(MODELS))
def test_hf_litgpt_hf(key, tmp_path, litgpt_peer):
    src = build_hf(key, tmp_path / "hf")
    expected = hf_logits(src)

    lit = tmp_path / "lit"
    weightport.convert(src, lit, "litgpt")
    got = litgpt_logits(litgpt_peer, lit, tmp_path)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL

    back = tmp_path / "back"
    weightport.convert(lit, back, "hf")
    a, b = _hf_tensors(src), _hf_tensors(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (hf_logits(back) - expected).abs().max().item() < TOL

    if key in PEER_CONVERTER_UNSUPPORTED:
        yaml_only = tmp_path / "yaml_only"
        shutil.copytree(lit, yaml_only)
        (yaml_only / "config.json").unlink()
    else:
        yaml_only = _check_against_litgpt_converter(litgpt_peer, src, lit, tmp_path)
    # LitGPT's own output has no config.json: the HF config comes from model_config.yaml alone
    assert not (yaml_only / "config.json").exists()
    back2 = tmp_path / "back_from_yaml"
    weightport.convert(yaml_only, back2, "hf")
    c = _hf_tensors(back2)
    assert sorted(a) == sorted(c) and all(torch.equal(a[n], c[n]) for n in a)
    assert (hf_logits(back2) - expected).abs().max().item() < TOL


def _check_against_litgpt_converter(litgpt_peer, src, lit, tmp_path):
    """LitGPT's own converter, on the same input and with our config, writes the same tensors."""
    theirs = tmp_path / "lit_theirs"
    litgpt_peer("convert-hf", src, theirs, lit / "model_config.yaml")
    ours_sd = torch.load(lit / "lit_model.pth", weights_only=True)
    theirs_sd = torch.load(theirs / "lit_model.pth", weights_only=True)
    assert sorted(ours_sd) == sorted(theirs_sd)
    for name in ours_sd:
        assert ours_sd[name].dtype == theirs_sd[name].dtype, name
        assert torch.equal(ours_sd[name], theirs_sd[name]), name
    return theirs
