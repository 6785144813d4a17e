"""LitGPT LoRA checkpoints (`litgpt finetune_lora`'s output: `lit_model.pth.lora` with only the lora_
parameters, `hyperparameters.yaml` with lora_r, lora_alpha and which layers were adapted), read as
deltas on Hugging Face weights.

Every LoRA layer's update is B @ A * lora_alpha / lora_r. The fused attention layer is the one
with structure: its lora_A stacks r rows per enabled part of (query, key, value) and its lora_B
stacks each enabled part's output rows (LoRAQKVLinear), so the update of q_proj is B_q @ A_q and a
disabled part is unchanged. The Hugging Face weight each LitGPT layer holds comes from the litgpt
format's own rules, so the mapping is declared once.
"""

from __future__ import annotations

from pathlib import Path


from ...archs import Model
from ...errors import WeightportError
from ...hf_config import load_yaml
from ...io import open_files
from ...io.parts import Made, PartsSource
from ...ops import Concat, Identity
from ...adapters import Adapter, Delta

LORA_FILE, HPARAMS = "lit_model.pth.lora", "hyperparameters.yaml"
PARTS = ("query", "key", "value")


def is_litgpt_lora(path: Path) -> bool:
    return (path.is_dir() and (path / LORA_FILE).is_file()) or path.name == LORA_FILE


def read_litgpt(path: Path, base: Model) -> Adapter:
    from . import FORMAT as LITGPT  # the litgpt format's rules say which HF weight each layer is

    lora_file = path / LORA_FILE if path.is_dir() else path
    hparams_path = lora_file.parent / HPARAMS
    if not hparams_path.is_file():
        raise WeightportError(f"{lora_file.parent}: no {HPARAMS} (it holds lora_r and lora_alpha)")
    hp = load_yaml(hparams_path) or {}
    try:
        r, alpha = int(hp["lora_r"]), float(hp["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise WeightportError(f"{hparams_path}: needs numeric lora_r and lora_alpha") from None
    enabled = tuple(bool(hp.get(f"lora_{p}", False)) for p in PARTS)
    raw = open_files([lora_file])
    try:
        deltas, made = _deltas(raw, lora_file, base, LITGPT.target_rules(base), r, alpha / r, enabled)
    except BaseException:
        raw.close()
        raise
    split = {n: "read as its q/k/v parts" for m in made.values() for n in [m.how.rsplit(" of ", 1)[1]]}
    return Adapter(lora_file, PartsSource({"": raw}, made), deltas, unused=split)


def _deltas(raw, where: Path, base: Model, rules, r: int, scale: float, enabled: tuple[bool, ...]):
    by_fmt = {rule.fmt: rule for rule in rules}
    modules = sorted({n.rsplit(".lora_", 1)[0] for n in raw.tensors if ".lora_" in n})
    unknown = [n for n in raw.tensors if ".lora_" not in n]
    if unknown:
        raise WeightportError(f"{where}: tensor {unknown[0]} is not a LoRA parameter (lora_A / lora_B)")
    deltas, made = [], {}
    for module in modules:
        a, b = f"{module}.lora_A", f"{module}.lora_B"
        if a not in raw.tensors or b not in raw.tensors:
            raise WeightportError(f"{where}: {module} lacks {'lora_B' if a in raw.tensors else 'lora_A'}")
        rule = by_fmt.get((f"{module}.weight",))
        if rule is None:
            raise WeightportError(f"{where}: LoRA on {module}, which a LitGPT {base.arch.name} with this config does not "
                                  "have (an adapter for another base model?)")
        a_shape, b_shape = raw.tensors[a].shape, raw.tensors[b].shape
        if isinstance(rule.op, Identity):
            if a_shape[0] != r:
                raise WeightportError(f"{where}: {a} has rank {a_shape[0]}, but {HPARAMS} says lora_r {r}")
            deltas.append(Delta(rule.hub[0].removesuffix(".weight"), a, b, scale, transpose=False))
        elif isinstance(rule.op, Concat) and len(rule.hub) == 3:
            parts = [(h, rows) for h, rows, on in zip(rule.hub, rule.op.sizes, enabled) if on]
            if a_shape[0] != r * len(parts) or b_shape[0] != sum(rows for _, rows in parts):
                raise WeightportError(f"{where}: {module} LoRA is A {list(a_shape)} / B {list(b_shape)}, which does "
                                      f"not match lora_r {r} on {', '.join(p for p, on in zip(PARTS, enabled) if on)}"
                                      f" ({HPARAMS})")
            row = 0
            for i, (h, rows) in enumerate(parts):
                name = h.removesuffix(".weight")
                made[f"{a}[{name}]"] = _slice(raw, a, i * r, r)
                made[f"{b}[{name}]"] = _slice(raw, b, row, rows)
                deltas.append(Delta(name, f"{a}[{name}]", f"{b}[{name}]", scale, transpose=False))
                row += rows
        else:
            raise WeightportError(f"{where}: LoRA on {module}, which holds {', '.join(rule.hub)} through {rule.op}; "
                                  "weightport merges LitGPT LoRA on plain and q/k/v-fused layers only")
    return deltas, made


def _slice(raw, name: str, start: int, rows: int) -> Made:
    meta = raw.tensors[name]
    return Made((rows, *meta.shape[1:]), meta.dtype, lambda: raw.load(name)[start:start + rows].clone(),
                f"rows {start}..{start + rows - 1} of {name}")
