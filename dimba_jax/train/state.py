"""The train state (a pytree of arrays) and its sharded creation.

An nnx model is split once into
  graphdef — the static structure (never changes),
  params   — the `nnx.Param` arrays, held as a nested dict (what is optimised and saved),
  rest     — any other variables (RNG streams, constants); re-created by `init_model`, not saved.
`ModelParts.merge(params, rest)` rebuilds the module inside a jitted function.

`TrainState` = step, params, opt_state, ema (or None), rng. Everything in it is checkpointed;
`state_shardings` derives its shardings from the parameters' logical axis names.

`config.train.param_layout` "flat" holds params, the optimizer's moments and the EMA as a
`flat.FlatLayout`'s vectors while training (`param_layout`); checkpoints hold the tree form
either way (`form_converters`), so a run may resume under the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dimba_jax.train import flat as flat_lib
from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import optim


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (all arrays; a pytree).

    step: int32 scalar, optimizer steps taken.
    params: nested dict of float arrays (config.train.param_dtype), or under a flat layout
      its dict {group: (n,) vector} (`flat.FlatLayout`).
    opt_state: optax state for params.
    ema: like params (the EMA used for sampling), or None when ema_decay == 0.
    rng: uint32 (2,) base PRNG key; step n uses fold_in(rng, n), so resuming is exact.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The static pieces of a task's model: how to rebuild it from a params dict.

    graphdef: nnx GraphDef of the model.
    param_template: abstract nnx State of the params (ShapeDtypeStructs, with metadata).
    rest_template: abstract nnx State of the non-Param variables.
    logical_axes: nested dict like params, leaves = tuple of logical names or None.
    """
    graphdef: Any
    param_template: Any
    rest_template: Any
    logical_axes: Any

    def merge(self, params: Any, rest: Any) -> nnx.Module:
        """Rebuilds the module from a params dict and a rest dict (works under jit)."""
        p_state = jax.tree.map(lambda x: x, self.param_template)
        nnx.replace_by_pure_dict(p_state, params)
        r_state = jax.tree.map(lambda x: x, self.rest_template)
        nnx.replace_by_pure_dict(r_state, rest)
        return nnx.merge(self.graphdef, p_state, r_state)

    @property
    def abstract_params(self) -> Any:
        """Nested dict of ShapeDtypeStructs (the params' shapes and init dtypes)."""
        return nnx.to_pure_dict(self.param_template)


def _build_model(task, rng: jax.Array) -> nnx.Module:
    # Layers annotate parameters with logical names; sharding is applied by the trainer
    # (out_shardings of the jitted init), not eagerly at variable creation.
    with nnx.use_eager_sharding(False):
        return task.init_model(nnx.Rngs(rng))


def model_parts(task, seed_rng: jax.Array) -> ModelParts:
    """Traces `task.init_model` abstractly (no FLOPs, no memory) and returns its ModelParts."""
    abstract = nnx.eval_shape(lambda: _build_model(task, seed_rng))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    axes = {}
    flat = []
    for path, var in nnx.to_flat_state(params):
        flat.append((path, mesh_lib.variable_logical_axes(var)))
    for path, names in flat:
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = names
    return ModelParts(graphdef, params, rest, axes)


def _axes_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None or isinstance(x, tuple))


def param_specs(parts: ModelParts, mesh: Mesh, axis_rules) -> Any:
    """Nested dict of PartitionSpecs for the params (logical names mapped by axis_rules)."""
    rules = mesh_lib.rules_dict(axis_rules)
    abstract = parts.abstract_params
    flat, treedef = jax.tree.flatten(abstract)
    axes = _axes_leaves(parts.logical_axes)
    specs = [mesh_lib.logical_to_spec(a, x.shape, mesh, rules) for x, a in zip(flat, axes)]
    return jax.tree.unflatten(treedef, specs)


