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


def check_kernel_knobs(make_mixer, conv_name, norm_name, d_model=32, batch=2, seqlen=16):
    """A mixer with conv_impl / norm_impl "pallas" (conv alone, then both) against the all-XLA
    one: each runs exactly its fused forward kernels (named `conv_name`, `norm_name` in the
    jaxpr of loss and gradients) and matches the XLA mixer's loss, input gradient and every
    parameter gradient (float32, summation-order tolerances). make_mixer(conv_impl, norm_impl)
    -> module."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    u = jax.random.normal(jax.random.key(1), (batch, seqlen, d_model))
    ct = jax.random.normal(jax.random.key(2), (batch, seqlen, d_model))
    results = []
    for conv_impl, norm_impl in (("xla", "xla"), ("pallas", "xla"), ("pallas", "pallas")):
        graphdef, state = nnx.split(make_mixer(conv_impl, norm_impl), nnx.Param)
        jaxpr = str(jax.make_jaxpr(loss_and_grads, static_argnums=0)(graphdef, state, u, ct))
        assert jaxpr.count(f"name={conv_name}") == (conv_impl == "pallas")
        assert jaxpr.count(f"name={norm_name}") == (norm_impl == "pallas")
        results.append(loss_and_grads(graphdef, state, u, ct))
    l_x, (g_x, du_x) = results[0]
    flat_x = jax.tree_util.tree_leaves_with_path(g_x)
    names = [jax.tree_util.keystr(path) for path, _ in flat_x]
    assert any("conv_weight" in n for n in names) and any("conv_bias" in n for n in names)
    for l_p, (g_p, du_p) in results[1:]:
        np.testing.assert_allclose(l_p, l_x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(du_p, du_x, rtol=1e-4, atol=1e-5)
        flat_p = jax.tree.leaves(g_p)
        assert len(flat_x) == len(flat_p)
        for name, (_, a), b in zip(names, flat_x, flat_p):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
