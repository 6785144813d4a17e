"""A checkpoint read as hub tensors, one rule group at a time.

Each read step (format -> hub) runs once, when the first of its outputs is asked for; its outputs
stay only until every planned use has taken them, so memory holds one group, not the model.
"""

from __future__ import annotations

from collections import Counter

import torch

from .errors import WeightportError
from .io import TensorSource
from .ops import Identity, TiedWeightsDiffer
from .plan import Step


class HubTensors:
    def __init__(self, source: TensorSource, read_steps: list[Step], uses: Counter | None = None):
        self.source = source
        self.producer = {h: step for step in read_steps for h in step.outputs}
        # by default each hub tensor is taken once
        self.uses = Counter(self.producer.keys()) if uses is None else uses
        self._cache: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            step = self.producer[name]
            inputs = [self.source.load(n) for n in step.inputs]
            try:
                outs = step.run(inputs)
            except TiedWeightsDiffer as e:
                where = self.source.tensors[step.inputs[0]].file
                raise WeightportError(f"{where}: tensors {', '.join(step.inputs)}: {e}") from None
            self._cache.update(zip(step.outputs, outs))
        t = self._cache[name]
        self.uses[name] -= 1
        if self.uses[name] <= 0:
            del self._cache[name]
        return t

    def renamed_from(self, name: str) -> str | None:
        """The stored tensor `name` is a plain rename of, when nothing else needs it read whole:
        then a caller may stream its bytes instead of `take`-ing it, and call `skip` after."""
        step = self.producer[name]
        if (isinstance(step.op, Identity) and len(step.inputs) == 1 and name not in self._cache
                and self.uses[name] == 1):
            return step.inputs[0]
        return None

    def skip(self, name: str) -> None:
        """Count one use of `name` as done without reading it."""
        self.uses[name] -= 1