def cast_floats(tree: Any, dtype) -> Any:
    """Casts floating leaves of `tree` to `dtype` (ints and keys untouched)."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)
    return jax.tree.map(cast, tree)


def init_params_and_rest(task, parts: ModelParts, rng: jax.Array, param_dtype) -> tuple[Any, Any]:
    """Builds the model for real (inside jit) and returns (params dict in param_dtype, rest dict)."""
    model = _build_model(task, rng)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return cast_floats(nnx.to_pure_dict(params), param_dtype), nnx.to_pure_dict(rest)


def param_layout(parts: ModelParts, train_config, mesh: Mesh,
                 axis_rules) -> flat_lib.FlatLayout | None:
    """The flat layout of `config.train.param_layout` "flat" (grouped by the weight-decay
    mask), or None for "tree"; "auto" is "flat" where the mesh shards no parameter, else
    "tree". Raises ValueError for another value, or for "flat" where the mesh shards a
    parameter (the flat vectors are kept whole on every device)."""
    name = str(train_config.param_layout)
    if name not in ("tree", "flat", "auto"):
        raise ValueError(f"train.param_layout must be 'tree', 'flat' or 'auto', got {name!r}")
    if name == "tree":
        return None
    sizes = dict(mesh.shape)
    for spec in jax.tree.leaves(param_specs(parts, mesh, axis_rules),
                                is_leaf=lambda x: isinstance(x, PartitionSpec)):
        for axes in spec:
            for axis in (axes if isinstance(axes, tuple) else (axes,)):
                if axis is not None and sizes[axis] > 1:
                    if name == "auto":
                        return None
                    raise ValueError(
                        f"train.param_layout='flat' keeps every parameter whole on every "
                        f"device, but the mesh shards parameters over {axis!r} (size "
                        f"{sizes[axis]}): use param_layout='tree' with fsdp or tensor > 1")
    abstract = cast_floats(parts.abstract_params, train_config.param_dtype)
    mask = optim.weight_decay_mask(abstract, parts.logical_axes,
                                   bool(train_config.decay_embeddings))
    return flat_lib.FlatLayout.from_params(abstract, mask)


def optimizer_for(parts: ModelParts, train_config,
                  layout: flat_lib.FlatLayout | None = None) -> optax.GradientTransformation:
    """`optim.make_optimizer` for this model's params, or under a flat layout for its vectors
    (the weight-decay mask its `group_mask`)."""
    return optim.make_optimizer(train_config, parts.abstract_params, parts.logical_axes,
                                mask=None if layout is None else layout.group_mask)


def state_shardings(parts: ModelParts, tx: optax.GradientTransformation, mesh: Mesh,
                    axis_rules, param_dtype, use_ema: bool,
                    layout: flat_lib.FlatLayout | None = None) -> tuple[TrainState, Any]:
    """(TrainState of NamedShardings, rest shardings) for the jitted init, step and restore.

    Optimizer moments take their parameter's sharding (via optax.tree_map_params); counts and
    other scalars are replicated. Under a flat layout (tx over its vectors) everything is
    replicated.
    """
    repl = mesh_lib.replicated(mesh)
    rest_shard = jax.tree.map(lambda _: repl, nnx.to_pure_dict(parts.rest_template))
    if layout is not None:
        flat = layout.abstract()
        state = TrainState(step=repl, params=jax.tree.map(lambda _: repl, flat),
                           opt_state=jax.tree.map(lambda _: repl, jax.eval_shape(tx.init, flat)),
                           ema=jax.tree.map(lambda _: repl, flat) if use_ema else None, rng=repl)
        return state, rest_shard
    specs = param_specs(parts, mesh, axis_rules)
    p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
    abstract_params = cast_floats(parts.abstract_params, param_dtype)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shard = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, p_shard,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    state = TrainState(step=repl, params=p_shard, opt_state=opt_shard,
                       ema=p_shard if use_ema else None, rng=repl)
    return state, rest_shard


def create_train_state(task, parts: ModelParts, tx: optax.GradientTransformation, seed: int,
                       shardings: TrainState, rest_shardings: Any, param_dtype,
                       use_ema: bool,
                       layout: flat_lib.FlatLayout | None = None) -> tuple[TrainState, Any]:
    """Initialises params, optimizer state and EMA directly in their shardings (one jit);
    under a flat layout the params are raveled before tx.init (tx over the vectors).

    The model's init key is fold_in(PRNGKey(seed), 0); the train RNG is fold_in(.., 1).
    Returns (state, rest).
    """
    def init():
        base = jax.random.PRNGKey(seed)
        params, rest = init_params_and_rest(task, parts, jax.random.fold_in(base, 0), param_dtype)
        if layout is not None:
            params = layout.ravel(params)
        ema = jax.tree.map(jnp.copy, params) if use_ema else None
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), ema=ema,
                           rng=jax.random.fold_in(base, 1))
        return state, rest
    return jax.jit(init, out_shardings=(shardings, rest_shardings))()


def init_rest(task, parts: ModelParts, seed: int, rest_shardings: Any) -> Any:
    """Re-creates only the non-Param variables (for a restored run)."""
    def init():
        base = jax.random.PRNGKey(seed)
        _, rest = init_params_and_rest(task, parts, jax.random.fold_in(base, 0), jnp.float32)
        return rest
    return jax.jit(init, out_shardings=rest_shardings)()


def abstract_train_state(parts: ModelParts, tx, shardings: TrainState, param_dtype,
                         use_ema: bool,
                         layout: flat_lib.FlatLayout | None = None) -> TrainState:
    """TrainState of ShapeDtypeStructs carrying the target shardings (restore targets): the
    saved form, whose params, moments and EMA are trees under either layout (under a flat one
    `shardings` are its replicated ones and tx is over its vectors)."""
    def shapes():
        params = cast_floats(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                          parts.abstract_params), param_dtype)
        if layout is not None:
            params = layout.ravel(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), ema=params if use_ema else None,
                          rng=jax.random.PRNGKey(0))
    abstract = jax.eval_shape(shapes)
    if layout is not None:
        repl = shardings.step
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                            jax.eval_shape(layout.flat_tree, abstract))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def form_converters(layout: flat_lib.FlatLayout | None, shardings: TrainState):
    """(to_saved, to_training): jitted state -> state functions between the training form and
    the saved one (checkpoints hold trees under either layout). Under the tree layout both are
    the identity; under a flat one to_saved sets every flat vector of a state as its tree
    (`FlatLayout.flat_tree`; the state is kept) and to_training ravels every parameter tree
    into `shardings` (the flat layout's, all replicated)."""
    if layout is None:
        return (lambda state: state), (lambda state: state)
    to_saved = jax.jit(layout.flat_tree, out_shardings=shardings.step)
    to_training = jax.jit(layout.tree_flat, out_shardings=shardings)
    return to_saved, to_training


def count_params(params: Any) -> int:
    """Total number of parameter elements."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
