"""Cosine schedule, noising formula, respacing and prompt layouts (no model; fast)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimba_jax.diffusion.layout import max_known, sample_layout
from dimba_jax.diffusion.schedule import add_noise_logsnr, cosine_schedule


def _formula(t, big_t, s=0.008):
    # Written out independently of the module: the seed's formula, no renormalisation.
    return math.cos(((t / big_t + s) / (1 + s)) * math.pi / 2) ** 2


@pytest.mark.parametrize("big_t", [10, 1000])
def test_alpha_bar_matches_formula(big_t):
    sch = cosine_schedule(big_t)
    assert sch.alpha_bar.shape == (big_t + 1,)
    for t in range(big_t):
        assert sch.alpha_bar[t] == pytest.approx(_formula(t, big_t), abs=2e-7), t
    assert 0.999 < sch.alpha_bar[0] < 1.0  # not renormalised: cos^2(s/(1+s) pi/2)
    # formula gives 0 at t = T; the beta clip at 0.999 floors it at 0.001 * alpha_bar(T-1)
    assert sch.alpha_bar[big_t] == pytest.approx(0.001 * _formula(big_t - 1, big_t), rel=1e-4)


@pytest.mark.parametrize("big_t", [10, 1000])
def test_betas_monotone_clipped_and_consistent(big_t):
    sch = cosine_schedule(big_t)
    ab = sch.alpha_bar.astype(np.float64)
    assert np.all(np.diff(ab) < 0), "alpha_bar must strictly decrease"
    betas = sch.betas[1:].astype(np.float64)
    assert np.all(betas > 0) and np.all(betas <= 0.999 + 1e-6)
    assert betas[-1] == pytest.approx(0.999, abs=1e-6)  # formula gives 1 at t=T: clipped
    np.testing.assert_allclose(betas[:-1], [1 - _formula(t, big_t) / _formula(t - 1, big_t)
                                            for t in range(1, big_t)], rtol=1e-4, atol=1e-7)
    # alpha_bar(t) = alpha_bar(0) * prod_{s<=t} (1 - beta_s) everywhere (clip propagated)
    np.testing.assert_allclose(ab[0] * np.cumprod(1 - betas), ab[1:], rtol=2e-3, atol=1e-9)
    assert np.all(np.diff(betas[:-1]) > 0), "betas increase with t"


def test_add_noise_at_the_schedule_levels_is_the_formula():
    sch = cosine_schedule(1000)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (3, 5, 4))
    eps = jax.random.normal(k2, (3, 5, 4))
    t = jnp.array([1, 500, 999])
    got = np.asarray(add_noise_logsnr(x0, sch.logsnr_at(t), eps))
    for i, ti in enumerate([1, 500, 999]):
        ab = _formula(ti, 1000)
        want = math.sqrt(ab) * np.asarray(x0[i]) + math.sqrt(1 - ab) * np.asarray(eps[i])
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    # at t = T the sample is (essentially) pure noise
    at_t = np.asarray(add_noise_logsnr(x0, sch.logsnr_at(jnp.array([1000] * 3)), eps))
    np.testing.assert_allclose(at_t, np.asarray(eps), atol=3e-4)


def test_training_t_uniform_in_range():
    sch = cosine_schedule(10)
    t = np.asarray(sch.sample_t(jax.random.key(1), (20000,)))
    assert t.min() == 1 and t.max() == 10
    counts = np.bincount(t, minlength=11)[1:]
    assert np.all(np.abs(counts / 20000 - 0.1) < 0.015)


@pytest.mark.parametrize("power", [2.0, 0.5])
def test_training_t_power_follows_its_cdf(power):
    """P(t <= k) = (k/T)**power for the power-biased draw (power 2: more noisy t)."""
    sch = cosine_schedule(10)
    t = np.asarray(sch.sample_t(jax.random.key(2), (40000,), power=power))
    assert t.dtype == np.int32 and t.min() >= 1 and t.max() <= 10
    cdf = np.array([(t <= k).mean() for k in range(1, 11)])
    np.testing.assert_allclose(cdf, (np.arange(1, 11) / 10) ** power, atol=0.01)


def test_training_t_power_must_be_positive():
    with pytest.raises(ValueError, match="power"):
        cosine_schedule(10).sample_t(jax.random.key(0), (3,), power=0.0)


def test_respaced_timesteps():
    sch = cosine_schedule(1000)
    np.testing.assert_array_equal(sch.respaced_timesteps(1000), np.arange(1000, 0, -1))
    np.testing.assert_array_equal(sch.respaced_timesteps(1), [1000])
    ts = sch.respaced_timesteps(7)
    assert len(ts) == 7 and ts[0] == 1000 and ts[-1] == 1 and np.all(np.diff(ts) < 0)
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="steps"):
            sch.respaced_timesteps(bad)
    with pytest.raises(ValueError):
        cosine_schedule(0)


def test_layouts_have_the_documented_shapes():
    length, frac = 40, 0.5
    k_max = max_known(length, frac)
    mask, kind = sample_layout(jax.random.key(3), 3000, length, (0.3, 0.5, 0.2), frac)
    mask, kind = np.asarray(mask), np.asarray(kind)
    freq = np.bincount(kind, minlength=3) / len(kind)
    np.testing.assert_allclose(freq, [0.3, 0.5, 0.2], atol=0.04)
    for m, k in zip(mask, kind):
        n_known = m.sum()
        assert n_known <= k_max and (~m).sum() >= 1
        if k == 0:
            assert n_known == 0
        elif k == 1:
            assert n_known >= 1 and m[:n_known].all()  # a contiguous prefix
        else:
            gen = np.flatnonzero(~m)
            assert m[0] and m[-1] and n_known >= 2  # known on both sides
            assert np.all(np.diff(gen) == 1)  # one generated middle span
    # all prefix lengths 1..K occur
    prefix_lengths = {int(m.sum()) for m, k in zip(mask, kind) if k == 1}
    assert prefix_lengths == set(range(1, k_max + 1))


def test_layout_errors():
    with pytest.raises(ValueError, match="layout_probs"):
        sample_layout(jax.random.key(0), 2, 16, (0.5, 0.5), 0.5)
    with pytest.raises(ValueError, match="max_prompt_frac"):
        sample_layout(jax.random.key(0), 2, 16, (0.3, 0.5, 0.2), 1.5)
