"""The jitted train and eval steps, global-batch assembly and the non-finite guard.

The train step is a pure function (state, rest, batch) -> (state, metrics, health), jitted with
explicit in/out shardings and the state donated. Gradient accumulation is a `lax.scan` over
micro-batches inside the step. Step n draws its randomness from fold_in(state.rng, n), so a
resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import optim
from dimba_jax.train.flat import FlatLayout
from dimba_jax.train.state import ModelParts, TrainState


class NonFiniteError(FloatingPointError):
    """Raised when a step produced a non-finite loss or gradient (the state is not saved)."""


def batch_sharding(mesh: Mesh, axis_rules) -> NamedSharding:
    """Sharding of every batch array: dimension 0 split by the "batch" rule, the rest whole."""
    spec = mesh_lib.batch_spec(mesh_lib.rules_dict(axis_rules), mesh, ndim=1)
    return NamedSharding(mesh, spec)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles the global batch from this process's rows.

    Args:
      local_batch: {"tokens": int32 (global_batch / process_count, seq_len), ...} — the rows
        this process read (each process reads a disjoint shard of the data).
      sharding: `batch_sharding(...)`.
    Returns:
      {name: jax.Array (global_batch, ...)} sharded by `sharding`.
    """
    out = {}
    n = jax.process_count()
    for name, x in local_batch.items():
        x = np.asarray(x)
        out[name] = jax.make_array_from_process_local_data(
            sharding, x, (x.shape[0] * n,) + x.shape[1:])
    return out


def _split_micro(batch: dict[str, jax.Array], accum: int, mesh: Mesh, spec: PartitionSpec):
    """(B, ...) -> (accum, B/accum, ...) such that every device keeps its own rows: micro-batch
    i takes rows i, i + accum, i + 2 accum, ... of each device's contiguous block."""
    def split(x):
        b = x.shape[0]
        y = x.reshape((b // accum, accum) + x.shape[1:])
        y = jnp.swapaxes(y, 0, 1)
        micro_spec = PartitionSpec(None, *spec)
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, micro_spec))
    return jax.tree.map(split, batch)


def step_options(task, step: int) -> tuple:
    """The task's static loss options for train step `step` (`Task.step_options`; () if the task
    has none): the last argument of the train step."""
    fn = getattr(task, "step_options", None)
    return tuple(fn(int(step))) if fn is not None else ()


def step_option_sets(task) -> list[tuple]:
    """Every value `step_options` can take for this task ([()] if it has none)."""
    fn = getattr(task, "step_option_sets", None)
    return list(fn()) if fn is not None else [()]


def compile_variants(train_step: Callable, state: TrainState, rest: Any, batch: dict[str, jax.Array],
                     option_sets: list[tuple]) -> list:
    """Every compiled program of `train_step` for these arguments, one per option set: each
    lowered in turn (tracing holds the GIL), then all compiled concurrently in threads (XLA
    compiles without it). The jitted step's later calls with the same argument shapes and
    options reuse these programs instead of compiling at the first step that draws each
    option set. Nothing is run and `state` is not consumed. -> the `jax.stages.Compiled`s, in
    the order of option_sets."""
    lowered = [train_step.lower(state, rest, batch, options) for options in option_sets]
    if len(lowered) == 1:
        return [lowered[0].compile()]
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
        return list(pool.map(lambda low: low.compile(), lowered))


def make_loss_fn(task, parts: ModelParts, layout: FlatLayout | None = None) -> Callable:
    """(params, rest, batch, rng[, options]) -> (loss, metrics): the task's loss on the rebuilt
    model, options = `step_options` pairs passed as its keywords; under a flat layout params
    are its vectors, unraveled for the model (their gradient arrives raveled)."""
    def loss_fn(params, rest, batch, rng, options=()):
        model = parts.merge(params if layout is None else layout.unravel(params), rest)
        loss, metrics = task.loss(model, batch, rng, **dict(options))
        return loss.astype(jnp.float32), metrics
    return loss_fn


