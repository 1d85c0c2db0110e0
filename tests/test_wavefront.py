"""The wavefront of noise levels: its geometry, the per-position model, the training draw, the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.config import default_config
from dimba_jax.diffusion import sampler as sampling
from dimba_jax.diffusion import wavefront
from dimba_jax.diffusion.losses import sample_logsnr, sample_wavefront_logsnr
from dimba_jax.tasks.dimba import DimbaTask


def tiny_task(**overrides):
    c = default_config()
    with c.unlocked():
        c.model.update(d_model=32, n_layers=1, d_state=8, headdim=16, chunk_size=16, time_embed_dim=16,
                       ssd_impl="xla", position_levels=True, head_dtype="float32")  # exact comparisons
        c.data.seq_len = 24
        c.data.tokenizer = "byte"
        c.diffusion.wavefront = 3.0
        c.diffusion.wavefront_prob = 0.5
        for key, value in overrides.items():
            section, name = key.split(".")
            c[section][name] = value
    return DimbaTask(c)


def test_generation_rank_counts_generated_positions_only():
    mask = np.zeros((3, 6), bool)
    mask[1, :2] = True           # prefix of 2
    mask[2, [0, 5]] = True       # infill: 4 generated in the middle
    r = np.asarray(wavefront.generation_rank(jnp.asarray(mask)))
    np.testing.assert_allclose(r[0], np.arange(6) / 5)
    np.testing.assert_allclose(r[1], [0, 0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(r[2], [0, 0, 1 / 3, 2 / 3, 1, 0])
    one = np.asarray(wavefront.generation_rank(jnp.asarray([[True, True, False]])))
    np.testing.assert_allclose(one, [[0, 0, 0]])


def test_progress_geometry():
    r = jnp.linspace(0.0, 1.0, 11)[None]
    # W = 0 is the single level
    np.testing.assert_allclose(np.asarray(wavefront.progress(jnp.asarray([0.3]), r, 0.0)), 0.3, atol=1e-7)
    for w in (0.5, 1.0, 3.0):
        for s in np.linspace(0, 1, 9):
            u = np.asarray(wavefront.progress(jnp.asarray([s]), r, w))[0]
            assert np.all(np.diff(u) >= -1e-7)  # the left is never noisier than the right
            assert np.all((u >= 0) & (u <= 1))
        np.testing.assert_allclose(np.asarray(wavefront.progress(jnp.asarray([1.0]), r, w)), 1.0)
        np.testing.assert_allclose(np.asarray(wavefront.progress(jnp.asarray([0.0]), r, w)), 0.0)
        # the first position is clean at s = W / (1 + W); the last starts at s = 1 / (1 + W)
        assert float(wavefront.progress(jnp.asarray([w / (1 + w)]), r, w)[0, 0]) == pytest.approx(0.0, abs=1e-6)
        assert float(wavefront.progress(jnp.asarray([1 / (1 + w)]), r, w)[0, -1]) == pytest.approx(1.0, abs=1e-6)
        # each position crosses its range at the same speed: du/ds = 1 + W inside it
        u1, u2 = (np.asarray(wavefront.progress(jnp.asarray([s]), r, w))[0, 5] for s in (0.5, 0.52))
        if 0 < u1 < 1 and 0 < u2 < 1:
            assert (u2 - u1) / 0.02 == pytest.approx(1 + w, rel=1e-4)


def test_sample_widths_and_clock():
    w = np.asarray(wavefront.sample_widths(jax.random.key(0), 20000, 3.0, 0.25))
    assert np.mean(w > 0) == pytest.approx(0.25, abs=0.015)
    assert w.max() <= 3.0 and w.min() >= 0.0
    assert np.mean(w[w > 0]) == pytest.approx(1.5, abs=0.05)
    with pytest.raises(ValueError, match="wavefront"):
        wavefront.sample_widths(jax.random.key(0), 4, -1.0, 0.5)
    s, nxt = (np.asarray(a) for a in wavefront.clock_grid(4))
    np.testing.assert_allclose(s, [1, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(nxt, [0.75, 0.5, 0.25, 0.0])


def test_training_levels_without_a_wavefront_are_the_single_levels():
    task = tiny_task(**{"diffusion.wavefront_prob": 0.0})
    model = task.init_model(nnx.Rngs(0))
    mask = jnp.zeros((5, 24), bool).at[:, :4].set(True)
    rng = jax.random.key(3)
    per_pos = np.asarray(sample_wavefront_logsnr(model, rng, mask, task.config.diffusion))
    single = np.asarray(sample_logsnr(model, task.schedule, rng, 5, task.config.diffusion))
    np.testing.assert_allclose(per_pos, np.broadcast_to(single[:, None], per_pos.shape), atol=1e-5)
    # with every example on a wavefront, levels never decrease from left to right... in noise
    task = tiny_task(**{"diffusion.wavefront_prob": 1.0})
    lam = np.asarray(sample_wavefront_logsnr(model, rng, mask, task.config.diffusion))[:, 4:]
    assert np.all(np.diff(lam, axis=1) <= 1e-5)  # log-SNR falls (noise grows) to the right
    assert np.any(lam[:, 0] > lam[:, -1] + 1.0)


def test_per_position_levels_reach_the_model():
    task = tiny_task()
    model = task.init_model(nnx.Rngs(0))
    model.level_proj.kernel[...] = jax.random.normal(jax.random.key(9), model.level_proj.kernel.shape) * 0.3
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    x_t = jax.random.normal(jax.random.key(2), (2, 12, 32))
    known = jnp.zeros((2, 12), bool)
    lam = jnp.asarray([-3.0, 1.0])
    x_seq, l_seq = model.predict(x_t, lam, tokens, known)
    x_pos, l_pos = model.predict(x_t, jnp.broadcast_to(lam[:, None], (2, 12)), tokens, known)
    np.testing.assert_allclose(np.asarray(l_pos), np.asarray(l_seq), rtol=1e-5, atol=1e-5)
    # one position's level moves that position's prior and the network's reading of it
    lam2 = jnp.broadcast_to(lam[:, None], (2, 12)).at[:, 7].set(4.0)
    _, l_moved = model.predict(x_t, lam2, tokens, known)
    assert float(jnp.max(jnp.abs(l_moved[:, 7] - l_pos[:, 7]))) > 1e-2
    with pytest.raises(ValueError, match="per-position logsnr"):
        model.predict(x_t, jnp.zeros((2, 5)), tokens, known)


def test_wavefront_training_loss_and_warp_fit():
    task = tiny_task()
    model = task.init_model(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 24), 0, 256)
    (loss, metrics), grads = nnx.jit(nnx.value_and_grad(
        lambda m: task.loss(m, {"tokens": tokens}, jax.random.key(0)), has_aux=True))(model)
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["warp_mse"]))
    assert float(jnp.max(jnp.abs(grads.level_proj.kernel[...]))) > 0
    assert float(jnp.max(jnp.abs(grads.noise_warp.w[...]))) > 0
    # the warp's per-position regression weighs generated positions only
    lam = jnp.asarray([[-2.0, 0.0], [-2.0, 0.0]])
    obs = jnp.asarray([[5.0, 1.0], [5.0, 100.0]])
    weight = jnp.asarray([[True, True], [True, False]])
    f = np.asarray(model.noise_warp(lam))
    want = ((f[0, 0] - 5) ** 2 * 2 + (f[0, 1] - 1) ** 2) / 3
    assert float(model.noise_warp.regression_loss(lam, obs, weight=weight)) == pytest.approx(want, rel=1e-5)


def test_bad_wavefront_settings_are_refused():
    with pytest.raises(ValueError, match="model.position_levels"):
        tiny_task(**{"model.position_levels": False})
    with pytest.raises(ValueError, match="noise_sampling"):
        tiny_task(**{"diffusion.noise_sampling": "uniform"})
    with pytest.raises(ValueError, match="sample.grid"):
        tiny_task(**{"sample.wavefront": 1.0, "sample.grid": "uniform"})
    with pytest.raises(ValueError, match=">= 0"):
        tiny_task(**{"sample.wavefront": -1.0})


def test_sampler_wavefront_levels_and_limit():
    task = tiny_task()
    model = task.init_model(nnx.Rngs(0))
    known = jnp.zeros((1, 10), bool).at[:, :3].set(True)
    rank = wavefront.generation_rank(known)
    lam, a_t, a_prev = sampling.wavefront_levels(model, rank, 1.0, 0.6, 0.5, 0.0)
    lam = np.asarray(lam)[0, 3:]
    assert np.all(np.diff(lam) <= 1e-6) and lam[0] > lam[-1]  # cleaner on the left
    assert np.all(np.asarray(a_prev)[0, 3:, 0] >= np.asarray(a_t)[0, 3:, 0] - 1e-7)  # each step denoises
    _, _, last = sampling.wavefront_levels(model, rank, 1.0, 0.1, 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(last), 1.0)  # the last step ends on clean data
    # a vanishing width is the "warp" grid: the same samples
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 256)
    known2 = jnp.broadcast_to(known, (2, 10))
    kw = dict(steps=6, grid="warp", score_temperature=0.8, clamp=False)
    for name in ("ddim", "ddpm"):
        base_ids, base_x0 = sampling.sample(model, task.schedule, tokens, known2, jax.random.key(4), sampler=name,
                                            return_x0=True, **kw)
        wf_ids, wf_x0 = sampling.sample(model, task.schedule, tokens, known2, jax.random.key(4), sampler=name,
                                        return_x0=True, wavefront=1e-6, **kw)
        np.testing.assert_allclose(np.asarray(wf_x0), np.asarray(base_x0), atol=2e-3)
        np.testing.assert_array_equal(np.asarray(wf_ids), np.asarray(base_ids))
    # a fitted (uneven) warp: levels computed in two fusions may differ by an ulp; no NaN from that
    model.noise_warp.w[...] = jax.random.normal(jax.random.key(5), model.noise_warp.w.shape) * 0.05
    for name in ("ddim", "ddpm"):
        ids, x0 = sampling.sample(model, task.schedule, tokens, known2, jax.random.key(4), wavefront=3.0,
                                  sampler=name, return_x0=True, **kw)
        assert np.all(np.isfinite(np.asarray(x0)))
        np.testing.assert_array_equal(np.asarray(ids)[:, :3], np.asarray(tokens)[:, :3])  # the prompt is kept
    with pytest.raises(ValueError, match="position_levels"):
        sampling.sample(tiny_task(**{"model.position_levels": False, "diffusion.wavefront": 0.0}
                                  ).init_model(nnx.Rngs(0)), task.schedule, tokens, known2,
                        jax.random.key(4), wavefront=1.0, **kw)


def test_random_order_is_a_permutation_of_the_generated_positions():
    mask = jnp.zeros((4, 9), bool).at[:, :3].set(True).at[1, 8].set(True)
    r = np.asarray(wavefront.random_rank(jax.random.key(0), mask))
    for row, m in zip(r, np.asarray(mask)):
        n = int((~m).sum())
        np.testing.assert_allclose(np.sort(row[~m]), np.arange(n) / (n - 1), atol=1e-6)
        assert np.all(row[m] == 0)
    assert not np.array_equal(r[0], r[2])  # a permutation per row
    assert not np.allclose(r[0, 3:], np.arange(6) / 5)  # not left to right (for this key)
    np.testing.assert_array_equal(np.asarray(wavefront.order_rank("left_to_right", jax.random.key(0), mask)),
                                  np.asarray(wavefront.generation_rank(mask)))
    with pytest.raises(ValueError, match="order"):
        wavefront.order_rank("spiral", jax.random.key(0), mask)
    # trained and sampled in random order: levels along the span are no longer monotone
    task = tiny_task(**{"diffusion.wavefront_order": "random", "diffusion.wavefront_prob": 1.0})
    model = task.init_model(nnx.Rngs(0))
    lam = np.asarray(sample_wavefront_logsnr(model, jax.random.key(3), jnp.zeros((8, 24), bool),
                                             task.config.diffusion))
    assert np.any(np.diff(lam, axis=1) > 1.0)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    known = jnp.zeros((2, 12), bool).at[:, :2].set(True)
    ids = sampling.sample(model, task.schedule, tokens, known, jax.random.key(4), steps=5, grid="warp",
                          wavefront=3.0, wavefront_order="random")
    np.testing.assert_array_equal(np.asarray(ids)[:, :2], np.asarray(tokens)[:, :2])
    with pytest.raises(ValueError, match="wavefront_order"):
        tiny_task(**{"sample.wavefront_order": "spiral"})
