"""One tensor source made of several checkpoints' sources plus tensors made on the spot, so a model
assembled from parts streams through the same plan and executor as a conversion."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .source import TensorMeta, TensorSource


@dataclass(frozen=True)
class Made:
    """A tensor no part holds: `make` computes it when the executor asks; `how` says how, for the
    plan and the user."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    how: str


class PartsSource(TensorSource):
    """`parts` by prefix ("text/", "vision/"): each part's tensors under prefix + its own name;
    `made` tensors under their own names."""

    def __init__(self, parts: dict[str, TensorSource], made: dict[str, Made]):
        """`parts` by prefix; tensors of a part are all exposed unless hide() narrows them."""
        self._parts = parts
        self._made = made
        self._owner: dict[str, tuple[TensorSource, str]] = {}
        self.tensors: dict[str, TensorMeta] = {}
        for prefix, part in parts.items():
            for name, meta in part.tensors.items():
                self.tensors[prefix + name] = replace(meta, name=prefix + name)
                self._owner[prefix + name] = (part, name)
        for name, m in made.items():
            self.tensors[name] = TensorMeta(name, m.shape, m.dtype, Path(f"<made: {m.how}>"))

    def hide(self, names: set[str]) -> None:
        """Leave these tensors out: a base checkpoint's tensors that a training checkpoint replaces
        are not the converted model's, and not worth a line each in the plan."""
        for n in names:
            self.tensors.pop(n, None)

    def load(self, name: str) -> torch.Tensor:
        if name in self._made:
            m = self._made[name]
            t = m.make()
            if tuple(t.shape) != m.shape or t.dtype != m.dtype:
                raise AssertionError(f"{name}: made {tuple(t.shape)} {t.dtype}, planned {m.shape} {m.dtype}")
            return t
        part, own = self._owner[name]
        return part.load(own)

    def _delegate(self, method: str, name: str, *args):
        if name in self._made:
            return None
        part, own = self._owner[name]
        return getattr(part, method)(own, *args)

    def mapped(self, name):
        return self._delegate("mapped", name)

    def release(self, name):
        self._delegate("release", name)

    def iter_chunks(self, name, chunk_bytes):
        return self._delegate("iter_chunks", name, chunk_bytes)

    def shares_storage(self, a, b):
        pa, pb = self._owner.get(a), self._owner.get(b)
        return pa is not None and pb is not None and pa[0] is pb[0] and pa[0].shares_storage(pa[1], pb[1])

    @property
    def skipped(self) -> dict[str, str]:
        return {k: v for p in self._parts.values() for k, v in p.skipped.items()}

    @property
    def files(self) -> list[Path]:
        return [f for p in self._parts.values() for f in p.files]

    def close(self) -> None:
        for p in self._parts.values():
            p.close()
