"""The DIMBA denoiser: shapes, fixed-norm embeddings, masking, CFG dropout, causal vs
bidirectional dependence, conditioning variants, the frozen prompt encoder, axis names, the
head's GEMM dtype (model.head_dtype)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.config import default_config
from dimba_jax.layers.conditioning import (FrozenParam, FrozenPromptEncoder, frozen_prompt_encoder,
                                           frozen_stack, sinusoidal_embedding)
from dimba_jax.models.dimba import DimbaModel

B, L, V, D = 2, 32, 50, 32
ALLOWED_AXES = {"batch", "embed", "mlp", "heads", "vocab", "state", "conv", "seq", None}


def model_cfg(**over):
    c = default_config()
    with c.unlocked():
        c.model.update(d_model=D, n_layers=1, d_state=16, headdim=16, chunk_size=16, time_embed_dim=32,
                       ssd_impl="reference")
        c.model.update(**over)
    return c.model


@nnx.jit
def call(model, x_t, t, tokens, mask, self_cond=None, drop_prompt=None):
    """One jitted forward (eager execution of the scan-based SSD is slow)."""
    return model(x_t, t, tokens, mask, self_cond=self_cond, drop_prompt=drop_prompt)


def inputs(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x_t = jax.random.normal(k1, (B, L, D))
    tokens = jax.random.randint(k2, (B, L), 0, V, dtype=jnp.int32)
    logsnr = jax.random.uniform(k3, (B,), minval=-6.0, maxval=2.0)  # noise levels as log-SNR
    return x_t, logsnr, tokens


def test_shapes_fixed_norm_embeddings_and_reimposed_prompt():
    model = DimbaModel(model_cfg(embed_scale=2.0), V, rngs=nnx.Rngs(0))
    x_t, t, tokens = inputs()
    mask = jnp.broadcast_to(jnp.arange(L) < 6, (B, L))
    out = call(model, x_t, t, tokens, mask)
    assert out.shape == (B, L, D) and out.dtype == jnp.float32
    norms = np.linalg.norm(np.asarray(model.embedding_table()), axis=-1)
    np.testing.assert_allclose(norms, 2.0 * math.sqrt(D), rtol=1e-5)
    assert float(jnp.linalg.norm(model.null_vector())) == pytest.approx(2.0 * math.sqrt(D), rel=1e-5)
    np.testing.assert_allclose(np.asarray(out[:, :6]), np.asarray(model.embed(tokens))[:, :6], atol=1e-6)
    assert model.logits(out).shape == (B, L, V)
    # the tied head ranks an exact embedding first
    np.testing.assert_array_equal(np.asarray(jnp.argmax(model.logits(model.embed(tokens)), -1)), np.asarray(tokens))
    # values given at known positions of x_t are ignored (the clean embedding is used)
    out2 = call(model, x_t.at[:, :6].set(100.0), t, tokens, mask)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-5)
    with pytest.raises(ValueError, match="do not agree"):
        model(x_t[:, :5], t, tokens, mask)


def test_narrow_diffusion_space():
    """embed_dim e < d_model: tokens, noise and x0_hat live in R^e, the blocks in R^d_model."""
    e = 8
    model = DimbaModel(model_cfg(embed_dim=e), V, rngs=nnx.Rngs(0))
    _, t, tokens = inputs()
    x_t = jax.random.normal(jax.random.key(5), (B, L, e))
    mask = jnp.broadcast_to(jnp.arange(L) < 6, (B, L))
    x0, logits = model.predict(x_t, t, tokens, mask, self_cond=x_t)
    assert x0.shape == (B, L, e) and logits.shape == (B, L, V)
    assert model.embedding_table().shape == (V, e) and model.blocks[0].norm.weight.shape == (D,)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(model.embedding_table()), axis=-1), math.sqrt(e), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(x0[:, :6]), np.asarray(model.embed(tokens))[:, :6], atol=1e-6)
    with pytest.raises(ValueError, match="embed_dim"):
        call(model, jax.random.normal(jax.random.key(5), (B, L, D)), t, tokens, mask)


def test_raw_embedding_scale_has_no_effect():
    """Shrinking the raw parameter (what an x0 loss would do) leaves the embeddings unchanged."""
    model = DimbaModel(model_cfg(), V, rngs=nnx.Rngs(0))
    before = np.asarray(model.embedding_table())
    model.embedding[...] = model.embedding[...] * 1e-3
    np.testing.assert_allclose(np.asarray(model.embedding_table()), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_causal_vs_bidirectional_dependence(bidirectional):
    model = DimbaModel(model_cfg(bidirectional=bidirectional, n_layers=2), V, rngs=nnx.Rngs(1))
    x_t, t, tokens = inputs(1)
    mask = jnp.zeros((B, L), bool)
    j = 12
    base = call(model, x_t, t, tokens, mask)
    moved = call(model, x_t.at[:, j].add(3.0), t, tokens, mask)
    diff = np.abs(np.asarray(moved - base)).max(axis=(0, 2))
    assert diff[j:].max() > 1e-3  # the position itself and the future always see it
    if bidirectional:
        assert diff[:j].min() > 1e-6, "every earlier position must see the change"
    else:
        assert diff[:j].max() < 1e-6, "causal: the past must not depend on the future"


def test_dropped_prompt_hides_its_content_everywhere():
    """CFG branch: with drop_prompt the output may not depend on the prompt's tokens, even
    through the self-conditioning channel; without it, it must."""
    model = DimbaModel(model_cfg(), V, rngs=nnx.Rngs(2))
    # non-zero conditioning maps so the prompt path is live (zero-initialised FiLM otherwise)
    for blk in model.blocks:
        blk.cond.proj.kernel[...] = 0.1 * jax.random.normal(jax.random.key(3), blk.cond.proj.kernel.shape)
    x_t, t, tokens = inputs(2)
    other = tokens.at[:, :8].set((tokens[:, :8] + 5) % V)
    mask = jnp.broadcast_to(jnp.arange(L) < 8, (B, L))
    sc_a = model.embed(tokens)  # a self-cond input that carries the prompt at known positions
    sc_b = model.embed(other)
    drop = jnp.ones((B,), bool)
    a = call(model, x_t, t, tokens, mask, sc_a, drop)
    b = call(model, x_t, t, other, mask, sc_b, drop)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    c = call(model, x_t, t, tokens, mask, sc_a)
    d = call(model, x_t, t, other, mask, sc_b)
    assert np.abs(np.asarray(c - d))[:, 8:].max() > 1e-4
    # the self-conditioning channel itself is an input at generated positions
    e = call(model, x_t, t, tokens, mask, jnp.zeros_like(x_t))
    assert np.abs(np.asarray(c - e))[:, 8:].max() > 1e-4


@pytest.mark.parametrize("over", [dict(conditioning="additive", tie_embeddings=False),
                                  dict(conditioning="film", self_condition=False, compute_dtype="bfloat16")])
def test_variants_run(over):
    model = DimbaModel(model_cfg(**over), V, rngs=nnx.Rngs(3))
    x_t, t, tokens = inputs(3)
    out = call(model, x_t, t, tokens, jnp.zeros((B, L), bool))
    assert out.shape == (B, L, D) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert model.logits(out).shape == (B, L, V)
    assert hasattr(model, "head") == (not model_cfg(**over).tie_embeddings)


def test_bad_config_values():
    with pytest.raises(ValueError, match="conditioning"):
        DimbaModel(model_cfg(conditioning="cross"), V, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prompt_encoder"):
        DimbaModel(model_cfg(prompt_encoder="transformer"), V, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="compute_dtype|dtype"):
        DimbaModel(model_cfg(compute_dtype="int8"), V, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prompt_encoder="):  # the task builds the frozen encoder
        DimbaModel(model_cfg(prompt_encoder="frozen"), V, rngs=nnx.Rngs(0))


def test_frozen_prompt_stack_needs_a_donor_workdir():
    from dimba_jax.train.tasks import frozen_prompt_stack

    config = default_config()
    assert frozen_prompt_stack(config) is None  # the "mlp" encoder needs no donor
    with config.unlocked():
        config.model.prompt_encoder = "frozen"
    with pytest.raises(FileNotFoundError, match="prompt_encoder_checkpoint"):
        frozen_prompt_stack(config)


def test_frozen_prompt_encoder_from_a_donor_model_in_memory():
    donor = DimbaModel(model_cfg(), V, rngs=nnx.Rngs(4))
    stack = frozen_stack(donor)
    np.testing.assert_array_equal(stack.table, donor.embedding_table())
    enc = frozen_prompt_encoder(stack, D, rngs=nnx.Rngs(5))
    model = DimbaModel(model_cfg(prompt_encoder="frozen"), V, prompt_encoder=enc, rngs=nnx.Rngs(6))
    assert {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(model.prompt_encoder, nnx.Param))} == {"proj"}
    again = frozen_prompt_encoder(stack, D, rngs=nnx.Rngs(5))  # a fresh copy each time
    assert again.blocks[0] is not enc.blocks[0]


def test_frozen_prompt_encoder_from_given_blocks():
    donor = DimbaModel(model_cfg(), V, rngs=nnx.Rngs(4))
    enc = FrozenPromptEncoder(donor.embedding_table(), list(donor.blocks), donor.final_norm, D, rngs=nnx.Rngs(5))
    model = DimbaModel(model_cfg(prompt_encoder="frozen"), V, prompt_encoder=enc, rngs=nnx.Rngs(6))
    frozen = nnx.state(model.prompt_encoder, FrozenParam)
    n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(frozen))
    assert n_frozen > V * D  # embedding table plus the donor's block weights
    params = nnx.state(model.prompt_encoder, nnx.Param)
    assert {str(p[0]) for p, _ in nnx.to_flat_state(params)} == {"proj"}  # only the projection trains

    x_t, t, tokens = inputs(4)
    mask = jnp.broadcast_to(jnp.arange(L) < 8, (B, L))
    other = tokens.at[:, :8].set((tokens[:, :8] + 5) % V)
    assert np.abs(np.asarray(call(model, x_t, t, tokens, mask) - call(model, x_t, t, other, mask)))[:, 8:].max() > 1e-5
    # nnx.grad / optimizers differentiate nnx.Param only: the frozen weights get no gradient
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert not any(str(p[0]) == "prompt_encoder" and str(p[1]) != "proj" for p, _ in flat)


def test_parameters_carry_allowed_logical_axes():
    model = DimbaModel(model_cfg(tie_embeddings=False), V, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
        assert names is not None, f"{path} has no logical axis names"
        assert len(names) == var[...].ndim and set(names) <= ALLOWED_AXES, (path, names)


def test_sinusoidal_embedding_values():
    emb = np.asarray(sinusoidal_embedding(jnp.array([0, 3]), 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(3 * freqs), np.cos(3 * freqs)]), rtol=1e-5)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])


def test_posterior_input_is_the_output_priors_posterior_mean():
    """With model.posterior_input the stem reads [x_in | self_cond | posterior | mask]: with the
    posterior's rows of the input projection zeroed the model is the one without it (same other
    weights); with only those rows (the rest zero) the stem sees exactly softmax(prior) @ E at
    generated positions and the clean embedding at known ones (float32 head: the float32 math
    is what is compared)."""
    plain = DimbaModel(model_cfg(head_dtype="float32"), V, rngs=nnx.Rngs(0))
    post = DimbaModel(model_cfg(posterior_input=True, head_dtype="float32"), V, rngs=nnx.Rngs(0))
    n = post.in_proj.kernel.shape[0]
    assert n == 3 * D + 1 and plain.in_proj.kernel.shape[0] == 2 * D + 1
    state = nnx.state(plain, nnx.Param)
    kernel = np.asarray(state["in_proj"]["kernel"][...])
    state["in_proj"]["kernel"] = nnx.Param(jnp.asarray(np.concatenate([kernel[:2 * D], np.zeros((D, D)), kernel[2 * D:]])))
    nnx.update(post, state)
    x_t, lam, tokens = inputs(3)
    mask = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    np.testing.assert_allclose(np.asarray(call(post, x_t, lam, tokens, mask)),
                               np.asarray(call(plain, x_t, lam, tokens, mask)), rtol=1e-5, atol=1e-5)
    # the stem's posterior channel is exactly softmax(prior) @ E, the clean embedding where known
    table = np.asarray(post.embedding_table())
    clean = table[np.asarray(tokens)]
    known = np.asarray(mask)
    x_in = np.where(known[..., None], clean, np.asarray(x_t))
    stem, prior = post.stem_input(jnp.asarray(x_in), lam, jnp.asarray(known), jnp.asarray(clean), None)
    lam_np = np.asarray(lam)[:, None, None]
    ab = 1.0 / (1.0 + np.exp(-lam_np))
    logits = np.einsum("bld,vd->blv", x_in, table) * np.sqrt(ab) / (1.0 - ab)  # log N(x; sqrt(ab) e_v, 1-ab) + const
    np.testing.assert_allclose(np.asarray(prior), logits, rtol=1e-4, atol=1e-3)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.where(known[..., None], clean, (p / p.sum(-1, keepdims=True)) @ table)
    np.testing.assert_allclose(np.asarray(stem[..., 2 * D:3 * D]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(stem[..., -1]), known.astype(np.float32))


def test_logit_bias_adds_a_learned_per_token_bias_not_decayed():
    from dimba_jax.train.optim import weight_decay_mask
    plain = DimbaModel(model_cfg(), V, rngs=nnx.Rngs(0))
    biased = DimbaModel(model_cfg(logit_bias=True), V, rngs=nnx.Rngs(0))
    assert not hasattr(plain, "logit_bias") and biased.logit_bias.shape == (V,)
    bias = jax.random.normal(jax.random.key(4), (V,))
    biased.logit_bias[...] = bias
    x = jax.random.normal(jax.random.key(5), (B, L, D))
    np.testing.assert_allclose(np.asarray(biased.logits(x)), np.asarray(plain.logits(x) + bias), rtol=1e-5, atol=1e-5)
    # AdamW leaves it alone: 1-D, and on the logical axis "vocab" (train/optim.py)
    from dimba_jax.train.mesh import variable_logical_axes
    assert variable_logical_axes(nnx.state(biased, nnx.Param)["logit_bias"]) == ("vocab",)
    mask = weight_decay_mask({"logit_bias": np.zeros((V,))}, {"logit_bias": ("vocab",)})
    assert mask == {"logit_bias": False}


def test_posterior_grad_off_stops_the_gradient_at_the_posterior_channel():
    """posterior_grad=False gives the same posterior channel, through which no gradient then
    flows (here: to x_t); with it on, one does."""
    x_t, lam, tokens = inputs(5)
    known = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    out = {}
    for flag in (True, False):
        model = DimbaModel(model_cfg(posterior_input=True, posterior_grad=flag), V, rngs=nnx.Rngs(0))
        clean = model.embed(tokens)

        def channel(scale, model=model, clean=clean):
            stem, _ = model.stem_input(x_t * scale, lam, known, clean, None)
            return stem[..., 2 * D:3 * D]

        out[flag] = (np.asarray(channel(1.0)), float(jax.grad(lambda s: jnp.sum(channel(s) ** 2))(1.0)))
    np.testing.assert_allclose(out[False][0], out[True][0], rtol=1e-6)
    assert out[False][1] == 0.0 and abs(out[True][1]) > 0.0


@nnx.jit
def predict(model, x_t, t, tokens, mask):
    """One jitted `predict`: (x0_hat, logits)."""
    return model.predict(x_t, t, tokens, mask)


def test_head_dtype_float32_is_the_float32_einsum():
    """model.head_dtype "float32" computes the head, the output prior and softmax @ E
    as the float32 einsums themselves, bit for bit."""
    model = DimbaModel(model_cfg(head_dtype="float32"), V, rngs=nnx.Rngs(0))
    x, lam, _ = inputs(1)
    table = model.embedding_table()
    scale = jnp.exp(model.logit_scale[...].astype(jnp.float32)) / model.embed_norm
    np.testing.assert_array_equal(np.asarray(model.logits(x)),
                                  np.asarray(jnp.einsum("bld,vd->blv", x, table) * scale))
    coef = (jnp.sqrt(jax.nn.sigmoid(lam)) / jax.nn.sigmoid(-lam))[:, None, None]
    np.testing.assert_array_equal(np.asarray(model.prior_logits(x, lam)),
                                  np.asarray(jnp.einsum("bld,vd->blv", x, table) * coef))
    p = jax.nn.softmax(model.logits(x), axis=-1)
    np.testing.assert_allclose(np.asarray(model.clamp_to_embeddings(x)),  # normalised after
                               np.asarray(jnp.einsum("blv,vd->bld", p, table)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dtype", ["float32", "bfloat16"])
def test_softmax_embedding_is_softmax_then_the_table_with_masked_scores(head_dtype):
    """softmax_embedding (normalised after the GEMM) equals softmax(scores) @ E in float32, with
    -inf scores (min-p) weighing nothing, and its gradient; in bfloat16 its values within the
    rounding of the GEMM's operands (the same rounding as the probabilities' before)."""
    model = DimbaModel(model_cfg(head_dtype=head_dtype), V, rngs=nnx.Rngs(0))
    table = model.embedding_table()
    scores = 4.0 * jax.random.normal(jax.random.key(3), (2, 5, V), jnp.float32)
    scores = jnp.where(jnp.arange(V) % 3 == 1, -jnp.inf, scores)
    want = jnp.einsum("blv,vd->bld", jax.nn.softmax(scores, axis=-1), table)
    got = model.softmax_embedding(scores)
    tol = dict(rtol=1e-5, atol=1e-6) if head_dtype == "float32" else dict(rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tol)
    assert np.all(np.isfinite(np.asarray(got)))
    if head_dtype != "float32":
        return
    masked = jnp.where(jnp.arange(V) % 3 == 1, 0.0, 1.0)
    cot = jax.random.normal(jax.random.key(4), got.shape, jnp.float32)
    g_got = jax.grad(lambda s: jnp.sum(model.softmax_embedding(s) * cot))(scores)
    g_want = jax.grad(lambda s: jnp.sum(jnp.einsum("blv,vd->bld", jax.nn.softmax(s, -1), table)
                                        * cot))(scores)
    np.testing.assert_allclose(np.asarray(g_got * masked), np.asarray(g_want * masked), **tol)


@pytest.mark.parametrize("spec", ["bld,vd->blv", "blv,vd->bld"])
def test_head_einsum_bfloat16_forward_and_gradients(spec):
    """head_einsum in bfloat16: float32 outputs and gradients within bf16 rounding of the float32
    einsum's, not equal to them."""
    from dimba_jax.layers.precision import head_einsum

    ka, kb, kg = jax.random.split(jax.random.key(7), 3)
    a = jax.random.normal(ka, (B, L, D) if spec.startswith("bld") else (B, L, V))
    b = jax.random.normal(kb, (V, D))
    g = jax.random.normal(kg, jax.eval_shape(lambda: jnp.einsum(spec, a, b)).shape)
    out = {}
    for dt in (jnp.float32, jnp.bfloat16):
        y, vjp = jax.vjp(lambda a, b, dt=dt: head_einsum(spec, a, b, dt), a, b)
        out[dt] = (y, *vjp(g))
    for ref, low in zip(out[jnp.float32], out[jnp.bfloat16]):
        assert low.dtype == jnp.float32 and ref.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(low - ref)) / jnp.max(jnp.abs(ref)))
        assert 0.0 < err < 2e-2, err


