"""The parameters held flat: one float vector per weight-decay group instead of one array per
parameter, so the optimizer's update, the EMA and the gradient norm are a few kernels over a
few vectors rather than a few kernels per parameter (hundreds of parameters in a model).

`FlatLayout` places every leaf of a parameter pytree (in `jax.tree.leaves` order) in the vector
of its group ("decay" or "keep", by the weight-decay mask), at an offset; each leaf takes a
whole number of ROW-element rows, the rest of its last row zero. A flat parameter set is a
dict {group: (n_rows * ROW,) vector}; the padding stays zero under AdamW and the EMA (its
gradients are zero).

    unravel(flat) -> tree      slices reshaped to the leaves (what the model reads); its VJP is
                               `ravel` of the cotangents: the gradient arrives flat
    ravel(tree) -> flat        the leaves padded and concatenated per group
    leaf_square_sums(flat)     each leaf's sum of squares, (n_leaves,) float32: row sums and
                               one segment sum per group
    flat_tree(x) / tree_flat(x) every flat dict inside a pytree (a TrainState, an optax
                               state) replaced by its tree, or every parameter tree by its flat
                               dict: checkpoints hold trees, whatever the layout trained with

This module knows nothing of models or optimizers; `state` and `step` use it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROW = 1024  # elements per row; every leaf starts at a row boundary
GROUPS = ("decay", "keep")  # the weight-decay mask's True and False leaves


@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout:
    """Where each parameter leaf lives in the flat vectors.

    treedef: the parameter pytree's structure; shapes: each leaf's shape (leaf order);
    dtype: the one parameter dtype; group: each leaf's group name; offset: each leaf's first
    element in its group's vector (a multiple of ROW); rows: {group: rows of its vector}.
    """
    treedef: Any
    shapes: tuple
    dtype: Any
    group: tuple
    offset: tuple
    rows: dict

    @classmethod
    def from_params(cls, params: Any, decay_mask: Any) -> "FlatLayout":
        """The layout of `params` (arrays or ShapeDtypeStructs, one floating dtype) grouped by
        `decay_mask` (a pytree of bools like params, `optim.weight_decay_mask`'s).
        Raises ValueError for mixed or non-float dtypes, or a mask of another structure."""
        leaves, treedef = jax.tree.flatten(params)
        mask = jax.tree.leaves(decay_mask)
        if len(mask) != len(leaves) or jax.tree.structure(decay_mask) != treedef:
            raise ValueError("FlatLayout: the decay mask must have the structure of the params")
        dtypes = {jnp.dtype(x.dtype) for x in leaves}
        if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
            raise ValueError(f"FlatLayout: the flat parameter layout needs every parameter in "
                             f"one float dtype; got {sorted(d.name for d in dtypes)}")
        rows = {g: 0 for g in GROUPS}
        group, offset = [], []
        for x, decay in zip(leaves, mask):
            g = GROUPS[0] if bool(decay) else GROUPS[1]
            group.append(g)
            offset.append(rows[g] * ROW)
            rows[g] += -(-int(np.prod(x.shape, dtype=np.int64)) // ROW)
        rows = {g: n for g, n in rows.items() if n}
        return cls(treedef, tuple(tuple(x.shape) for x in leaves), dtypes.pop(), tuple(group),
                   tuple(offset), rows)

    @property
    def n_leaves(self) -> int:
        return len(self.shapes)

    @property
    def group_mask(self) -> dict:
        """{group: True for "decay"}: the weight-decay mask of a flat parameter dict."""
        return {g: g == GROUPS[0] for g in self.rows}

    def abstract(self) -> dict:
        """{group: ShapeDtypeStruct (rows * ROW,)}: the flat parameters' shapes."""
        return {g: jax.ShapeDtypeStruct((n * ROW,), self.dtype) for g, n in self.rows.items()}

    def _sizes(self):
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    def ravel(self, tree: Any) -> dict:
        """tree (the parameters' structure and shapes) -> {group: (rows * ROW,) vector} in the
        layout's dtype, each leaf at its offset, zeros between."""
        leaves = self.treedef.flatten_up_to(tree)
        parts = {g: [] for g in self.rows}
        for x, shape, g, size in zip(leaves, self.shapes, self.group, self._sizes()):
            if tuple(x.shape) != shape:
                raise ValueError(f"FlatLayout.ravel: a leaf of shape {tuple(x.shape)} where the "
                                 f"layout has {shape}")
            v = jnp.ravel(x).astype(self.dtype)
            pad = -size % ROW
            parts[g].append(jnp.pad(v, (0, pad)) if pad else v)
        return {g: jnp.concatenate(p) if len(p) > 1 else p[0] for g, p in parts.items()}

    def unravel(self, flat: dict) -> Any:
        """{group: vector} -> the parameter tree (slices of the vectors); differentiable, with
        the cotangent tree raveled (one concatenation per group) as the VJP."""
        return _unravel(self, flat)

    def _slices(self, flat: dict) -> Any:
        leaves = [jax.lax.slice(flat[g], (o,), (o + size,)).reshape(shape)
                  for shape, g, o, size in zip(self.shapes, self.group, self.offset,
                                               self._sizes())]
        return self.treedef.unflatten(leaves)

    def leaf_square_sums(self, flat: dict) -> jax.Array:
        """Each leaf's sum of squares, float32 (n_leaves,) in leaf order: per group, the
        vector's row sums (one reduction) added up per leaf (one sorted segment sum over the
        rows). An optimization barrier keeps the row sums a reduction of their own: XLA's GPU
        backend otherwise fuses them into the segment sum's scatter, where each thread sums a
        row serially (benchmarks/results/train_throughput_flat_h100_profile.md)."""
        sizes, sums = self._sizes(), []
        for g, n in self.rows.items():
            rows = jnp.sum(jnp.square(flat[g].astype(jnp.float32).reshape(n, ROW)), axis=1)
            rows = jax.lax.optimization_barrier(rows)
            members = [i for i in range(self.n_leaves) if self.group[i] == g]
            ids = np.empty((n,), np.int32)
            for k, i in enumerate(members):
                first = self.offset[i] // ROW
                ids[first:first + -(-sizes[i] // ROW)] = k
            sums.append((members, jax.ops.segment_sum(rows, jnp.asarray(ids), len(members),
                                                      indices_are_sorted=True)))
        order = np.argsort(np.concatenate([np.asarray(m, np.int64) for m, _ in sums]))
        return jnp.concatenate([s for _, s in sums])[order]

    def is_flat(self, x: Any) -> bool:
        """Whether x is a flat parameter dict of this layout (arrays or shape structs)."""
        return (isinstance(x, dict) and set(x) == set(self.rows)
                and all(hasattr(v, "shape") and tuple(v.shape) == (self.rows[g] * ROW,)
                        for g, v in x.items()))

    def is_tree(self, x: Any) -> bool:
        """Whether x has the parameter tree's structure and shapes."""
        if jax.tree.structure(x) != self.treedef:
            return False
        return all(tuple(getattr(v, "shape", ())) == s
                   for v, s in zip(jax.tree.leaves(x), self.shapes))

    def flat_tree(self, x: Any) -> Any:
        """x (any pytree: a TrainState, an optax state) with every flat dict of this layout
        replaced by its parameter tree (`unravel`); other leaves untouched."""
        return jax.tree.map(lambda v: self._slices(v) if self.is_flat(v) else v, x,
                            is_leaf=self.is_flat)

    def tree_flat(self, x: Any) -> Any:
        """x with every parameter tree replaced by its flat dict (`ravel`)."""
        return jax.tree.map(lambda v: self.ravel(v) if self.is_tree(v) else v, x,
                            is_leaf=self.is_tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _unravel(layout: FlatLayout, flat: dict) -> Any:
    return layout._slices(flat)


def _unravel_fwd(layout, flat):
    return layout._slices(flat), None


def _unravel_bwd(layout, _, ct):
    return (layout.ravel(ct),)


_unravel.defvjp(_unravel_fwd, _unravel_bwd)
