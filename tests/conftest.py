"""Tiny random models built locally with transformers, and the peer-framework runners."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6)

# one entry per architecture (and per Llama generation) the core issue names
MODELS: dict[str, tuple[str, dict]] = {
    "llama2": ("llama", dict(num_key_value_heads=4)),
    "llama3": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama3.1": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama3.2": ("llama", dict(tie_word_embeddings=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "mistral": ("mistral", dict(sliding_window=8)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("qwen2", dict()),
    "phi3": ("phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma": ("gemma", dict(head_dim=16)),
    # beyond the list: what a real checkpoint's config can add
    "gemma-2b": ("gemma", dict(head_dim=16, num_key_value_heads=1, _name_or_path="google/gemma-2b")),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
}
# LitGPT's own convert_hf_checkpoint has no keys for Llama o_proj/MLP biases (KeyError)
PEER_CONVERTER_UNSUPPORTED = {"llama-bias"}

TOKENS = [[int(x) for x in torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(s))] for s in (1, 2)]


def build_hf(model_key: str, path: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Save a tiny random model; weights are re-drawn large enough that a misplaced tensor
    (swapped q/k, gate/up, a wrong norm) changes the logits far beyond 1e-5."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = MODELS[model_key]
    settings = {**BASE, **extra, **overrides}
    repo = settings.pop("_name_or_path", None)
    cfg = AutoConfig.for_model(model_type, **settings)
    cfg._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, model_key)))
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(path)
    if repo:  # as from_pretrained(repo).save_pretrained() records it
        cfg_path = path / "config.json"
        saved = json.loads(cfg_path.read_text())
        saved["_name_or_path"] = repo
        cfg_path.write_text(json.dumps(saved, indent=2))
    return path


def hf_logits(path: Path, tokens=TOKENS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


def litgpt_python() -> str | None:
    exe = os.environ.get("WEIGHTPORT_LITGPT_PYTHON", str(ROOT / ".venv-litgpt" / "bin" / "python"))
    return exe if Path(exe).exists() else None


@pytest.fixture(scope="session")
def litgpt_peer():
    """Runs tests/peers/litgpt_peer.py in LitGPT's own virtual environment.

    LitGPT 0.5.x pins huggingface_hub<1.4 while transformers 5 needs a newer one, so LitGPT
    lives in its own venv and is driven as a subprocess. In CI it must be there.
    """
    exe = litgpt_python()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("LitGPT venv missing in CI (.ci/run must create .venv-litgpt)")
        pytest.skip("LitGPT venv (.venv-litgpt) not installed; run `make test` to create it")

    def run(*args: str) -> None:
        proc = subprocess.run([exe, str(ROOT / "tests" / "peers" / "litgpt_peer.py"), *map(str, args)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"litgpt peer {args[0]} failed:\n{proc.stderr[-4000:]}")

    return run


@pytest.fixture(scope="session")
def llava_peer():
    """Runs tests/peers/llava_peer.py with the official LLaVA codebase (llava-torch, transformers
    4.37.2) in its own venv; `logits(ckpt, input_ids, pixel_values, tmp)` returns LLaVA's logits.
    In CI it must be there."""
    exe = os.environ.get("WEIGHTPORT_LLAVA_PYTHON", str(ROOT / ".venv-llava" / "bin" / "python"))
    if not Path(exe).exists():
        if os.environ.get("CI"):
            pytest.fail("LLaVA venv missing in CI (`make test` must create .venv-llava)")
        pytest.skip("LLaVA venv (.venv-llava) not installed; run `make test` to create it")

    def logits(ckpt: Path, input_ids: torch.Tensor, pixel_values: torch.Tensor, tmp: Path) -> torch.Tensor:
        torch.save({"input_ids": input_ids, "pixel_values": pixel_values}, tmp / "llava_in.pt")
        proc = subprocess.run([exe, str(ROOT / "tests" / "peers" / "llava_peer.py"), "logits", str(ckpt),
                               str(tmp / "llava_in.pt"), str(tmp / "llava_out.pt")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"llava peer failed:\n{proc.stderr[-4000:]}")
        return torch.load(tmp / "llava_out.pt", weights_only=True)["logits"]

    return logits


@pytest.fixture(scope="session")
def deepspeed_peer():
    """DeepSpeed's own get_fp32_state_dict_from_zero_checkpoint (tests/peers/deepspeed_peer.py in
    .venv-deepspeed): `fp32(checkpoint_dir, tag, tmp)` returns the state dict it reassembles."""
    exe = os.environ.get("WEIGHTPORT_DEEPSPEED_PYTHON", str(ROOT / ".venv-deepspeed" / "bin" / "python"))
    if not Path(exe).exists():
        if os.environ.get("CI"):
            pytest.fail("DeepSpeed venv missing in CI (`make test` must create .venv-deepspeed)")
        pytest.skip("DeepSpeed venv (.venv-deepspeed) not installed; run `make test` to create it")

    def fp32(checkpoint_dir: Path, tag: str, tmp: Path) -> dict:
        out = tmp / "deepspeed_fp32.pt"
        proc = subprocess.run([exe, str(ROOT / "tests" / "peers" / "deepspeed_peer.py"), "fp32", str(checkpoint_dir),
                               tag, str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"deepspeed peer failed:\n{proc.stderr[-4000:]}")
        return torch.load(out, weights_only=True)

    return fp32


def litgpt_logits(peer, ckpt: Path, tmp: Path, tokens=TOKENS) -> torch.Tensor:
    """LitGPT's logits for `tokens`, through the runner `weightport verify --runtime litgpt` uses."""
    import numpy as np

    from weightport.formats.litgpt.runtime import run_litgpt

    out = tmp / "lit_logits"
    run_litgpt(ckpt, tokens, out, litgpt_python())
    return torch.stack([torch.from_numpy(np.load(out / f"{i}.npy")) for i in range(len(tokens))])


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under path, to prove a source was not modified."""
    out = {}
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightport", *map(str, args)], capture_output=True, text=True, **kw)


def build_tokenizer(path: Path) -> Path:
    """A small BPE tokenizer trained on the built-in captions, saved as transformers saves one;
    its base vocabulary fits the tiny models' 128 rows, and one added token is never scored."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from weightport.captions import load_captions
    from weightport.verify.inputs import PROMPT

    texts = [PROMPT] + [s.caption for s in load_captions()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_tokens(["<image>"])
    fast.save_pretrained(path)
    return path


def word_tokenizer(path: Path, size: int) -> None:
    """A word-level tokenizer with exactly `size` ids (w0, w1, ...), saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(size - 3)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def mindspore_python() -> str | None:
    """The Python that has the real `mindspore` (the test venv's own, unless told otherwise)."""
    exe = os.environ.get("WEIGHTPORT_MINDSPORE_PYTHON")
    if exe:
        return exe if Path(exe).exists() else None
    import importlib.util

    return sys.executable if importlib.util.find_spec("mindspore") is not None else None


def mindspore_values(peer, ckpt: Path, tmp_path: Path) -> dict[str, tuple[list, str, object]]:
    """What MindSpore's own load_checkpoint returns for `ckpt`: name -> (shape, dtype, values)."""
    import numpy as np

    (result,) = peer([{"op": "load", "path": str(ckpt), "crc_check": False, "out_dir": str(tmp_path / "ms-npy")}],
                     tmp_path)
    assert "error" not in result, result
    return {p["name"]: (p["shape"], p["dtype"], np.load(p["npy"])) for p in result["params"]}


def assert_mindspore_holds(peer, ckpt: Path, tmp_path: Path, expected: dict[str, torch.Tensor], ms_dtype: str) -> None:
    """MindSpore reads exactly `expected` from `ckpt`: the same names, shapes, dtype and values."""
    import numpy as np

    loaded = mindspore_values(peer, ckpt, tmp_path)
    assert sorted(loaded) == sorted(expected)
    for name, t in expected.items():
        shape, dtype, value = loaded[name]
        assert (shape, dtype) == (list(t.shape), ms_dtype), name
        assert np.array_equal(value, t.float().numpy() if ms_dtype == "BFloat16" else t.numpy()), name


def apply_rules(rules, tensors: dict, backward: bool) -> dict:
    """Run rules the way the executor does: forward hub -> format, backward format -> hub."""
    from weightport.plan import Step

    out = {}
    for r in rules:
        step = Step(r.fmt, r.hub, r.op, backward=True) if backward else Step(r.hub, r.fmt, r.op, backward=False)
        out.update(zip(step.outputs, step.run([tensors[n] for n in step.inputs])))
    return out


def ckpt_names(path: Path) -> list[str]:
    """The tensor names of a MindSpore .ckpt, in file order (weightport's own reader)."""
    from weightport.formats.mindspore.ckpt import MsCkptFile

    f = MsCkptFile(path)
    try:
        return list(f.entries)
    finally:
        f.close()


def assert_same_tensors(src: dict[str, torch.Tensor], back_dir: Path) -> None:
    """`back_dir`'s model.safetensors holds exactly `src`: names, dtypes, every bit."""
    from safetensors.torch import load_file

    back = load_file(back_dir / "model.safetensors")
    assert sorted(back) == sorted(src)
    for k in src:
        assert back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]), k