@pytest.mark.parametrize("knob", ["head_dtype", "io_dtype"])
def test_bfloat16_gemms_keep_float32_outputs_close_to_float32(knob):
    """model.head_dtype (the head, the output prior, softmax @ E) or model.io_dtype (the stem
    and out_proj) "bfloat16": x0_hat and logits are float32, within bf16 rounding of the
    float32 GEMMs' (same weights, output prior, posterior input and self-conditioning on) and
    not identical."""
    x_t, lam, tokens = inputs(2)
    mask = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    out = {}
    for dt in ("float32", "bfloat16"):
        cfg = model_cfg(**{knob: dt}, posterior_input=True, self_condition=True)
        out[dt] = predict(DimbaModel(cfg, V, rngs=nnx.Rngs(0)), x_t, lam, tokens, mask)
    for ref, low in zip(out["float32"], out["bfloat16"]):
        assert low.dtype == jnp.float32 and low.shape == ref.shape
        assert not np.array_equal(np.asarray(low), np.asarray(ref))
        err = float(jnp.max(jnp.abs(low - ref)) / jnp.max(jnp.abs(ref)))
        assert err < 2e-2, err


@pytest.mark.parametrize("knob", ["head_dtype", "io_dtype"])
def test_bfloat16_gemms_keep_gradients_finite_and_close_to_float32(knob):
    """jax.grad of cross-entropy + x0 error through the model (same weights, both settings in
    one jitted program): with the head's (model.head_dtype) or the stem's and out_proj's
    (model.io_dtype) GEMMs in bf16, every parameter's gradient is finite and within a few
    percent (relative norm) of the float32 GEMMs'."""
    x_t, lam, tokens = inputs(4)
    mask = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    graphs = {}
    for dt in ("float32", "bfloat16"):
        cfg = model_cfg(**{knob: dt}, posterior_input=True, bidirectional=False, ssd_impl="xla")
        graphs[dt], params = nnx.split(DimbaModel(cfg, V, rngs=nnx.Rngs(0)))

    def loss(params, graph):
        model = nnx.merge(graph, params)
        x0, logits = model.predict(x_t, lam, tokens, mask)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1))
        return ce + jnp.mean(jnp.square(x0 - model.embed(tokens)))

    both = jax.jit(lambda p: {dt: jax.grad(loss)(p, g) for dt, g in graphs.items()}).lower(params)
    # XLA's lowest CPU optimisation level: the values are checked, not the speed (compile time)
    grads = both.compile(compiler_options={"xla_backend_optimization_level": 0})(params)
    ref, low = (jax.tree.leaves(grads[dt]) for dt in ("float32", "bfloat16"))
    assert len(ref) == len(low) > 10
    for r, g in zip(ref, low):
        assert g.dtype == r.dtype and bool(jnp.all(jnp.isfinite(g)))
        rel = float(jnp.linalg.norm(g - r) / jnp.maximum(jnp.linalg.norm(r), 1e-12))
        assert rel < 5e-2, rel


