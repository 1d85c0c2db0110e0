"""Test helper: call an NNX module's method as one jitted XLA program.

Eager (op-by-op) execution of the chunked SSD compiles dozens of small programs and is far
slower on CPU than one jitted program; tests call modules through `jitted` instead. Programs are
cached by (module structure, method, static kwargs, input shapes), so modules of the same
configuration share compilations across tests.
"""

import functools

import jax
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _apply(graphdef, state, method, static, args, kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs, **dict(static))


def jitted(module, method="__call__", **static):
    """module.method as a jitted function; `static` are Python-valued keyword arguments.

    jitted(m)(x, seq_idx=...); jitted(m, "forward", return_cache=True)(x).
    """
    graphdef, state = nnx.split(module)
    static = tuple(sorted(static.items()))
    return lambda *args, **kwargs: _apply(graphdef, state, method, static, args, kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _scan_steps(graphdef, state, inputs, cache):
    module = nnx.merge(graphdef, state)

    def body(c, x_t):
        y_t, c = module.step(x_t, c)
        return c, y_t

    cache, ys = jax.lax.scan(body, cache, jax.numpy.swapaxes(inputs, 0, 1))
    return jax.numpy.swapaxes(ys, 0, 1), cache


def run_steps(module, inputs, cache):
    """module.step over inputs (batch, seqlen, ...) from `cache` in one jitted lax.scan.

    Returns (outputs stacked on axis 1, final cache).
    """
    graphdef, state = nnx.split(module)
    return _scan_steps(graphdef, state, inputs, cache)


@jax.jit
def loss_and_grads(graphdef, state, u, ct):
    """sum(module(u) * ct) (float32) and its gradients with respect to (state, u), jitted:
    a module's values and every gradient at once (graphdef, state = nnx.split(module, nnx.Param))."""
    def loss(state, u):
        return jax.numpy.sum(nnx.merge(graphdef, state)(u).astype(jax.numpy.float32) * ct)

    return jax.value_and_grad(loss, argnums=(0, 1))(state, u)
