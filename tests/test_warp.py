"""The noise levels and the read-out: the learned noise warp (fit, CDF, sampling, quantile grid),
the log-SNR shift, score interpolation, the output prior, the likelihood bound and context use."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dimba_jax.config import default_config
from dimba_jax.diffusion import sampler as sampling
from dimba_jax.diffusion.schedule import cosine_schedule
from dimba_jax.tasks.dimba import DimbaTask
from dimba_jax.diffusion.warp import NoiseWarp

LO, HI = -12.0, 4.0


def known_curve(lam):
    """A cross-entropy-like curve: 6 nats at the noisy end, 0 at the clean end, steepest at -4."""
    return 6.0 / (1.0 + np.exp(1.5 * (np.asarray(lam) + 4.0)))


@pytest.fixture(scope="module")
def fitted():
    warp = NoiseWarp(LO, HI, bins=32, max_loss=6.0, floor=0.0)
    opt = nnx.Optimizer(warp, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(warp, opt, rng):
        lam = jax.random.uniform(rng, (256,), minval=LO, maxval=HI)
        target = 6.0 / (1.0 + jnp.exp(1.5 * (lam + 4.0)))
        grads = nnx.grad(lambda w: w.regression_loss(lam, target))(warp)
        opt.update(warp, grads)

    for i in range(400):
        step(warp, opt, jax.random.key(i))
    return warp


def test_warp_fit_matches_a_known_loss_curve_and_is_monotone(fitted):
    lam = np.linspace(LO, HI, 97)
    fit = np.asarray(fitted(jnp.asarray(lam)))
    np.testing.assert_allclose(fit, known_curve(lam), atol=0.15)
    knots, f = (np.asarray(a) for a in fitted.knots())
    assert np.all(np.diff(knots) < 0) and np.all(np.diff(f) >= 0)  # F grows with the noise
    g = np.asarray(fitted.cdf(jnp.asarray(lam)))
    assert np.all(np.diff(g) <= 1e-7) and g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(0.0)
    # with no floor, the sampling CDF is the normalised fit: G = (F - F(hi)) / (F(lo) - F(hi))
    np.testing.assert_allclose(g, (fit - fit[-1]) / (fit[0] - fit[-1]), atol=1e-5)


def test_sampled_levels_follow_the_warp(fitted):
    samples = np.asarray(fitted.sample(jax.random.key(0), (20000,)))
    assert samples.min() >= LO and samples.max() <= HI
    grid = np.linspace(LO, HI, 41)
    empirical = np.array([(samples >= x).mean() for x in grid])  # u = 0 is the clean end
    np.testing.assert_allclose(empirical, np.asarray(fitted.cdf(jnp.asarray(grid))), atol=0.015)
    # the levels crowd where the curve changes: half of them within 1.2 of its steepest point
    assert np.mean(np.abs(samples + 4.0) < 1.2) > 0.5
    # a floor keeps every level visited
    floored = NoiseWarp(LO, HI, bins=32, floor=0.5)
    floored.w[...] = fitted.w[...]
    far = np.asarray(floored.sample(jax.random.key(1), (20000,)))
    assert np.mean(far < -9.0) > 3 * np.mean(samples < -9.0) + 0.01


def test_sampling_grid_steps_are_the_quantiles(fitted):
    steps = 8
    grid = np.asarray(fitted.quantile_grid(steps))
    u = 1.0 - np.arange(steps) / steps
    np.testing.assert_allclose(np.asarray(fitted.cdf(jnp.asarray(grid))), u, atol=1e-5)
    assert grid[0] == pytest.approx(LO) and np.all(np.diff(grid) > 0)  # noisiest first

    class Holder:
        noise_warp = fitted
    lam, ab_t, ab_prev = (np.asarray(a) for a in sampling.noise_grid(Holder(), cosine_schedule(10), steps, "warp"))
    np.testing.assert_allclose(lam, grid, rtol=1e-6)
    np.testing.assert_allclose(ab_t, 1.0 / (1.0 + np.exp(-grid)), rtol=1e-5)
    np.testing.assert_allclose(ab_prev, np.append(ab_t[1:], 1.0), rtol=1e-6)
    with pytest.raises(ValueError, match="noise warp"):
        sampling.noise_grid(object(), cosine_schedule(10), steps, "warp")


def test_logsnr_shift_moves_every_level():
    base, shifted = cosine_schedule(100), cosine_schedule(100, logsnr_shift=-3.0)
    np.testing.assert_allclose(shifted.logsnr_table()[:-1], base.logsnr_table()[:-1] - 3.0, atol=2e-3)
    assert shifted != base and hash(shifted) != hash(base)
    np.testing.assert_array_equal(cosine_schedule(100, logsnr_shift=0.0).alpha_bar, base.alpha_bar)


def tiny_task(**model):
    c = default_config()
    with c.unlocked():
        c.model.update(d_model=32, n_layers=1, d_state=8, headdim=16, chunk_size=16, time_embed_dim=16,
                       ssd_impl="xla", head_dtype="float32", **model)  # float32: exact comparisons
        c.data.seq_len = 48
        c.data.tokenizer = "byte"
    return DimbaTask(c)


@pytest.mark.parametrize("embed_dim", [0, 8])
def test_score_interpolation_and_the_output_prior(embed_dim):
    task = tiny_task(embed_dim=embed_dim)
    model = task.init_model(nnx.Rngs(0))
    e = embed_dim or 32
    assert model.embed_dim == e and model.embedding_table().shape == (model.vocab_size, e)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    x_t = jax.random.normal(jax.random.key(2), (2, 16, e))
    lam = jnp.asarray([-3.0, 1.0])
    known = jnp.zeros((2, 16), bool)
    x0, logits = model.predict(x_t, lam, tokens, known)
    table = np.asarray(model.embedding_table(), np.float64)
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    np.testing.assert_allclose(np.asarray(x0), probs @ table, atol=1e-4)  # a softmax mean of rows
    # the prior is the exact Gaussian log-likelihood of x_t under each row, up to a per-position constant
    ab = 1.0 / (1.0 + np.exp(-np.asarray(lam, np.float64)))[:, None, None, None]
    diff = np.asarray(x_t, np.float64)[:, :, None, :] - np.sqrt(ab) * table[None, None]
    exact = -0.5 * np.sum(diff ** 2, -1) / (1.0 - ab[..., 0])
    prior = np.asarray(model.prior_logits(x_t, lam), np.float64)
    centred = lambda a: a - a.max(-1, keepdims=True)
    np.testing.assert_allclose(centred(prior), centred(exact), rtol=1e-4, atol=1e-2)
    # the warp is a parameter of the model, so checkpoints and the EMA carry it
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {"noise_warp/w", "noise_warp/bias"} <= names


def test_prior_weight_scales_the_output_prior_in_predict_and_sampling():
    from dimba_jax.diffusion import sampler as sampling
    task = tiny_task()
    model = task.init_model(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    x_t = jax.random.normal(jax.random.key(2), (2, 16, 32))
    lam, known = jnp.asarray([-3.0, 1.0]), jnp.zeros((2, 16), bool)
    _, full = model.predict(x_t, lam, tokens, known)
    _, part = model.predict(x_t, lam, tokens, known, prior_weight=0.3)
    _, none = model.predict(x_t, lam, tokens, known, prior_weight=0.0)
    prior = model.prior_logits(x_t, lam)
    np.testing.assert_allclose(np.asarray(full), np.asarray(none + prior), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(part), np.asarray(none + 0.3 * prior), rtol=1e-5, atol=1e-3)
    # through the jitted sampler: weight 0 is the same network without its prior, 1 the default
    kw = dict(steps=4, sampler="ddim", clamp=False, grid="warp", return_x0=True)
    mask = jnp.broadcast_to(jnp.arange(16) < 4, (2, 16))
    rng = jax.random.key(5)
    ids0, x00 = sampling.sample(model, task.schedule, tokens, mask, rng, prior_weight=0.0, **kw)
    ids1, x01 = sampling.sample(model, task.schedule, tokens, mask, rng, **kw)
    assert not np.allclose(np.asarray(x00), np.asarray(x01), atol=1e-3)
    model.skip_logits = False
    ids_off, x0_off = sampling.sample(model, task.schedule, tokens, mask, rng, **kw)
    np.testing.assert_allclose(np.asarray(x00), np.asarray(x0_off), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(ids0), np.asarray(ids_off))
    with pytest.raises(ValueError, match="prior_weight"):
        sampling.sample(model, task.schedule, tokens, mask, rng, prior_weight=-1.0, **kw)
    # a schedule: from prior_weight at the first step to prior_weight_final at the last
    model.skip_logits = True
    const = sampling.sample(model, task.schedule, tokens, mask, rng, prior_weight=0.3, **kw)[1]
    same = sampling.sample(model, task.schedule, tokens, mask, rng, prior_weight=0.3, prior_weight_final=0.3, **kw)[1]
    ramp = sampling.sample(model, task.schedule, tokens, mask, rng, prior_weight=0.3, prior_weight_final=1.0, **kw)[1]
    np.testing.assert_allclose(np.asarray(same), np.asarray(const), atol=1e-5)
    assert not np.allclose(np.asarray(ramp), np.asarray(const), atol=1e-3)
    one = dict(kw, steps=1)  # one step uses the first value
    np.testing.assert_allclose(
        np.asarray(sampling.sample(model, task.schedule, tokens, mask, rng, prior_weight=0.3, prior_weight_final=1.0, **one)[1]),
        np.asarray(sampling.sample(model, task.schedule, tokens, mask, rng, prior_weight=0.3, **one)[1]), atol=1e-5)


@pytest.mark.parametrize("embed_dim", [0, 8])
def test_likelihood_bound_parts_and_estimator(embed_dim):
    task = tiny_task(embed_dim=embed_dim)
    model = task.init_model(nnx.Rngs(0))
    e = embed_dim or 32  # the diffusion space's width
    tokens = jax.random.randint(jax.random.key(3), (2, 48), 0, 256)
    out = task.nll_bound(model, {"tokens": tokens}, levels=64)
    assert out["bound_bits"] == pytest.approx(out["recon_bits"] + out["diffusion_bits"] + out["prior_bits"])
    lo, hi = task.config.diffusion.logsnr_range
    ab = 1.0 / (1.0 + math.exp(-lo))
    kl = -0.5 * e * math.log1p(-ab)  # rows have norm^2 = e, so only the log term is left
    assert out["prior_bits"] == pytest.approx(kl / math.log(2), rel=1e-4)
    # uniform random bytes carry 8 bits each: no denoiser's bound goes below that (up to the
    # Monte Carlo error of 64 levels), and an untrained one sits near it
    assert 8.0 - 0.3 < out["bound_bits"] < 3 * 8.0
    # stratified estimate vs a dense trapezoid of the same integrand
    noise = jax.random.normal(jax.random.key(9), (2, 48, e))
    lams = np.linspace(lo, hi, 161)
    vals = [0.5 * math.exp(v) * e * float(task.terms_at(model, tokens, float(v), noise)["mse"]) for v in lams]
    dense = np.trapezoid(vals, lams) / math.log(2)
    assert dense > 8.0
    assert out["diffusion_bits"] == pytest.approx(dense, rel=0.1)


def test_context_use_keys_and_bad_window():
    task = tiny_task()
    model = task.init_model(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 48), 0, 256)
    out = task.context_use(model, {"tokens": tokens}, prompt_len=16, positions=4, logsnrs=(-6.0, -2.0))
    assert set(out) == {"acc_prompt_lam-6", "acc_noprompt_lam-6", "acc_prompt_lam-2", "acc_noprompt_lam-2"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    with pytest.raises(ValueError, match="at least"):
        task.context_use(model, {"tokens": tokens[:, :10]}, prompt_len=16, positions=4)


def test_context_use_by_position_averages_to_context_use():
    """Position by position, the first entry the token right after the prompt; the means are
    `context_use`'s numbers, and an all-known window reads as the prompt case."""
    task = tiny_task()
    model = task.init_model(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 48), 0, 256)
    per = task.context_use_by_position(model, [{"tokens": tokens}], prompt_len=16, positions=4, logsnrs=(-6.0, -2.0))
    out = task.context_use(model, {"tokens": tokens}, prompt_len=16, positions=4, logsnrs=(-6.0, -2.0))
    assert set(per) == {-6.0, -2.0}
    for lam, (with_p, without) in per.items():
        assert with_p.shape == without.shape == (4,)
        assert out[f"acc_prompt_lam{lam:g}"] == pytest.approx(with_p.mean())
        assert out[f"acc_noprompt_lam{lam:g}"] == pytest.approx(without.mean())


