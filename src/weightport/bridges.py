"""Architecture changes (`--to-arch`): one architecture's tensors rewritten as another's, for models
that compute the same function. Rules are declared hub(target arch) -> hub(source arch), like a
format's, so the same ops and plan checks apply, and they compose with the source format's own
rules: no intermediate copy on disk.

Phi-3 -> Llama (xtuner's convert_phi_to_llama.py, which the official LLaVA codebase needs): Phi-3's
fused qkv_proj splits by [heads, kv heads, kv heads] x head_dim, gate_up_proj gate-first; both use
the same rotate-half rotary, so no permutation. Exact when Phi-3 applies nothing Llama lacks; a
sliding window or long-rope scaling is converted only with --allow-approximate, saying what changes.
"""

from __future__ import annotations

from dataclasses import replace

from .archs import Model, model_from_hf_config
from .archs.llava import TEXT, text_config
from .errors import WeightportError
from .format import Checkpoint
from .hf_config import rope_parameters
from .ops import Chain, Concat
from .rules import Rule, expand

L = "model.layers.{l}"
# Phi-3 config keys that Llama has no use for at inference: dropouts (a no-op in eval) and the
# long-rope base length (only read with rope scaling, which is refused or dropped)
PHI3_ONLY = ("resid_pdrop", "embd_pdrop", "original_max_position_embeddings", "sliding_window", "auto_map",
             "_name_or_path", "architectures", "rope_scaling")


def _phi3_rules(model: Model) -> list[Rule]:
    d = model.dims
    rules = [Rule((f"{L}.self_attn.q_proj.weight", f"{L}.self_attn.k_proj.weight", f"{L}.self_attn.v_proj.weight"),
                  f"{L}.self_attn.qkv_proj.weight", Concat((d.q_rows, d.kv_rows, d.kv_rows))),
             Rule((f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"), f"{L}.mlp.gate_up_proj.weight",
                  Concat((d.intermediate, d.intermediate)))]
    return expand(rules, d.n_layer, 0, set(model.hub_tensors()))


def phi3_to_llama_config(cfg: dict, allow_approximate: bool) -> tuple[dict, list[str]]:
    """Llama config.json for a Phi-3 one, and warnings for what --allow-approximate let through."""
    rope, warnings = rope_parameters(cfg), []
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise WeightportError(f"partial_rotary_factor {partial}: Phi-3 rotates only part of each head and Llama "
                              "rotates all of it, so every output would change; not convertible to llama")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        what = (f"rope_type {kind!r} (Phi-3's long-context scaling of the rotary frequencies): Llama applies "
                "none, so outputs differ at every length")
        if not allow_approximate:
            raise WeightportError(f"{what}; pass --allow-approximate to convert anyway (only the 4k Phi-3 "
                                  "models convert exactly)")
        warnings.append(f"{what}; dropped")
    window, positions = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 4096)
    if window is not None and window < positions:
        what = (f"sliding_window {window}: Phi-3 attends to the last {window} tokens, Llama to all of them, so "
                f"outputs are equal only for sequences of at most {window} tokens (max_position_embeddings "
                f"{positions})")
        if not allow_approximate:
            raise WeightportError(f"{what}; pass --allow-approximate to convert anyway")
        warnings.append(f"{what}; dropped")
    out = {k: v for k, v in cfg.items() if k not in PHI3_ONLY}
    out.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
               head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
               rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)})
    out.pop("rope_theta", None)
    return out, warnings


def _compose(source: Checkpoint, bridge: list[Rule], prefix: str) -> list[Rule]:
    """Source rules with the bridge's target-arch hub names in front of the source-arch ones."""
    produced = {}
    for r in source.rules:
        for h in r.hub:
            produced[h] = r
    fused = {prefix + n for r in bridge for n in r.fmt}
    rules = [r for r in source.rules if not fused & set(r.hub)]
    for b in bridge:
        (name,) = (prefix + n for n in b.fmt)
        inner = produced[name]
        if len(inner.hub) != 1:
            raise WeightportError(f"{source.path}: {name} is stored together with other tensors "
                                  f"({', '.join(inner.hub)}); convert to hf first, then change the architecture")
        rules.append(Rule(tuple(prefix + h for h in b.hub), inner.fmt, Chain((b.op, inner.op))))
    return rules


def to_arch(source: Checkpoint, arch: str, allow_approximate: bool = False) -> Checkpoint:
    """`source` as a checkpoint of architecture `arch` (its text model, for LLaVA)."""
    model = source.model
    llava = model.arch.name == "llava"
    text_cfg = text_config(model.config) if llava else model.config
    have = text_cfg.get("model_type")
    if have == arch:
        return source
    if (have, arch) != ("phi3", "llama"):
        raise WeightportError(f"--to-arch {arch}: weightport changes phi3 to llama only (this model's "
                              f"{'text model ' if llava else ''}is {have})")
    new_text, warnings = phi3_to_llama_config(text_cfg, allow_approximate)
    prefix = TEXT if llava else ""
    if llava:
        text_model = model_from_hf_config(text_cfg, "text_config")
        new_cfg = dict(model.config, text_config={k: v for k, v in new_text.items() if k != "architectures"})
    else:
        text_model, new_cfg = model, new_text
    rules = _compose(source, _phi3_rules(model_from_hf_config(new_text, "llama config")), prefix)
    new_model = model_from_hf_config(new_cfg, f"{source.path} (as llama)")
    assert text_model.dims == model_from_hf_config(new_text, "llama config").dims
    note = (f"architecture changed: phi3 -> llama ({'text model: ' if llava else ''}qkv_proj split into q/k/v by "
            f"[{text_model.dims.q_rows}, {text_model.dims.kv_rows}, {text_model.dims.kv_rows}] rows, gate_up_proj "
            "into gate/up, gate first)")
    return replace(source, model=new_model, rules=rules, notes=source.notes + [note],
                   warnings=source.warnings + warnings)
