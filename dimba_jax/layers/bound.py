"""Jitted programs over a split nnx module, with the graph, the state's layout and the static
settings bound, for calls whose host dispatch is on the critical path (batch-1 generation).

`jax.jit` hashes and compares every static argument at every call, and an nnx `GraphDef`'s
hash walks the whole module tree (milliseconds for a 24-block model); it also checks every
array argument, so a state of hundreds of small arrays costs more again. `bind` keys one jitted
function on those (once, when it is built) and returns the arguments to call it with: the
state's large arrays as they are, the small ones concatenated into one 1-D array per dtype,
sliced back out inside the program.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

PACK_MAX_ELEMENTS = 1 << 16  # state arrays at most this big travel packed


def bind(fn, graphdef, state, *, pack_max: int = PACK_MAX_ELEMENTS,
         compiler_options: tuple = (), **static):
    """(run, params) with `run(params, *args)` = `fn(graphdef, state, *args, **static)`, jitted.

    Args:
      fn: a module-level function (graphdef, state, *args, **static) -> outputs.
      graphdef, state: `nnx.split` of a module.
      pack_max: state arrays with more elements travel as they are, the others (numeric or bool)
        concatenated per dtype; -1: every array as it is.
      compiler_options: XLA compile options as sorted (name, value) pairs.
      static: fn's static keyword arguments (hashable).
    Returns:
      run: one jitted function per distinct (fn, graphdef, state layout, options, static), kept;
      params: (the large arrays, one packed array per dtype), built here once: the state's
        values at this call.
    """
    leaves, treedef = jax.tree.flatten(state)
    big, groups, where = [], {}, []
    for x in map(jnp.asarray, leaves):
        if x.size > pack_max or not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == bool):
            where.append((len(big),))
            big.append(x)
        else:
            parts = groups.setdefault(x.dtype.name, [])
            where.append((x.dtype.name, sum(int(p.size) for p in parts), tuple(x.shape)))
            parts.append(x)
    names = tuple(sorted(groups))
    packed = tuple(jnp.concatenate([p.ravel() for p in groups[n]]) for n in names)
    run = _bound(fn, graphdef, (treedef, names, tuple(where)), tuple(compiler_options),
                 tuple(sorted(static.items())))
    return run, (tuple(big), packed)


@functools.cache
def _bound(fn, graphdef, layout, options: tuple, static: tuple):
    treedef, names, where = layout

    def run(params, *args):
        big, packed = params
        groups = dict(zip(names, packed))
        leaves = [big[w[0]] if len(w) == 1 else
                  jax.lax.slice(groups[w[0]], (w[1],), (w[1] + math.prod(w[2]),)).reshape(w[2])
                  for w in where]
        return fn(graphdef, jax.tree.unflatten(treedef, leaves), *args, **dict(static))

    return jax.jit(run, compiler_options=dict(options) or None)