@pytest.mark.parametrize("knob", ["head_dtype", "io_dtype"])
def test_unknown_gemm_dtype_is_a_one_line_error(knob):
    with pytest.raises(ValueError, match=rf"model\.{knob} must be one of") as err:
        DimbaModel(model_cfg(**{knob: "float16"}), V, rngs=nnx.Rngs(0))
    assert "\n" not in str(err.value)


def test_io_dtype_bfloat16_parameters_pre_cast_by_the_samplers_give_the_same_bits():
    """model.io_dtype "bfloat16": the samplers' pre-cast (`cast_linears_to_compute_dtype`:
    in_proj's and out_proj's kernel and bias stored in bf16) leaves x0_hat and logits bit for
    bit."""
    from dimba_jax.layers.precision import cast_linears_to_compute_dtype

    x_t, lam, tokens = inputs(3)
    mask = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    model = DimbaModel(model_cfg(io_dtype="bfloat16", self_condition=True), V, rngs=nnx.Rngs(0))
    before = predict(model, x_t, lam, tokens, mask)
    assert cast_linears_to_compute_dtype(model) >= 4
    assert model.in_proj.kernel[...].dtype == jnp.bfloat16 == model.out_proj.bias[...].dtype
    for a, b in zip(before, predict(model, x_t, lam, tokens, mask)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_io_dtype_float32_is_the_float32_affine_map():
    """io_dtype "float32": `project_out` is the float32 out_proj of the final norm, bit for bit,
    and nothing is cast by the samplers' pre-cast."""
    from dimba_jax.layers.precision import cast_linears_to_compute_dtype

    model = DimbaModel(model_cfg(io_dtype="float32"), V, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(5), (B, L, D))
    np.testing.assert_array_equal(np.asarray(model.project_out(h)),
                                  np.asarray(model.out_proj(model.final_norm(h))))
    assert model.in_proj.dtype is None and model.out_proj.dtype is None
    assert cast_linears_to_compute_dtype(model) == 0


def test_stem_is_the_input_projection_with_the_mask_column_as_a_rank1_term():
    """`stem` = `in_proj` on [features | mask] (the GEMM over the features only): same values
    for a random kernel and bias and a 0/1 mask column, and the same gradient to the kernel."""
    model = DimbaModel(model_cfg(head_dtype="float32"), V, rngs=nnx.Rngs(0))
    n = model.in_proj.kernel.shape[0]
    k = jax.random.split(jax.random.key(11), 3)
    model.in_proj.kernel[...] = jax.random.normal(k[0], model.in_proj.kernel.shape)
    model.in_proj.bias[...] = jax.random.normal(k[1], model.in_proj.bias.shape)
    feats = jax.random.normal(k[2], (B, L, n - 1))
    mask = (jnp.arange(L) % 3 == 0).astype(jnp.float32)[None, :, None] * jnp.ones((B, 1, 1))
    x = jnp.concatenate([feats, mask], axis=-1)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(model.stem(x)), np.asarray(model.in_proj(x)), rtol=1e-5, atol=1e-4)

        grads = [nnx.grad(lambda m, f=f: jnp.sum(jnp.sin(getattr(m, f)(x))))(model)["in_proj"]
                 for f in ("stem", "in_proj")]
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(grads[0][name][...]), np.asarray(grads[1][name][...]),
                                       rtol=1e-4, atol=1e-4)


