"""ChatGLM2 / ChatGLM3 / GLM-4 (THUDM's remote-code checkpoints) <-> MindFormers glm-n, against
MindFormers' own glm2 converter and the real MindSpore loader.

The modeling code of these checkpoints lives on the Hugging Face Hub, not in transformers, so
there is no transformers model to run: the source directory is written here from the names and
shapes of modeling_chatglm.py, spelled out below independently of weightport's declaration.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import weightport
from conftest import ckpt_names, run_cli
from weightport.formats.mindspore.ckpt import TORCH_TO_MS, MsCkptFile
from weightport.verify import verify

CONFIG = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm",
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "num_layers": 2, "padded_vocab_size": 128, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16,
    "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 256,
    "layernorm_epsilon": 1e-5, "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True, "add_bias_linear": False, "add_qkv_bias": True, "rope_ratio": 1,
    "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float32",
}
LAYOUTS = ["fused", "fused-rearranged", "separate", "separate-rearranged"]


def _state_dict_order(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """modeling_chatglm.py's state_dict(): module order, with the persistent rotary buffer."""
    E, I, hd = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["kv_channels"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * hd
    out = [("transformer.embedding.word_embeddings.weight", (cfg["padded_vocab_size"], E)),
           ("transformer.rotary_pos_emb.inv_freq", (hd // 4,))]
    for l in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{l}"
        out += [(f"{p}.input_layernorm.weight", (E,)),
                (f"{p}.self_attention.query_key_value.weight", (qkv, E)),
                (f"{p}.self_attention.query_key_value.bias", (qkv,)),
                (f"{p}.self_attention.dense.weight", (E, cfg["num_attention_heads"] * hd)),
                (f"{p}.post_attention_layernorm.weight", (E,)),
                (f"{p}.mlp.dense_h_to_4h.weight", (2 * I, E)),
                (f"{p}.mlp.dense_4h_to_h.weight", (E, I))]
    out += [("transformer.encoder.final_layernorm.weight", (E,)),
            ("transformer.output_layer.weight", (cfg["padded_vocab_size"], E))]
    return out


def build_chatglm(path, cfg=CONFIG):
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    tensors = {n: torch.randn(s, generator=g) for n, s in _state_dict_order(cfg)}
    dim = cfg["kv_channels"] // 2
    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    # the remote code a Hub download carries, which a converted directory needs to load
    for module in ("configuration_chatglm.py", "modeling_chatglm.py"):
        (path / module).write_text(f"# {module}: THUDM's remote code\n")
    return path


def _expected(hf: dict, cfg: dict, layout: str) -> dict[str, torch.Tensor]:
    """MindFormers' glm-n names and values, from its convert_weight.py's description."""
    hd, heads, groups = cfg["kv_channels"], cfg["num_attention_heads"], cfg["multi_query_group_num"]

    def rearrange(w, n):  # each head's rows: even ones, then odd ones
        return w.reshape(n, hd, *w.shape[1:]).unflatten(1, (hd // 2, 2)).transpose(1, 2).reshape(w.shape)

    out = {}
    for name, t in hf.items():
        if name == "transformer.rotary_pos_emb.inv_freq":
            continue
        name = name.replace("word_embeddings.weight", "embedding_weight")
        if "query_key_value" in name:
            q, k, v = t.split([heads * hd, groups * hd, groups * hd])
            if layout.endswith("rearranged"):
                q, k = rearrange(q, heads), rearrange(k, groups)
            if layout.startswith("fused"):
                out[name] = torch.cat([q, k, v])
            else:
                for part, x in zip(("wq", "wk", "wv"), (q, k, v)):
                    out[name.replace("query_key_value", part)] = x
        elif "dense_h_to_4h" in name and layout.startswith("separate"):
            left, right = t.chunk(2)
            out[name.replace("dense_h_to_4h", "dense_left")] = left
            out[name.replace("dense_h_to_4h", "dense_right")] = right
        else:
            out[name] = t
    return out


def _records(path):
    f = MsCkptFile(path)
    try:
        return [(n, list(shape), TORCH_TO_MS[dt], f.load(n)) for n, (shape, dt) in f.entries.items()]
    finally:
        f.close()


@pytest.fixture(scope="module")
def mindformers_glm(tmp_path_factory, mindformers_peer):
    """Each layout converted by weightport and by MindFormers' glm2 converter (one process), the
    converter reading the MindFormers yaml weightport wrote."""
    root = tmp_path_factory.mktemp("glm")
    hf = build_chatglm(root / "hf")
    order = [n for n, _ in _state_dict_order(CONFIG)]
    jobs = []
    for layout in LAYOUTS:
        ours = root / f"ours-{layout}"
        weightport.convert(hf, ours, "mindspore", layout=layout)
        jobs.append({"model": "glm-n", "hf_dir": hf, "out_ckpt": root / f"theirs-{layout}" / "model.ckpt",
                     "config": ours / "mindformers.yaml", "order": order, "dtype": None})
    result = mindformers_peer.convert_many(jobs, root)
    return root, hf, dict(zip(LAYOUTS, result["results"]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_glm_matches_mindformers_converter_and_mindspore(tmp_path, mindformers_glm, mindspore_peer, layout):
    root, hf, results = mindformers_glm
    assert "error" not in results[layout], results[layout]["error"]
    ours, theirs = root / f"ours-{layout}" / "model.ckpt", root / f"theirs-{layout}" / "model.ckpt"
    expected = _expected(load_file(hf / "model.safetensors"), CONFIG, layout)

    # name for name, in the same order, shape, dtype and value; MindFormers also copies the rotary
    # buffer inv_freq (its model recomputes it), which weightport leaves out
    mine = _records(ours)
    ref = [r for r in _records(theirs) if r[0] != "transformer.rotary_pos_emb.inv_freq"]
    assert [r[:3] for r in mine] == [r[:3] for r in ref]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(mine, ref))
    assert {r[0]: r[3] for r in mine}.keys() == expected.keys()
    assert all(torch.equal(r[3], expected[r[0]]) for r in mine)

    (loaded,) = mindspore_peer([{"op": "load", "path": str(ours), "out_dir": str(tmp_path / "npy")}], tmp_path)
    assert [p["name"] for p in loaded["params"]] == [r[0] for r in mine]
    for p in loaded["params"]:
        assert p["dtype"] == "Float32" and np.array_equal(np.load(p["npy"]), expected[p["name"]].numpy()), p["name"]

    # back to Hugging Face, from our file and from MindFormers' own (with its yaml only)
    src = load_file(hf / "model.safetensors")
    del src["transformer.rotary_pos_emb.inv_freq"]
    assert (ours.parent / "modeling_chatglm.py").read_text() == (hf / "modeling_chatglm.py").read_text()
    weightport.convert(ours.parent, tmp_path / "back", "hf")
    assert {p.name for p in (tmp_path / "back").glob("*.py")} == {"configuration_chatglm.py", "modeling_chatglm.py"}
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)
    mf_yaml = yaml.safe_load((ours.parent / "mindformers.yaml").read_text())
    del mf_yaml["weightport"]  # as MindFormers' own yaml: the layout comes from its switches
    (theirs.parent / "glm.yaml").write_text(yaml.safe_dump(mf_yaml))
    plan = weightport.plan_conversion(theirs.parent, tmp_path / "x", "hf")
    assert plan.source.variant == f".ckpt, {layout} layout"
    assert plan.dropped == [("transformer.rotary_pos_emb.inv_freq", "recomputed by the model")]
    plan.source.close()
    weightport.convert(theirs.parent, tmp_path / "back2", "hf")
    back2 = load_file(tmp_path / "back2" / "model.safetensors")
    assert back2.keys() == src.keys() and all(torch.equal(back2[k], src[k]) for k in src)
    cfg = json.loads((tmp_path / "back2" / "config.json").read_text())
    assert {k: cfg[k] for k in ("num_layers", "kv_channels", "multi_query_group_num", "ffn_hidden_size")} == \
        {k: CONFIG[k] for k in ("num_layers", "kv_channels", "multi_query_group_num", "ffn_hidden_size")}
    report = verify(hf, ours.parent, samples=1)
    assert report.equivalent and report.function is None
    assert report.notes == ["function level not run: ChatGLMModel is not part of transformers"]


def test_glm_rearranged_file_needs_its_yaml(tmp_path):
    """Rearranged and plain files share names and shapes; without a record the plain reading is
    taken and the note says how to choose."""
    hf = build_chatglm(tmp_path / "hf")
    ms = tmp_path / "ms"
    weightport.convert(hf, ms, "mindspore", layout="fused-rearranged")
    (ms / "mindformers.yaml").unlink()
    plan = weightport.plan_conversion(ms, tmp_path / "x", "hf")
    assert plan.source.variant == ".ckpt, fused layout"
    assert any("pass --from-layout fused-rearranged" in n for n in plan.source.notes), plan.source.notes
    plan.source.close()
    assert not verify(hf, ms, tensors_only=True).equivalent
    proc = run_cli("convert", ms, tmp_path / "back", "--to", "hf", "--from-layout", "fused-rearranged", "-q")
    assert proc.returncode == 0, proc.stderr
    assert verify(hf, tmp_path / "back", tensors_only=True).equivalent
    bad = run_cli("convert", hf, tmp_path / "bad", "--to", "mindspore", "--layout", "gmm")
    assert bad.stderr == ("weightport: error: format mindspore has no layout 'gmm' for chatglm (choose one of fused, "
                          "fused-rearranged, separate, separate-rearranged)\n")


def test_glm_mindformers_command_line(tmp_path):
    hf = build_chatglm(tmp_path / "hf")
    out = tmp_path / "out" / "glm4.ckpt"
    out.parent.mkdir()
    proc = run_cli("mindformers", "--model", "glm4", "--input_path", hf, "--output_path", out)
    assert proc.returncode == 0, proc.stderr
    rev = tmp_path / "rev"
    proc = run_cli("mindformers", "--model", "glm-n", "--reversed", "--input_path", out, "--output_path", rev)
    assert proc.returncode == 0, proc.stderr
    src = load_file(hf / "model.safetensors")
    back = load_file(rev / "model.safetensors")
    assert all(torch.equal(back[k], src[k]) for k in back) and len(back) == len(src) - 1
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in ckpt_names(out)  # fused by default

    # the layout from a MindFormers model yaml, as its glm converter takes it (--config)
    config = tmp_path / "run_glm4.yaml"
    config.write_text(yaml.safe_dump({"model": {"model_config": {
        "type": "ChatGLM2Config", **{k: v for k, v in CONFIG.items() if k not in ("architectures", "auto_map")},
        "qkv_concat": False, "mlp_concat": False, "use_rearrange_rope": True}}}))
    out2 = tmp_path / "out2" / "glm4.ckpt"
    out2.parent.mkdir()
    proc = run_cli("mindformers", "--model", "glm4", "--input_path", hf, "--output_path", out2, "--config", config)
    assert proc.returncode == 0, proc.stderr
    (out2.parent / "mindformers.yaml").unlink()  # so only --config can say it is rearranged
    assert "transformer.encoder.layers.0.self_attention.wq.weight" in ckpt_names(out2)
    shutil.rmtree(rev)
    proc = run_cli("mindformers", "--model", "glm4", "--reversed", "--input_path", out2, "--output_path", rev,
                   "--config", config)
    assert proc.returncode == 0, proc.stderr
    back = load_file(rev / "model.safetensors")
    assert all(torch.equal(back[k], src[k]) for k in back) and len(back) == len(src) - 1


