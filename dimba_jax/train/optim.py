"""The optimiser: AdamW with warm-up + cosine decay, global-norm clipping, a weight-decay mask,
and the exponential moving average (EMA) of the parameters used for sampling.

Parameters and optimizer state are kept in `config.train.param_dtype` (float32 by default);
the model computes in `config.model.compute_dtype`. Gradient accumulation is done by the train
step (an explicit scan over micro-batches, see `dimba_jax.train.step`), not here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm's rule (each update t -> t where the global norm is below
    max_norm, else t / norm * max_norm; state optax.EmptyState, so checkpoints of either load
    into the other). The norm is the `grad_norm` extra argument of `update` where the caller
    has it (`apply_update` passes the one it reports), else `global_norm(updates)`."""
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = global_norm(updates) if grad_norm is None else grad_norm
        keep = norm < max_norm
        return jax.tree.map(lambda t: jnp.where(keep, t, (t / norm.astype(t.dtype)) * max_norm),
                            updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(train_config, params: Any, logical_axes: Any,
                   mask: Any = None) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(schedule, b1, b2, weight_decay, mask).

    Args:
      train_config: `config.train`.
      params: the parameter pytree (arrays or ShapeDtypeStructs) — used only for the mask.
      logical_axes: logical axis names per parameter (see `weight_decay_mask`).
      mask: the weight-decay mask to use instead of `weight_decay_mask(params, logical_axes)`
        (a flat layout's `group_mask`, whose params are the flat vectors).
    """
    t = train_config
    if mask is None:
        mask = weight_decay_mask(params, logical_axes, bool(t.decay_embeddings))
    parts = []
    if float(t.grad_clip) > 0:
        parts.append(clip_by_global_norm(float(t.grad_clip)))
    parts.append(optax.adamw(learning_rate_schedule(t), b1=float(t.b1), b2=float(t.b2),
                             eps=1e-8, weight_decay=float(t.weight_decay), mask=mask))
    return optax.chain(*parts)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay used after optimizer step `step` (1-based): min(decay, (1 + step) / (10 + step)).

    The warm-up keeps the EMA from being dominated by the random initialisation early on.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, params: Any, step: jax.Array, decay: float, every: int = 1) -> Any:
    """ema <- d * ema + (1 - d) * params (leafwise, in the EMA's dtype).

    every == 1: d = `ema_decay_at(step, decay)`, each step.
    every == k > 1: on steps that are multiples of k only (a `lax.cond`; the other steps
    return `ema` untouched), with d the product of `ema_decay_at` over steps step-k+1..step:
    what k updates give when the parameters did not move in between.
    """
    if every < 1:
        raise ValueError(f"ema every must be >= 1, got {every}")

    def mix(e_tree, d):
        return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype),
                            e_tree, params)

    if every == 1:
        return mix(ema, ema_decay_at(step, decay))
    d = functools.reduce(jnp.multiply, [ema_decay_at(step - j, decay) for j in range(every)])
    return jax.lax.cond(step % every == 0, mix, lambda e_tree, _: e_tree, ema, d)


GROUP_MAX_ELEMENTS = 1 << 16  # leaves at most this big share one reduction per shape and dtype


def leaf_square_sums(tree: Any) -> jax.Array:
    """The sum of squares of each leaf, in float32: a (n_leaves,) vector in `jax.tree.leaves`
    order.

    Leaves of at most GROUP_MAX_ELEMENTS elements with the same shape and dtype (a model's
    per-layer biases, norm weights, SSM constants: hundreds of small arrays) are stacked and
    reduced by one reduction per group, not one per leaf; larger leaves are reduced alone. The
    per-group results are joined by one concatenation and put in leaf order by one gather, so
    what reads them (the norm, the step's finiteness flags) reads one vector.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    parts, order = [], []
    groups: dict = {}
    for i, x in enumerate(leaves):
        if x.size > GROUP_MAX_ELEMENTS:
            parts.append(jnp.sum(jnp.square(x.astype(jnp.float32)))[None])
            order.append(i)
        else:
            groups.setdefault((tuple(x.shape), jnp.dtype(x.dtype).name), []).append(i)
    for members in groups.values():
        stacked = jnp.stack([leaves[i] for i in members]).astype(jnp.float32)
        parts.append(jnp.sum(jnp.square(stacked), axis=tuple(range(1, stacked.ndim))))
        order.extend(members)
    sums = jnp.concatenate(parts)
    return sums if order == sorted(order) else sums[np.argsort(np.asarray(order))]


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of all leaves, in float32 (scalar)."""
    return jnp.sqrt(jnp.sum(leaf_square_sums(tree)))


def apply_update(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                 ema: Any, step: jax.Array, ema_decay: float, ema_every: int = 1,
                 square_sums: jax.Array | None = None) -> tuple[Any, Any, Any, jax.Array, Any]:
    """One optimizer step with `tx` from `make_optimizer`, then the EMA.

    Args:
      grads, params, ema: pytrees like the parameters (ema may be None); opt_state: tx's.
      step: int32 scalar, the optimizer step being completed (1-based; EMA warm-up).
      ema_decay, ema_every: `config.train.ema_decay`, `config.train.ema_every` (`update_ema`).
      square_sums: the gradients' float32 sums of squares, one per parameter, where the
        caller has them (a flat layout's `leaf_square_sums`); default `leaf_square_sums(grads)`.
    Returns:
      (params, opt_state, ema or None, grad_norm, grad_square_sums): grad_norm the float32
      global norm of the gradients before clipping (sqrt of the square sums' total; the clip
      reads the same value), grad_square_sums the float32 square sums. The parameters' norm
      is not computed here: it is a logging quantity, taken on the logging steps only
      (`global_norm`).
    """
    if square_sums is None:
        square_sums = leaf_square_sums(grads)
    grad_norm = jnp.sqrt(jnp.sum(square_sums))
    updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
    params = optax.apply_updates(params, updates)
    ema = None if ema is None else update_ema(ema, params, step, ema_decay, ema_every)
    return params, opt_state, ema, grad_norm, square_sums