def test_the_prior_folded_into_the_head_gemm_is_the_sum_of_both_logits():
    """`logits_with_prior` (one GEMM over (scale x + w coef x_t)) = logits(x) + w prior_logits
    (x_t), per-sequence and per-position log-SNR, with a logit bias; `predict` folds it where
    the head is tied and there is no posterior input, and then computes no prior alone."""
    model = DimbaModel(model_cfg(head_dtype="float32", logit_bias=True), V, rngs=nnx.Rngs(0))
    model.logit_bias[...] = jax.random.normal(jax.random.key(3), (V,))
    model.logit_scale[...] = jnp.asarray(0.7)
    x, x_t = (jax.random.normal(jax.random.key(k), (B, L, D)) for k in (4, 5))
    assert model.folds_prior()
    for lam in (jnp.asarray([-3.0, 2.0]), jax.random.uniform(jax.random.key(6), (B, L), minval=-6, maxval=4)):
        with jax.default_matmul_precision("highest"):
            got = model.logits_with_prior(x, x_t, lam, weight=0.6)
            want = model.logits(x) + 0.6 * model.prior_logits(x_t, lam)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    known = jnp.zeros((B, L), bool)
    assert model.stem_input(x_t, lam, known, x_t, None)[1] is None
    post = DimbaModel(model_cfg(posterior_input=True), V, rngs=nnx.Rngs(0))
    assert not post.folds_prior() and post.stem_input(x_t, lam, known, x_t, None)[1] is not None


