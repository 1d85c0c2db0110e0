"""The optimiser: AdamW with warm-up + cosine decay, global-norm clipping, a weight-decay mask,
and the exponential moving average (EMA) of the parameters used for sampling.

Parameters and optimizer state are kept in `config.train.param_dtype` (float32 by default);
the model computes in `config.model.compute_dtype`. Gradient accumulation is done by the train
step (an explicit scan over micro-batches, see `dimba_jax.train.step`), not here.

Two implementations of the same update, chosen by `config.train.flat_update`:
  - the optax chain of `make_optimizer` (leaf by leaf), followed by `update_ema`;
  - `FlatAdamW`: gradients, parameters, moments and EMA as one vector per dtype, the clip,
    AdamW and EMA math in one elementwise pass (replicated parameters only).
`apply_update` runs either one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Parameters that are never decayed, by leaf name: the SSM's decay rates, time-step biases and
# skip connection (Mamba-2 trains them without weight decay).
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "D"})


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to
    `lr * final_lr_frac` at `steps`. Returns a function step (int) -> learning rate (float32)."""
    t = train_config
    warmup = max(0, min(int(t.warmup_steps), int(t.steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(t.lr), warmup_steps=warmup,
        decay_steps=max(int(t.steps), warmup + 1), end_value=float(t.lr) * float(t.final_lr_frac))


def weight_decay_mask(params: Any, logical_axes: Any, decay_embeddings: bool = False) -> Any:
    """True for the parameters AdamW decays.

    Decayed: parameters with >= 2 dimensions (projection kernels, conv filters), except
      - the SSM parameters named in NO_DECAY_NAMES (A_log, dt_bias, D — even D of shape (H, P)),
      - embeddings and the output head: any parameter with the logical axis "vocab",
        unless `decay_embeddings`.
    Never decayed: 1-D parameters (norm scales, biases).

    Args:
      params: pytree of arrays (or ShapeDtypeStructs), nested dicts keyed by module path.
      logical_axes: pytree with params' structure whose leaves are tuples of logical names
        (or None for unannotated parameters).
    """
    def decide(path, leaf, axes):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in NO_DECAY_NAMES or len(leaf.shape) < 2:
            return False
        if axes is not None and "vocab" in axes and not decay_embeddings:
            return False
        return True
    axes_leaves = jax.tree.leaves(logical_axes, is_leaf=lambda x: x is None or isinstance(x, tuple))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if len(axes_leaves) != len(flat):
        raise ValueError("logical_axes must have the structure of params")
    return jax.tree.unflatten(treedef, [decide(p, x, a) for (p, x), a in zip(flat, axes_leaves)])


def make_optimizer(train_config, params: Any,
                   logical_axes: Any) -> optax.GradientTransformation | FlatAdamW:
    """clip_by_global_norm(grad_clip) -> AdamW(schedule, b1, b2, weight_decay, mask): an optax
    chain, or a `FlatAdamW` doing the same (and the EMA) when `train_config.flat_update`.

    Args:
      train_config: `config.train`.
      params: the parameter pytree (arrays or ShapeDtypeStructs) — used only for the mask (and
        the flat layout).
      logical_axes: logical axis names per parameter (see `weight_decay_mask`).
    """
    t = train_config
    mask = weight_decay_mask(params, logical_axes, bool(t.decay_embeddings))
    if bool(t.flat_update):
        return FlatAdamW(layout=FlatLayout.of(params, mask), schedule=learning_rate_schedule(t),
                         b1=float(t.b1), b2=float(t.b2), eps=1e-8,
                         weight_decay=float(t.weight_decay), grad_clip=float(t.grad_clip))
    parts = []
    if float(t.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
    parts.append(optax.adamw(learning_rate_schedule(t), b1=float(t.b1), b2=float(t.b2),
                             eps=1e-8, weight_decay=float(t.weight_decay), mask=mask))
    return optax.chain(*parts)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay used after optimizer step `step` (1-based): min(decay, (1 + step) / (10 + step)).

    The warm-up keeps the EMA from being dominated by the random initialisation early on.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """ema <- d * ema + (1 - d) * params with d = `ema_decay_at(step, decay)` (leafwise, in
    the EMA's dtype)."""
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype),
                        ema, params)


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of all leaves, in float32 (scalar)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.float32(0.0)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


# ------------------------------------------------------------------------- the flat update
@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each parameter leaf sits in the flat vectors: one vector per dtype, the raveled
    leaves of that dtype concatenated, weight-decayed leaves first (tree order within each
    part), so the decay mask of a vector is its prefix [0, n_decay).

    treedef: the parameters' tree structure.
    shapes: each leaf's shape, in tree order.
    groups: {dtype name ("float32", "bfloat16"): leaf indices (tree order) in vector order}.
    n_decay: {dtype name: number of leading elements of that vector that are weight-decayed}.
    """
    treedef: Any
    shapes: tuple
    groups: dict
    n_decay: dict

    @classmethod
    def of(cls, params: Any, mask: Any) -> FlatLayout:
        """The layout of `params` (arrays or ShapeDtypeStructs; floating leaves) with the
        weight-decay `mask` (a pytree of bools like params)."""
        leaves, treedef = jax.tree.flatten(params)
        flags = [bool(f) for f in treedef.flatten_up_to(mask)]
        names = [jnp.dtype(x.dtype).name for x in leaves]
        for i, x in enumerate(leaves):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(f"parameter leaf {i} has dtype {names[i]}; the flat update "
                                 "needs floating parameters")
        groups, n_decay = {}, {}
        for name in dict.fromkeys(names):
            idx = [i for i in range(len(leaves)) if names[i] == name]
            groups[name] = tuple([i for i in idx if flags[i]] + [i for i in idx if not flags[i]])
            n_decay[name] = sum(math.prod(leaves[i].shape) for i in idx if flags[i])
        return cls(treedef, tuple(tuple(x.shape) for x in leaves), groups, n_decay)

    def sizes(self) -> dict[str, int]:
        """{dtype name: length of that dtype's vector}."""
        return {k: sum(math.prod(self.shapes[i]) for i in idx) for k, idx in self.groups.items()}

    def ravel(self, tree: Any) -> dict[str, jax.Array]:
        """A pytree like the parameters -> {dtype name: (n,) vector of that dtype}."""
        leaves = self.treedef.flatten_up_to(tree)
        return {k: jnp.concatenate([jnp.ravel(leaves[i]).astype(k) for i in idx])
                for k, idx in self.groups.items()}

    def unravel(self, flat: dict[str, jax.Array]) -> Any:
        """{dtype name: (n,) vector} -> the pytree like the parameters (inverse of `ravel`)."""
        leaves = [None] * len(self.shapes)
        for k, idx in self.groups.items():
            start = 0
            for i in idx:
                size = math.prod(self.shapes[i])
                leaves[i] = flat[k][start:start + size].reshape(self.shapes[i])
                start += size
        return self.treedef.unflatten(leaves)


class FlatAdamState(NamedTuple):
    """`FlatAdamW`'s state.

    count: int32 scalar, updates applied so far.
    mu, nu: {dtype name: (n,) vector of that dtype}: Adam's first and second moments, laid out
      as `FlatLayout` says.
    """
    count: jax.Array
    mu: dict
    nu: dict


@dataclasses.dataclass(frozen=True)
class FlatAdamW:
    """clip_by_global_norm -> AdamW -> EMA on flat vectors (`config.train.flat_update`).

    The math of `make_optimizer`'s optax chain followed by `apply_updates` and `update_ema`:
      g <- g * min(1, grad_clip / |g|)            (|g| over all leaves; no clip if grad_clip = 0)
      m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
      p <- p - lr(count) * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * mask * p)
      ema <- d ema + (1 - d) p                     (d = ema_decay_at(step, ema_decay))
    with t = count + 1, computed in float32 in one elementwise pass per dtype and stored in
    the parameters' dtype. Parameters and EMA stay pytrees (raveled and unravelled each step);
    only the moments are stored flat. Valid for replicated parameters only.
    """
    layout: FlatLayout
    schedule: optax.Schedule
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float

    def init(self, params: Any) -> FlatAdamState:
        """Zero moments for `params` (arrays or ShapeDtypeStructs with the layout's structure)."""
        self.layout.treedef.flatten_up_to(params)  # structure check
        zeros = {k: jnp.zeros((n,), k) for k, n in self.layout.sizes().items()}
        return FlatAdamState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=dict(zeros))

    def apply(self, grads: Any, state: FlatAdamState, params: Any, ema: Any, step: jax.Array,
              ema_decay: float) -> tuple[Any, FlatAdamState, Any, jax.Array, jax.Array]:
        """One update. `step` is the optimizer step being completed (1-based, for the EMA decay).

        Returns (params, state, ema or None, grad_norm, param_norm): the new parameters and EMA
        as pytrees, the float32 global norms of the gradients (before clipping) and of the new
        parameters.
        """
        f32 = jnp.float32
        g, p = self.layout.ravel(grads), self.layout.ravel(params)
        e = None if ema is None else self.layout.ravel(ema)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(f32))) for x in g.values()))
        scale = f32(1.0)
        if self.grad_clip > 0:
            scale = jnp.where(grad_norm < self.grad_clip, f32(1.0), self.grad_clip / grad_norm)
        count = state.count + 1
        lr = jnp.asarray(self.schedule(state.count), f32)
        t = count.astype(f32)
        c1, c2 = 1.0 - f32(self.b1) ** t, 1.0 - f32(self.b2) ** t
        d = ema_decay_at(step, ema_decay)
        mu, nu, new_p, new_e = {}, {}, {}, {}
        for k in g:
            gk, pk = g[k].astype(f32) * scale, p[k].astype(f32)
            m = self.b1 * state.mu[k].astype(f32) + (1.0 - self.b1) * gk
            v = self.b2 * state.nu[k].astype(f32) + (1.0 - self.b2) * gk * gk
            u = (m / c1) / (jnp.sqrt(v / c2) + self.eps)
            if self.weight_decay:
                decayed = jnp.arange(pk.shape[0]) < self.layout.n_decay[k]
                u = u + jnp.where(decayed, f32(self.weight_decay), f32(0.0)) * pk
            new_p[k] = (pk - lr * u).astype(k)
            mu[k], nu[k] = m.astype(state.mu[k].dtype), v.astype(state.nu[k].dtype)
            if e is not None:
                new_e[k] = (d * e[k].astype(f32) + (1.0 - d) * new_p[k].astype(f32)).astype(k)
        param_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(f32))) for x in new_p.values()))
        return (self.layout.unravel(new_p), FlatAdamState(count=count, mu=mu, nu=nu),
                None if e is None else self.layout.unravel(new_e), grad_norm, param_norm)


def apply_update(tx: optax.GradientTransformation | FlatAdamW, grads: Any, opt_state: Any,
                 params: Any, ema: Any, step: jax.Array,
                 ema_decay: float) -> tuple[Any, Any, Any, jax.Array, jax.Array]:
    """One optimizer step with `tx` from `make_optimizer`, either implementation.

    Args:
      grads, params, ema: pytrees like the parameters (ema may be None); opt_state: tx's.
      step: int32 scalar, the optimizer step being completed (1-based; EMA warm-up).
      ema_decay: `config.train.ema_decay`.
    Returns:
      (params, opt_state, ema or None, grad_norm, param_norm); the norms are float32
      scalars of the gradients (before clipping) and of the new parameters.
    """
    if isinstance(tx, FlatAdamW):
        return tx.apply(grads, opt_state, params, ema, step, ema_decay)
    grad_norm = global_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = None if ema is None else update_ema(ema, params, step, ema_decay)
    return params, opt_state, ema, grad_norm, global_norm(params)