def make_train_step(task, parts: ModelParts, tx: optax.GradientTransformation, train_config,
                    mesh: Mesh, shardings: TrainState, rest_shardings: Any,
                    data_sharding: NamedSharding, layout: FlatLayout | None = None) -> Callable:
    """Builds the jitted train step; under a flat layout (`state.param_layout`) the state's
    params, moments and EMA are its vectors and tx is over them.

    Returns:
      step(state, rest, batch, options=()) -> (new_state, metrics, health), options the static
      `step_options(task, step)` of the step (one compiled program per distinct value), where
        metrics: dict of float32 scalars — the task's loss parts, "loss", "grad_norm", "lr"
          (the parameters' norm is the loop's, on logging steps only);
        health: {"finite": bool scalar (loss and grad norm finite),
                 "nonfinite_grads": bool (n_leaves,) in the parameter tree's leaf order
                 (`param_leaf_names`; True = this parameter's gradient's sum of squares is
                 not finite: a NaN/Inf in it, or entries so large their squares overflow
                 float32; read off the reductions of the gradient norm, so it costs no pass
                 over the gradients of its own, and one vector is one kernel and one output
                 where a flag per parameter would be hundreds)}.
      `state` is donated: do not reuse it after the call.
    """
    accum = int(train_config.grad_accum)
    ema_decay, ema_every = float(train_config.ema_decay), int(train_config.ema_every)
    schedule = optim.learning_rate_schedule(train_config)
    loss_fn = make_loss_fn(task, parts, layout)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    spec = data_sharding.spec

    def compute_grads(params, rest, batch, rng, options):
        if accum == 1:
            return grad_fn(params, rest, batch, rng, options)
        micro = _split_micro(batch, accum, mesh, spec)

        def body(carry, xs):
            i, mb = xs
            (loss, metrics), grads = grad_fn(params, rest, mb, jax.random.fold_in(rng, i),
                                             options)
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        (loss0, metrics0), grads0 = jax.eval_shape(
            lambda *a: grad_fn(*a, options), params, rest,
            jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, metrics0, grads0))
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        scale = 1.0 / accum
        return (loss * scale, jax.tree.map(lambda m: m * scale, metrics)), \
            jax.tree.map(lambda g: g * scale, grads)

    def step(state: TrainState, rest, batch, options=()):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, task_metrics), grads = compute_grads(state.params, rest, batch, rng, options)
        new_step = state.step + 1
        sums = None if layout is None else layout.leaf_square_sums(grads)
        params, opt_state, ema, grad_norm, grad_sq = optim.apply_update(
            tx, grads, state.opt_state, state.params, state.ema, new_step, ema_decay, ema_every,
            square_sums=sums)
        new_state = TrainState(step=new_step, params=params, opt_state=opt_state, ema=ema,
                               rng=state.rng)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in task_metrics.items()}
        metrics.update(loss=loss, grad_norm=grad_norm,
                       lr=jnp.asarray(schedule(state.step), jnp.float32))
        health = {
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
            "nonfinite_grads": ~jnp.isfinite(grad_sq),
        }
        return new_state, metrics, health

    repl = mesh_lib.replicated(mesh)
    return jax.jit(step, in_shardings=(shardings, rest_shardings, data_sharding),
                   out_shardings=(shardings, repl, repl), donate_argnums=(0,),
                   static_argnums=(3,))


def make_eval_step(task, parts: ModelParts, mesh: Mesh, param_shardings: Any,
                   rest_shardings: Any, data_sharding: NamedSharding,
                   layout: FlatLayout | None = None) -> Callable:
    """Jitted eval: (params, rest, batch, rng) -> dict of float32 scalar metrics ("loss" + the
    task's parts), with a fixed rng so evaluations are comparable across steps; params in the
    train state's form (a flat layout's vectors under one)."""
    loss_fn = make_loss_fn(task, parts, layout)

    def evaluate(params, rest, batch, rng):
        loss, metrics = loss_fn(params, rest, batch, rng)
        out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        out["loss"] = loss
        return out

    repl = mesh_lib.replicated(mesh)
    return jax.jit(evaluate, in_shardings=(param_shardings, rest_shardings, data_sharding, repl),
                   out_shardings=repl)


def param_leaf_names(params: Any) -> list[str]:
    """The "/"-joined tree path of each leaf of `params`, in `jax.tree.leaves` order."""
    return ["/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def raise_if_nonfinite(step: int, metrics: dict[str, Any], health: dict[str, Any],
                       leaf_names: list[str]) -> None:
    """Raises NonFiniteError naming the step, the loss parts and the parameters whose
    gradients are non-finite, if `health["finite"]` is False. Fetches values to the host.

    Args:
      leaf_names: `param_leaf_names(params)`, naming the entries of health["nonfinite_grads"].
    """
    if bool(jax.device_get(health["finite"])):
        return
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = np.asarray(jax.device_get(health["nonfinite_grads"]))
    if bad.shape != (len(leaf_names),):
        raise ValueError(f"health['nonfinite_grads'] has shape {bad.shape}, expected one flag "
                         f"per parameter ({len(leaf_names)})")
    names = [n for n, v in zip(leaf_names, bad) if v]
    parts = ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items()))
    raise NonFiniteError(
        f"non-finite loss or gradient at step {step}: {parts}; parameters with non-finite "
        f"gradients ({len(names)}): {', '.join(names[:20]) or 'none'}"
        f"{' ...' if len(names) > 20 else ''}. The state of this step was not saved; "
        "resume restarts from the last checkpoint.")