@pytest.mark.parametrize("io_dtype", ["float32", "bfloat16"])
def test_io_dtype_sets_the_prompt_mlps_gemm_operands(io_dtype):
    """model.io_dtype reaches the "mlp" prompt encoder: both of its GEMMs take operands in it
    (the jaxpr of `prompt_context`), its output is float32 and, in bf16, within bf16 rounding
    of the float32 encoder's (same weights) but not identical."""
    tokens = inputs(6)[2]
    mask = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    model = DimbaModel(model_cfg(io_dtype=io_dtype), V, rngs=nnx.Rngs(0))
    jaxpr = jax.make_jaxpr(lambda t, m: model.prompt_context(t, m).c_pos)(tokens, mask)

    def dots_in(jx):  # dot_general operand dtypes, inside custom-VJP calls too
        out = []
        for e in jx.eqns:
            if e.primitive.name == "dot_general":
                out.append([v.aval.dtype for v in e.invars])
            for sub in e.params.values():
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += dots_in(sub)
        return out

    dots = dots_in(jaxpr.jaxpr)
    assert len(dots) == 2 and all(d == [jnp.dtype(io_dtype)] * 2 for d in dots), dots
    c_pos = model.prompt_context(tokens, mask).c_pos
    ref = DimbaModel(model_cfg(io_dtype="float32"), V, rngs=nnx.Rngs(0)).prompt_context(tokens, mask).c_pos
    assert c_pos.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(c_pos - ref)) / jnp.max(jnp.abs(ref)))
    assert (err == 0.0) == (io_dtype == "float32") and err < 2e-2, err
