"""What an architecture declares: its hub (Hugging Face) tensors, from its config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """The sizes that tensor shapes and format rules are written in."""

    n_layer: int
    hidden: int
    n_head: int
    n_kv: int
    head_dim: int
    intermediate: int
    vocab: int
    n_expert: int = 0
    tied: bool = False

    @property
    def q_rows(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.n_kv * self.head_dim


def standard_dims(cfg: dict, **override) -> Dims:
    """Dims from the config keys most Hugging Face decoders share; `override` gives what an
    architecture names or derives differently."""
    heads = cfg["num_attention_heads"]
    sizes = dict(n_layer=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], n_head=heads,
                 n_kv=cfg.get("num_key_value_heads") or heads,
                 head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                 intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                 tied=bool(cfg.get("tie_word_embeddings", False)))
    sizes.update(override)
    return Dims(**sizes)


@dataclass(frozen=True)
class Arch:
    """One architecture: how to read its sizes from config.json and which tensors it has."""

    name: str
    hf_class: str
    model_type: str
    title: str
    dims: Callable[[dict], Dims]
    tensors: Callable[[Dims, dict], list[tuple[str, Shape]]]
    # tensors some checkpoints carry that the model recomputes; dropped on purpose
    droppable: tuple[str, ...] = ()
    variants: tuple[str, ...] = field(default=())
    # (hub prefix, stored prefix) pairs for checkpoints that name the same tensors differently: one
    # saved from the base model alone (GPT2Model's files lack "transformer."), or by another
    # transformers generation (5.x drops LLaVA's "vision_model.")
    aliases: tuple[tuple[str, str], ...] = ()
    # what `verify` can run: a decoder taking token ids (AutoModelForCausalLM), not e.g. Whisper
    causal_lm: bool = True

    def is_droppable(self, name: str) -> bool:
        return any(re.fullmatch(re.escape(t).replace(r"\{l\}", r"\d+").replace(r"\{e\}", r"\d+"), name)
                   for t in self.droppable)


@dataclass(frozen=True)
class Model:
    """An architecture with a concrete config: everything a plan needs about the network."""

    arch: Arch
    config: dict
    dims: Dims

    def hub_tensors(self) -> dict[str, Shape]:
        return dict(self.arch.tensors(self.dims, self.config))
