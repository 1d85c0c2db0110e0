"""layers/precision.py: the Linear parameters cast once to the compute dtype give the same bits,
and the DIMBA sampler's and the AR decoder's loops receive them already cast."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dimba_jax.config import load_config_file
from dimba_jax.diffusion import sampler as sampling
from dimba_jax.diffusion.schedule import schedule_from_config
from dimba_jax.evaluate import loading
from dimba_jax.layers.mamba2 import BidirectionalMamba2
from dimba_jax.layers.precision import cast_linears_to_compute_dtype
from dimba_jax.models import ar


def test_cast_changes_only_the_linears_and_not_the_output():
    m = BidirectionalMamba2(32, rngs=nnx.Rngs(0), d_state=8, headdim=8, expand=2, chunk_size=8,
                            ssd_impl="xla", dtype=jnp.bfloat16)
    u = jax.random.normal(jax.random.key(1), (2, 16, 32))
    run = nnx.jit(lambda mixer, u: mixer(u))
    before = run(m, u)
    assert cast_linears_to_compute_dtype(m) == 2  # the shared in_proj and out_proj kernels
    assert m.fwd.in_proj.kernel[...].dtype == jnp.bfloat16 == m.bwd.out_proj.kernel[...].dtype
    assert m.fwd.A_log[...].dtype == jnp.float32 and m.bwd.conv_weight[...].dtype == jnp.float32
    assert bool(jnp.all(run(m, u) == before))
    assert cast_linears_to_compute_dtype(m) == 0


def _loop_operands(jaxpr):
    """avals of the operands of the outermost scans of a jaxpr (looking inside jitted calls)."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            out += [v.aval for v in e.invars]
        elif "jaxpr" in e.params:
            out += _loop_operands(getattr(e.params["jaxpr"], "jaxpr", e.params["jaxpr"]))
    return out


def _bf16_config(task):
    c = load_config_file("configs/tiny.py")
    c.model.compute_dtype = "bfloat16"
    c.model.io_dtype = "bfloat16"
    if task == "ar":
        c.task, c.model.bidirectional = "ar", False
    return c


def test_sampling_and_decoding_loops_take_the_kernels_in_the_compute_dtype():
    cfg = _bf16_config("dimba")
    model, _, _ = loading.fresh_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    shape = model.blocks[0].mixer.fwd.in_proj.kernel[...].shape
    steps, length = 2, 16
    ts, ab_t, ab_prev = sampling.noise_grid(model, schedule_from_config(cfg.diffusion), steps,
                                            str(cfg.sample.grid))
    ones = jnp.ones((steps,), jnp.float32)
    sample = functools.partial(sampling._sample_jit, graphdef, sampler="ddim", guidance=1.0,
                               clamp=True, self_condition=bool(model.self_condition),
                               temperature=0.0)
    jaxpr = jax.make_jaxpr(sample)(
        state, jnp.zeros((1, length), jnp.int32), jnp.zeros((1, length), bool),
        jax.random.key(0), ts, ab_t, ab_prev, jnp.float32(0.0), ones, ones)
    kernels = [a.dtype for a in _loop_operands(jaxpr.jaxpr) if a.shape == shape]
    assert kernels and all(d == jnp.bfloat16 for d in kernels), kernels
    stem = [a.dtype for a in _loop_operands(jaxpr.jaxpr) if a.shape == model.in_proj.kernel.shape]
    assert stem == [jnp.bfloat16], stem  # model.io_dtype: the stem's kernel, cast once

    cfg = _bf16_config("ar")
    lm, _, _ = loading.fresh_model(cfg, seed=1)
    graphdef, state = nnx.split(lm)
    shape = lm.layers[0].mixer.in_proj.kernel[...].shape
    generate = jax.jit(ar.generate_split, static_argnums=(0, 6))
    jaxpr = jax.make_jaxpr(lambda st, ids, key: generate(graphdef, st, ids, key, 1.0, 1.0, 4))(
        state, jnp.zeros((1, 1), jnp.int32), jax.random.key(0))
    kernels = [a.dtype for a in _loop_operands(jaxpr.jaxpr) if a.shape == shape]
    assert kernels and all(d == jnp.bfloat16 for d in kernels), kernels


def _converts_of(jaxpr, shape):
    """convert_element_type equations on arrays of `shape`, nested jaxprs included."""
    n = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "convert_element_type" and e.invars[0].aval.shape == shape:
            n += 1
        for sub in e.params.values():
            sub = getattr(sub, "jaxpr", sub)
            if hasattr(sub, "eqns"):
                n += _converts_of(sub, shape)
    return n


def test_bound_programs_take_the_linears_cast_once_and_leave_the_model_alone():
    """`sampler.bound_program` and `ar.generate_bound` bind the weights with the compute-dtype
    linears already cast (`cast_state_linears`): the bound program casts no in_proj kernel, the
    caller's model keeps its float32 parameters, and the tokens (and x0) are those of the
    unbound programs, bit for bit."""
    cfg = _bf16_config("dimba")
    model, _, _ = loading.fresh_model(cfg, seed=0)
    shape = model.blocks[0].mixer.fwd.in_proj.kernel[...].shape
    opts = dict(steps=2, sampler="ddim", guidance=1.0, clamp=True, temperature=0.0)
    parts = sampling.sampler_parts(model, schedule_from_config(cfg.diffusion), **opts)
    assert model.blocks[0].mixer.fwd.in_proj.kernel[...].dtype == jnp.float32
    args = (jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 16), bool), jax.random.key(0)) + parts.consts
    assert _converts_of(jax.make_jaxpr(parts.run)(parts.params, *args).jaxpr, shape) == 0
    graphdef, state = nnx.split(model)
    assert _converts_of(jax.make_jaxpr(functools.partial(sampling.sample_program("auto"), graphdef,
                                                         **parts.static))(state, *args).jaxpr,
                        shape) > 0  # the unbound program casts them itself
    got = parts.run(parts.params, *args)
    want = sampling.sample_program("auto")(graphdef, state, *args, **parts.static)
    for g, w in zip(got, want):
        assert bool(jnp.all(g == w))

    cfg = _bf16_config("ar")
    lm, _, _ = loading.fresh_model(cfg, seed=1)
    graphdef, state = nnx.split(lm)
    shape = lm.layers[0].mixer.in_proj.kernel[...].shape
    run, params = ar.generate_bound(graphdef, state, 3)
    assert lm.layers[0].mixer.in_proj.kernel[...].dtype == jnp.float32
    ids, key, t, p = jnp.zeros((1, 2), jnp.int32), jax.random.key(3), jnp.float32(0.7), jnp.float32(0.9)
    assert _converts_of(jax.make_jaxpr(run)(params, ids, key, t, p).jaxpr, shape) == 0
    want = ar.generate_split(graphdef, state, ids, key, t, p, 3)
    assert bool(jnp.all(run(params, ids, key, t, p) == want))
