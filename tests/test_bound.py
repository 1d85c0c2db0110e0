"""layers/bound.bind: a jitted program over a split nnx module with the graph, the state's
layout and static settings bound: the same outputs as the unbound function, the small arrays
packed per dtype (keys and large arrays as they are), one jitted function per layout."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.layers.bound import bind


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.big = nnx.Linear(64, 48, rngs=rngs)          # kernel 3072 elements
        self.small = nnx.Linear(48, 4, rngs=rngs)         # 192 + 4
        self.count = nnx.Variable(jnp.arange(3, dtype=jnp.int32))
        self.rngs = rngs                                  # a key-typed array among the leaves

    def __call__(self, x, scale):
        return self.small(jax.nn.relu(self.big(x))) * scale + jnp.sum(self.count)


def _apply(graphdef, state, x, *, scale):
    return nnx.merge(graphdef, state)(x, scale)


def test_bind_matches_the_unbound_function_and_packs_the_small_arrays():
    net = _Net(nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    x = jax.random.normal(jax.random.key(1), (5, 64))
    want = _apply(graphdef, state, x, scale=2.0)
    run, (big, packed) = bind(_apply, graphdef, state, pack_max=1000, scale=2.0)
    np.testing.assert_allclose(np.asarray(run((big, packed), x)), np.asarray(want), rtol=1e-6)
    assert [b.size for b in big if jnp.issubdtype(b.dtype, jnp.number)] == [3072]
    assert any(jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key) for b in big)
    assert sorted(p.dtype.name for p in packed) == ["float32", "int32", "uint32"]  # the rng count
    small = [v for v in jax.tree.leaves(state) if jnp.issubdtype(v.dtype, jnp.number) and v.size <= 1000]
    assert sum(p.size for p in packed) == sum(v.size for v in small) >= 48 + 192 + 4 + 3
    assert run is bind(_apply, graphdef, state, pack_max=1000, scale=2.0)[0]
    other, _ = bind(_apply, graphdef, state, pack_max=1000, scale=3.0)
    assert other is not run
    loose, (all_big, none) = bind(_apply, graphdef, state, pack_max=-1, scale=2.0)
    assert none == () and len(all_big) == len(jax.tree.leaves(state))
    np.testing.assert_allclose(np.asarray(loose((all_big, none), x)), np.asarray(want), rtol=1e-6)
