"""`weightport convert LITGPT_LORA OUT --to peft`: a LitGPT LoRA checkpoint as a PEFT adapter directory,
so the adapter can stay separate from the base in Hugging Face tooling.

The fused q/k/v LoRA is split into q_proj/k_proj/v_proj LoRAs (each part's own rows of A and B),
the other layers are renamed to their Hugging Face modules, and r / lora_alpha carry over (both
libraries scale by lora_alpha / r). Written like every output: into a temporary sibling, renamed
into place when complete.
"""

from __future__ import annotations

import json
from pathlib import Path


from ...archs import model_from_hf_config
from ...errors import WeightportError
from ...hf_config import load_yaml
from ..litgpt.config import to_hf
from ...io.safetensors_file import SafetensorsStreamWriter
from ...staging import staged
from ...provenance import hash_files, save_manifest, tensor_sha256
from ...version import __version__
from ..litgpt.lora import HPARAMS, LORA_FILE, read_litgpt

PREFIX = "base_model.model."


def litgpt_lora_to_peft(src: Path, out: Path, force: bool = False, delete_existing: bool = False) -> list[str]:
    """Write the PEFT adapter; returns the adapted module names."""
    lora_dir = src if src.is_dir() else src.parent
    config_yaml = lora_dir / "model_config.yaml"
    if not config_yaml.is_file():
        raise WeightportError(f"{lora_dir}: no model_config.yaml (the base model's LitGPT config, which "
                              "litgpt finetune_lora writes beside the adapter)")
    # LitGPT's config has no tying flag; an untied base has every layer a LoRA can target
    base = model_from_hf_config(to_hf(load_yaml(config_yaml) or {}, tied=False), str(config_yaml))
    hp = load_yaml(lora_dir / HPARAMS) or {}
    adapter = read_litgpt(src, base)
    try:
        with staged(out, force, delete_existing) as (tmp, _):
            names = [(f"{PREFIX}{d.module}.lora_{ab}.weight", getattr(d, ab.lower())) for d in adapter.deltas
                     for ab in "AB"]
            writer = SafetensorsStreamWriter(tmp / "adapter_model.safetensors",
                                             [(n, adapter.source.tensors[s].shape, adapter.source.tensors[s].dtype)
                                              for n, s in names], {"format": "pt"})
            hashes = {}
            for n, s in names:
                t = adapter.source.load(s).contiguous()
                writer.write(n, t)
                hashes[n] = tensor_sha256(t)
            writer.close()
            targets = sorted({d.module.rsplit(".", 1)[1] for d in adapter.deltas})
            config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(hp["lora_r"]),
                      "lora_alpha": hp["lora_alpha"], "lora_dropout": float(hp.get("lora_dropout", 0.0)),
                      "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                      "use_dora": False, "modules_to_save": None, "inference_mode": True,
                      "base_model_name_or_path": str(hp.get("checkpoint_dir", "")) or None}
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            # what makes the directory weightport's to replace (--force), and checkable (verify --manifest)
            save_manifest(tmp, {"tool": "weightport", "version": __version__,
                                "source": {"path": str(src.resolve()), "format": "litgpt LoRA"},
                                "target": {"format": "peft"}, "files": hash_files(tmp),
                                "tensors": {n: {"file": "adapter_model.safetensors", "sha256": h}
                                            for n, h in hashes.items()}})
        return [d.module for d in adapter.deltas]
    finally:
        adapter.source.close()


__all__ = ["LORA_FILE", "litgpt_lora_to_peft"]
