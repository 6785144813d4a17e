"""The closed set of reversible tensor operations that format rules are written in.

Every op maps a list of tensors to a list of tensors and has an exact inverse, so one
declaration gives both directions of a conversion. `forward_shapes`/`inverse_shapes` let a plan
be checked from file headers before any tensor data is read. Ops are written in the direction
hub (Hugging Face layout) -> format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


class Op:
    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def inverse(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward_shapes(self, shapes: list[Shape]) -> list[Shape]:
        raise NotImplementedError

    def inverse_shapes(self, shapes: list[Shape]) -> list[Shape]:
        raise NotImplementedError

    def __str__(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Identity(Op):
    def forward(self, xs):
        return list(xs)

    inverse = forward

    def forward_shapes(self, shapes):
        return list(shapes)

    inverse_shapes = forward_shapes

    def __str__(self):
        return "rename"


@dataclass(frozen=True)
class Concat(Op):
    """n tensors -> one, joined along `dim`; the inverse splits by `sizes`."""

    sizes: tuple[int, ...]
    dim: int = 0

    def forward(self, xs):
        return [torch.cat(xs, dim=self.dim)]

    def inverse(self, ys):
        return [t.clone() for t in torch.split(ys[0], list(self.sizes), dim=self.dim)]

    def forward_shapes(self, shapes):
        _check_sizes(self, [s[self.dim] for s in shapes])
        out = list(shapes[0])
        out[self.dim] = sum(self.sizes)
        return [tuple(out)]

    def inverse_shapes(self, shapes):
        (s,) = shapes
        if s[self.dim] != sum(self.sizes):
            raise ValueError(f"dim {self.dim} is {s[self.dim]}, expected {sum(self.sizes)} = {' + '.join(map(str, self.sizes))}")
        outs = []
        for n in self.sizes:
            o = list(s)
            o[self.dim] = n
            outs.append(tuple(o))
        return outs

    def __str__(self):
        return f"concat(dim={self.dim}, sizes={list(self.sizes)})"


@dataclass(frozen=True)
class Invert(Op):
    """The inverse of another op, as an op: Invert(Concat(...)) is a split."""

    op: Op

    def forward(self, xs):
        return self.op.inverse(xs)

    def inverse(self, ys):
        return self.op.forward(ys)

    def forward_shapes(self, shapes):
        return self.op.inverse_shapes(shapes)

    def inverse_shapes(self, shapes):
        return self.op.forward_shapes(shapes)

    def __str__(self):
        if isinstance(self.op, Concat):
            return f"split(dim={self.op.dim}, sizes={list(self.op.sizes)})"
        return f"inverse({self.op})"


def Split(sizes: tuple[int, ...], dim: int = 0) -> Op:
    return Invert(Concat(tuple(sizes), dim))


@dataclass(frozen=True)
class GroupInterleave(Op):
    """[A; B; C] (each `groups` blocks along dim 0) -> [A0; B0; C0; A1; B1; C1; ...].

    This is the per-query-group qkv layout of lit-gpt <= 0.5.4 and of several Megatron-style
    trainers, with `parts` the row counts of A, B and C in total.
    """

    parts: tuple[int, ...]
    groups: int

    def _blocks(self):
        for p in self.parts:
            if p % self.groups:
                raise ValueError(f"part of {p} rows does not split into {self.groups} groups")
        return [p // self.groups for p in self.parts]

    def forward(self, xs):
        (x,) = xs
        blocks = self._blocks()
        pieces = [t.split(b, dim=0) for t, b in zip(x.split(list(self.parts), dim=0), blocks)]
        return [torch.cat([pieces[p][g] for g in range(self.groups) for p in range(len(self.parts))], dim=0)]

    def inverse(self, ys):
        (y,) = ys
        blocks = self._blocks()
        per_group = y.split(sum(blocks), dim=0)
        parts = [[grp.split(blocks, dim=0)[p] for grp in per_group] for p in range(len(self.parts))]
        return [torch.cat([torch.cat(p, dim=0) for p in parts], dim=0)]

    def forward_shapes(self, shapes):
        (s,) = shapes
        self._blocks()
        if s[0] != sum(self.parts):
            raise ValueError(f"dim 0 is {s[0]}, expected {sum(self.parts)}")
        return [s]

    inverse_shapes = forward_shapes

    def __str__(self):
        return f"interleave(groups={self.groups}, parts={list(self.parts)})"


@dataclass(frozen=True)
class RotaryPermute(Op):
    """Hugging Face rotate-half rotary rows -> the interleaved (Meta / GPT-J) pairing, per head.

    The inverse is the permutation transformers' convert_llama_weights_to_hf.py applies to q/k.
    """

    n_heads: int
    head_dim: int

    def forward(self, xs):
        (x,) = xs
        rest = x.shape[1:]
        return [x.reshape(self.n_heads, 2, self.head_dim // 2, *rest).transpose(1, 2).reshape(x.shape).contiguous()]

    def inverse(self, ys):
        (y,) = ys
        rest = y.shape[1:]
        return [y.reshape(self.n_heads, self.head_dim // 2, 2, *rest).transpose(1, 2).reshape(y.shape).contiguous()]

    def forward_shapes(self, shapes):
        (s,) = shapes
        if s[0] != self.n_heads * self.head_dim or self.head_dim % 2:
            raise ValueError(f"dim 0 is {s[0]}, expected {self.n_heads} heads x {self.head_dim}")
        return [s]

    inverse_shapes = forward_shapes

    def __str__(self):
        return f"rotary_permute(heads={self.n_heads}, head_dim={self.head_dim})"


@dataclass(frozen=True)
class Transpose(Op):
    def forward(self, xs):
        return [xs[0].t().contiguous()]

    inverse = forward

    def forward_shapes(self, shapes):
        (s,) = shapes
        if len(s) != 2:
            raise ValueError(f"transpose needs a matrix, got shape {list(s)}")
        return [(s[1], s[0])]

    inverse_shapes = forward_shapes


@dataclass(frozen=True)
class Parallel(Op):
    """n tensors, each through its own single-tensor op (e.g. q and k permuted, v kept)."""

    ops: tuple[Op, ...]

    def forward(self, xs):
        return [op.forward([x])[0] for op, x in zip(self.ops, xs, strict=True)]

    def inverse(self, ys):
        return [op.inverse([y])[0] for op, y in zip(self.ops, ys, strict=True)]

    def forward_shapes(self, shapes):
        return [op.forward_shapes([s])[0] for op, s in zip(self.ops, shapes, strict=True)]

    def inverse_shapes(self, shapes):
        return [op.inverse_shapes([s])[0] for op, s in zip(self.ops, shapes, strict=True)]

    def __str__(self):
        return "parallel(" + ", ".join(map(str, self.ops)) + ")"


def Each(op: Op, n: int) -> Op:
    """One single-tensor op applied to each of n tensors."""
    return Parallel((op,) * n)


@dataclass(frozen=True)
class AddAxis(Op):
    """A size-1 axis inserted at `dim`; the inverse removes it (and refuses one that is not size 1)."""

    dim: int

    def forward(self, xs):
        return [xs[0].unsqueeze(self.dim)]

    def inverse(self, ys):
        return [ys[0].squeeze(self.dim)]

    def forward_shapes(self, shapes):
        (s,) = shapes
        return [(*s[:self.dim], 1, *s[self.dim:])]

    def inverse_shapes(self, shapes):
        (s,) = shapes
        if len(s) <= self.dim or s[self.dim] != 1:
            raise ValueError(f"expected size 1 at dim {self.dim}, got shape {list(s)}")
        return [(*s[:self.dim], *s[self.dim + 1:])]

    def __str__(self):
        return f"add_axis(dim={self.dim})"


@dataclass(frozen=True)
class Stack(Op):
    """n same-shaped tensors (e.g. one per expert) -> one with a new leading dim."""

    n: int

    def forward(self, xs):
        return [torch.stack(xs, dim=0)]

    def inverse(self, ys):
        return [t.clone() for t in ys[0].unbind(0)]

    def forward_shapes(self, shapes):
        if len(set(shapes)) != 1:
            raise ValueError(f"cannot stack differently shaped tensors {sorted(set(shapes))}")
        return [(len(shapes), *shapes[0])]

    def inverse_shapes(self, shapes):
        (s,) = shapes
        if s[0] != self.n:
            raise ValueError(f"dim 0 is {s[0]}, expected {self.n}")
        return [tuple(s[1:])] * self.n

    def __str__(self):
        return f"stack({self.n})"


@dataclass(frozen=True)
class Tie(Op):
    """One shared tensor -> the two names a format stores it under; the inverse checks they agree."""

    def forward(self, xs):
        return [xs[0], xs[0]]

    def inverse(self, ys):
        a, b = ys
        if a.shape != b.shape or not torch.equal(a, b):
            raise TiedWeightsDiffer()
        return [a]

    def forward_shapes(self, shapes):
        return [shapes[0], shapes[0]]

    def inverse_shapes(self, shapes):
        if shapes[0] != shapes[1]:
            raise ValueError(f"tied tensors have shapes {list(shapes[0])} and {list(shapes[1])}")
        return [shapes[0]]

    def __str__(self):
        return "tie"


class TiedWeightsDiffer(ValueError):
    def __str__(self):
        return "tensors stored as tied differ; the config says tied, so refusing to drop one"


@dataclass(frozen=True)
class PadRows(Op):
    """Rows appended along dim 0 (vocabulary padding, new tokens): zeros, or with fill="mean" the
    mean of the existing rows (what transformers' mean_resizing centres new embeddings on, without
    its random spread, so the result is deterministic); the inverse drops them."""

    rows: int
    padded_rows: int
    fill: str = "zero"

    def forward(self, xs):
        (x,) = xs
        n = self.padded_rows - self.rows
        if self.fill == "mean":
            # summed in float32 a block at a time: no float32 copy of a whole vocabulary table
            total = torch.zeros(x.shape[1:], dtype=torch.float32)
            for block in torch.split(x, 8192):
                total += block.float().sum(0)
            pad = (total / x.shape[0]).to(x.dtype).expand(n, *x.shape[1:])
        else:
            pad = x.new_zeros((n, *x.shape[1:]))
        return [torch.cat([x, pad], dim=0)]

    def inverse(self, ys):
        return [ys[0][: self.rows].clone()]

    def forward_shapes(self, shapes):
        (s,) = shapes
        if s[0] != self.rows:
            raise ValueError(f"dim 0 is {s[0]}, expected {self.rows}")
        return [(self.padded_rows, *s[1:])]

    def inverse_shapes(self, shapes):
        (s,) = shapes
        if s[0] != self.padded_rows:
            raise ValueError(f"dim 0 is {s[0]}, expected {self.padded_rows}")
        return [(self.rows, *s[1:])]

    def __str__(self):
        return f"pad_rows({self.rows}->{self.padded_rows}{', mean' if self.fill == 'mean' else ''})"


@dataclass(frozen=True)
class MergeLora(Op):
    """Reading only: the stored weight (through `inner`, the format's own op for it) plus
    scale * (B @ A) of a LoRA adapter, computed in float32 and cast back to the weight's dtype.
    `embedding`: PEFT's embedding LoRA, whose delta is (B @ A) transposed; `fan_in_fan_out`: the
    weight is stored [in, out] (GPT-2's Conv1D), so the delta is too. A merge has no inverse, so
    writing (forward) refuses."""

    scale: float
    inner: Op
    n_inner: int = 1
    transpose: bool = False

    def forward(self, xs):
        raise NotImplementedError("a merged LoRA cannot be split off again")

    def inverse(self, ys):
        (w,) = self.inner.inverse(ys[: self.n_inner])
        a, b = ys[self.n_inner:]
        delta = b.float() @ a.float()
        if self.transpose:
            delta = delta.T
        # in place: one float32 buffer per weight instead of three (the same sums as W + delta * scale)
        return [delta.mul_(self.scale).add_(w).to(w.dtype)]

    def forward_shapes(self, shapes):
        raise ValueError("a merged LoRA cannot be written back as one")

    def inverse_shapes(self, shapes):
        (w,) = self.inner.inverse_shapes(shapes[: self.n_inner])
        a, b = shapes[self.n_inner:]
        delta = (b[0], a[1]) if not self.transpose else (a[1], b[0])
        if a[0] != b[1]:
            raise ValueError(f"LoRA A has rank {a[0]} and B rank {b[1]}")
        if tuple(w) != delta:
            raise ValueError(f"LoRA B @ A is {list(delta)}, the weight {list(w)}")
        return [w]

    def __str__(self):
        return f"merge_lora(scale={self.scale:g})" + ("" if isinstance(self.inner, Identity) else f" after {self.inner}")


@dataclass(frozen=True)
class Cast(Op):
    """A dtype change that a format requires (exact only when widening)."""

    source: torch.dtype
    target: torch.dtype

    def forward(self, xs):
        return [x.to(self.target) for x in xs]

    def inverse(self, ys):
        return [y.to(self.source) for y in ys]

    def forward_shapes(self, shapes):
        return list(shapes)

    inverse_shapes = forward_shapes

    def __str__(self):
        return f"cast({self.source}->{self.target})"


@dataclass(frozen=True)
class Chain(Op):
    ops: tuple[Op, ...]

    def forward(self, xs):
        for op in self.ops:
            xs = op.forward(xs)
        return xs

    def inverse(self, ys):
        for op in reversed(self.ops):
            ys = op.inverse(ys)
        return ys

    def forward_shapes(self, shapes):
        for op in self.ops:
            shapes = op.forward_shapes(shapes)
        return shapes

    def inverse_shapes(self, shapes):
        for op in reversed(self.ops):
            shapes = op.inverse_shapes(shapes)
        return shapes

    def __str__(self):
        return " then ".join(str(o) for o in self.ops)


def _check_sizes(op: Concat, got: list[int]) -> None:
    if tuple(got) != tuple(op.sizes):
        raise ValueError(f"parts along dim {op.dim} are {got}, expected {list(op.sizes)}")