def rule_sets_round_trip(model, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    """Every format and layout that can hold `model`: random hub tensors go forward through its
    rules with the shapes the plan predicts and come back bit-identical. Returns what was checked."""
    from weightport.formats import FORMATS

    hub_shapes = model.hub_tensors()
    g = torch.Generator().manual_seed(0)
    hub = {n: torch.randn(s, generator=g).to(dtype) for n, s in hub_shapes.items()}
    checked = []
    for name, fmt in FORMATS.items():
        if model.arch.name not in fmt.archs:
            continue
        for layout in fmt.layouts_for(model) or (None,):
            rules = fmt.target_rules(model, layout)
            stored = apply_rules(rules, hub, backward=False)
            claimed = [f for r in rules for f in r.fmt]
            assert len(claimed) == len(set(claimed)) == len(stored), name
            for r in rules:
                planned = r.op.forward_shapes([tuple(hub_shapes[h]) for h in r.hub])
                assert [tuple(stored[f].shape) for f in r.fmt] == [tuple(s) for s in planned], (name, r)
            back = apply_rules(rules, stored, backward=True)
            assert sorted(back) == sorted(hub) and all(torch.equal(back[n], hub[n]) for n in hub), (name, layout)
            checked.append((name, layout))
    return checked


@pytest.fixture(scope="session")
def mindspore_peer():
    """Runs tests/peers/mindspore_peer.py jobs with the real MindSpore, in a subprocess.

    MindSpore installs next to torch and transformers (`make test` adds it to the test venv),
    but importing it alters the process for later tests (LD_LIBRARY_PATH and the protobuf
    implementation inherited by subprocesses, the recursion limit), so it runs apart.
    `run(ops, workdir)` returns one result dict per op. In CI it must be there.
    """
    exe = mindspore_python()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("mindspore missing in CI (`make test` must install it into the test venv)")
        pytest.skip("mindspore not installed; run `make test` to install it")

    def run(ops: list[dict], workdir: Path) -> list[dict]:
        job, result = Path(workdir) / "mindspore_job.json", Path(workdir) / "mindspore_result.json"
        job.write_text(json.dumps({"ops": ops}))
        proc = subprocess.run([exe, str(ROOT / "tests" / "peers" / "mindspore_peer.py"), str(job), str(result)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"mindspore peer failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())["results"]

    return run


MINDFORMERS_PEER = ROOT / "tests" / "peers" / "mindformers_peer.py"


class MindFormersPeer:
    """MindFormers' own Llama converter through tests/peers/mindformers_peer.py, in a subprocess."""

    def __init__(self, exe: str):
        self.exe = exe
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def _run(self, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.exe, str(MINDFORMERS_PEER), *args], capture_output=True, text=True, cwd=cwd, env=self.env)
        if proc.returncode != 0:  # the converter prints a failed from_pretrained to stdout
            raise AssertionError(f"mindformers peer {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return proc

    def convert(self, hf_dir: Path, out_ckpt: Path, dtype: str | None = None) -> dict:
        """One conversion; returns the peer's JSON line (versions and output)."""
        proc = self._run(["convert-llama", str(hf_dir), str(out_ckpt)] + (["--dtype", dtype] if dtype else []),
                         Path(out_ckpt).parent)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def convert_many(self, jobs: list[dict], workdir: Path) -> dict:
        """Jobs {"hf_dir", "out_ckpt", "dtype"} in one process; {"results": [{"output"} | {"error"}], versions}."""
        job, result = workdir / "mindformers_job.json", workdir / "mindformers_result.json"
        job.write_text(json.dumps({"jobs": [{k: str(v) if isinstance(v, Path) else v for k, v in j.items()}
                                            for j in jobs]}))
        self._run(["batch", str(job), str(result)], workdir)
        return json.loads(result.read_text())


@pytest.fixture(scope="session")
def mindformers_peer():
    """MindFormers (installed with --no-deps beside mindspore, in the Python that has mindspore).
    In CI it must be there."""
    exe = mindspore_python()
    probe = subprocess.run([exe, str(MINDFORMERS_PEER), "version"], capture_output=True, text=True) if exe else None
    if probe is None or probe.returncode != 0:
        why = "mindspore missing" if probe is None else (probe.stderr.strip().splitlines() or ["?"])[-1]
        if os.environ.get("CI"):
            pytest.fail(f"mindformers peer unavailable in CI (`make test` must install mindformers): {why}")
        pytest.skip(f"mindformers not installed ({why}); run `make test` to install it")
    return MindFormersPeer(exe)


def nanotron_python() -> str | None:
    """The Python that has PyPI `nanotron` (the test venv's own, unless told otherwise)."""
    exe = os.environ.get("WEIGHTPORT_NANOTRON_PYTHON")
    if exe:
        return exe if Path(exe).exists() else None
    import importlib.util

    return sys.executable if importlib.util.find_spec("nanotron") is not None else None


@pytest.fixture(scope="session")
def nanotron_peer():
    """Runs tests/peers/nanotron_peer.py jobs with the real Nanotron (PyPI 0.4, CPU, gloo), in a
    subprocess that starts one process per rank. `run(job, workdir)` returns the peer's result
    dict ({"nanotron", "checkpoint_version", "results": [one per op]}). In CI it must be there."""
    exe = nanotron_python()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("nanotron missing in CI (`make test` must install it into the test venv)")
        pytest.skip("nanotron not installed; run `make test` to install it")

    def run(job: dict, workdir: Path) -> dict:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        name = f"nanotron_tp{job.get('tp', 1)}_pp{job.get('pp', 1)}"
        path, result = workdir / f"{name}_job.json", workdir / f"{name}_result.json"
        path.write_text(json.dumps(job))
        proc = subprocess.run([exe, str(ROOT / "tests" / "peers" / "nanotron_peer.py"), str(path), str(result)],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise AssertionError(f"nanotron peer failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())

    return run