def test_successor_control_data_is_successive_letters(tmp_path):
    import json
    import string

    from benchmarks import context_probe
    train, val = context_probe.make_successor(str(tmp_path), train_lines=20, val_lines=5)
    lines = [json.loads(x)["text"].split(" ") for x in open(train)] + [json.loads(x)["text"].split(" ") for x in open(val)]
    assert len(lines) == 25
    for letters in lines:
        assert 60 <= len(letters) <= 120
        idx = [string.ascii_lowercase.index(c) for c in letters]
        assert all((b - a) % 26 == 1 for a, b in zip(idx, idx[1:]))


def test_unigram_bound_is_the_entropy_for_the_exact_posterior():
    """The context-free denoiser with the true unigram prior is the exact posterior of i.i.d.
    tokens, so its bound is their entropy (up to the Monte Carlo error of the strata): log2 V
    for uniform tokens; H(p) for tokens drawn from p with log_prior = log p, less than the
    same tokens scored under a uniform prior."""
    task = tiny_task()
    model = task.init_model(nnx.Rngs(0))
    v = model.vocab_size
    uniform = jax.random.randint(jax.random.key(1), (4, 48), 0, v)
    out = task.unigram_bound(model, {"tokens": uniform}, jnp.full((v,), -math.log(v)), levels=64)
    assert out["bound_bits"] == pytest.approx(math.log2(v), rel=0.02)
    assert out["bound_bits"] == pytest.approx(out["recon_bits"] + out["diffusion_bits"] + out["prior_bits"])
    p = np.exp(-0.05 * np.arange(v))
    p /= p.sum()
    skewed = jax.random.choice(jax.random.key(2), v, (4, 48), p=jnp.asarray(p))
    entropy = float(-(p * np.log2(p)).sum())
    fit = task.unigram_bound(model, {"tokens": skewed}, jnp.log(jnp.asarray(p)), levels=64)
    flat = task.unigram_bound(model, {"tokens": skewed}, jnp.full((v,), -math.log(v)), levels=64)
    assert fit["bound_bits"] == pytest.approx(entropy, rel=0.03)
    assert fit["bound_bits"] < flat["bound_bits"] - 1.0
    with pytest.raises(ValueError, match="log_prior"):
        task.unigram_bound(model, {"tokens": uniform}, jnp.zeros((3,)))
