"""The training loss: masked terms against numpy, a tiny training run (the loss falls, the
embeddings keep their norm; without normalisation they would shrink), self-conditioning (the
device's coin and the host's)."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dimba_jax.models.dimba as dimba_module
from dimba_jax.config import default_config
from dimba_jax.diffusion.losses import (denoise_terms, diffusion_loss, host_self_cond_coin, masked_accuracy,
                                        masked_cross_entropy, masked_mse)
from dimba_jax.diffusion.schedule import add_noise_logsnr, cosine_schedule
from dimba_jax.tasks.dimba import DimbaTask
from dimba_jax.models.dimba import DimbaModel

V, BATCH, SEQ = 64, 8, 32


def tiny_config(paper: bool = True):
    """A tiny DIMBA config; paper=True: the paper's objective (direct x0 read-out, x0-MSE plus the
    rounding CE, uniform t, no output prior), else the default recipe."""
    c = default_config()
    with c.unlocked():
        c.model.update(d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=16, time_embed_dim=32,
                       ssd_impl="reference")
        c.diffusion.timesteps = 100
        c.data.seq_len = SEQ
        if paper:
            c.model.update(readout="direct", skip_logits=False)
            c.diffusion.update(mse_weight=1.0, noise_sampling="uniform")
            c.sample.grid = "uniform"
    return c


def test_masked_terms_match_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(3, 5))
    mask = rng.random((3, 5)) < 0.5
    sel = mask.astype(bool)
    assert float(masked_mse(pred, target, mask)) == pytest.approx(np.mean((pred - target)[sel] ** 2), rel=1e-5)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    assert float(masked_cross_entropy(logits, tokens, mask)) == pytest.approx(nll[sel].mean(), rel=1e-5)
    assert float(masked_accuracy(logits, tokens, mask)) == pytest.approx((logits.argmax(-1) == tokens)[sel].mean())
    assert float(masked_mse(pred, target, np.zeros((3, 5), bool))) == 0.0  # empty mask: no NaN


def _batch():
    # learnable structure: arithmetic progressions mod V with per-row start and stride
    start = np.arange(BATCH)[:, None] * 5
    stride = 1 + np.arange(BATCH)[:, None] % 3
    return jnp.asarray((start + stride * np.arange(SEQ)[None, :]) % V, jnp.int32)


def _evaluator(cfg, sch, tokens):
    """A fixed yardstick: the loss with the same draws every time (the batch tiled 2x)."""
    tiled = jnp.tile(tokens, (2, 1))
    return nnx.jit(lambda model: diffusion_loss(model, sch, tiled, jax.random.key(100), cfg.diffusion)[1])


def test_loss_falls_and_embeddings_keep_their_norm():
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.model.n_layers = 1
        cfg.model.self_condition = False  # (tested separately; halves the compile)
        cfg.model.ssd_impl = "xla"
        cfg.diffusion.ce_weight = 0.1
    sch = cosine_schedule(cfg.diffusion.timesteps)
    model = DimbaModel(cfg.model, V, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    tokens = _batch()

    @nnx.jit
    def step(model, opt, rng):
        (_, metrics), grads = nnx.value_and_grad(
            lambda m: diffusion_loss(m, sch, tokens, rng, cfg.diffusion), has_aux=True)(model)
        opt.update(model, grads)
        return metrics

    evaluate = _evaluator(cfg, sch, tokens)
    before = evaluate(model)
    raw_before = np.asarray(model.embedding[...]).copy()
    for i in range(30):
        step(model, opt, jax.random.key(i))
    after = evaluate(model)
    raw_after = np.asarray(model.embedding[...])
    fixed = float(np.sqrt(32))
    assert float(after["loss"]) < 0.8 * float(before["loss"]), (before, after)
    assert float(after["mse"]) < 0.9 * float(before["mse"]), (before, after)
    # the embeddings were trained ...
    assert np.abs(raw_after - raw_before).max() > 1e-2
    # ... yet the ones the loss sees keep their fixed norm while the MSE drops ...
    assert float(after["embed_norm"]) == pytest.approx(fixed, rel=1e-4)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(model.embedding_table()), axis=-1), fixed, rtol=1e-4)
    assert np.linalg.norm(raw_after, axis=-1).mean() > 0.9 * np.linalg.norm(raw_before, axis=-1).mean()
    # ... and stay spread out (not all rows pointing one way)
    assert float(after["embed_mean_dir"]) < 0.5
    assert set(after) >= {"loss", "mse", "ce", "acc", "embed_norm", "embed_mean_dir", "known_frac"}
    assert float(after["loss"]) == pytest.approx(float(after["mse"]) + 0.1 * float(after["ce"]), rel=1e-5)
    # ... and the loss cannot gain by shrinking them: it is invariant to the raw scale
    model.embedding[...] = model.embedding[...] * 0.5
    np.testing.assert_allclose(float(evaluate(model)["loss"]), float(after["loss"]), rtol=1e-4)


def test_without_normalisation_the_mse_rewards_shrinking(monkeypatch):
    """The control that shows why rows are normalised: with raw embeddings (normalisation patched
    out), scaling the table down lowers the x0 MSE, so training would collapse it."""
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.model.n_layers = 1
        cfg.model.self_condition = False
    sch = cosine_schedule(cfg.diffusion.timesteps)
    monkeypatch.setattr(dimba_module, "normalize_rows", lambda table, scale: table.astype(jnp.float32))
    model = DimbaModel(cfg.model, V, rngs=nnx.Rngs(0))
    evaluate = _evaluator(cfg, sch, _batch())
    full = float(evaluate(model)["mse"])
    model.embedding[...] = model.embedding[...] * 0.5
    shrunk = float(evaluate(model)["mse"])
    assert shrunk < 0.7 * full, (full, shrunk)


def test_self_conditioning_pass():
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.model.n_layers = 1
    sch = cosine_schedule(cfg.diffusion.timesteps)
    model = DimbaModel(cfg.model, V, rngs=nnx.Rngs(1))
    # make the self-conditioning input matter
    model.in_proj.kernel[...] = model.in_proj.kernel[...] * 3.0
    tokens = _batch()
    lam = jnp.full((BATCH,), float(sch.logsnr_table()[30]), jnp.float32)
    mask = jnp.zeros(tokens.shape, bool)
    noise = jax.random.normal(jax.random.key(0), (BATCH, SEQ, 32))
    drop = jnp.zeros((BATCH,), bool)

    run = nnx.jit(lambda model, coin: denoise_terms(model, tokens, lam, mask, drop, noise, coin, 1.0, 1.0)["x0_hat"])
    on = run(model, jnp.array(True))
    off = run(model, jnp.array(False))
    assert np.abs(np.asarray(on - off)).max() > 1e-4  # the coin selects the self-conditioning pass
    # the host's coin (a Python bool: the pass traced in or out) gives the same values
    for coin, want in ((True, on), (False, off)):
        static = nnx.jit(lambda model, c=coin: denoise_terms(model, tokens, lam, mask, drop, noise, c, 1.0,
                                                             1.0)["x0_hat"])(model)
        np.testing.assert_allclose(np.asarray(static), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch, seq_len"):
        diffusion_loss(model, sch, tokens[0], jax.random.key(0), cfg.diffusion)


def test_self_conditioning_pass_takes_no_tangent_and_keeps_the_gradients():
    """The self-conditioning pass runs with its parameters and inputs under stop_gradient: the
    gradients equal those of a loss that stops the gradient at the pass's output alone, and in
    the gradient's program the pass's custom-VJP GEMMs (the bf16 head) run as primal calls, not
    as forward rules keeping residuals."""
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.model.update(n_layers=1, head_dtype="bfloat16")
    sch = cosine_schedule(cfg.diffusion.timesteps)
    graphdef, params = nnx.split(DimbaModel(cfg.model, V, rngs=nnx.Rngs(2)))
    tokens = _batch()
    lam = jnp.full((BATCH,), float(sch.logsnr_table()[30]), jnp.float32)
    mask = jnp.zeros(tokens.shape, bool)
    noise = jax.random.normal(jax.random.key(3), (BATCH, SEQ, 32))
    drop = jnp.zeros((BATCH,), bool)

    def loss(params):
        model = nnx.merge(graphdef, params)
        return denoise_terms(model, tokens, lam, mask, drop, noise, True, 1.0, 1.0)["loss"]

    def loss_output_stopped(params):
        model = nnx.merge(graphdef, params)
        x_t = add_noise_logsnr(model.embed(tokens), lam, noise)
        sc = jax.lax.stop_gradient(model(x_t, lam, tokens, mask, drop_prompt=drop))
        x0_hat, logits = model.predict(x_t, lam, tokens, mask, self_cond=sc, drop_prompt=drop)
        mse = masked_mse(x0_hat, model.embed(tokens), ~mask)
        return mse + masked_cross_entropy(logits, tokens, ~mask)

    got, want = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(loss_output_stopped))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
    primal = lambda f: str(jax.make_jaxpr(jax.grad(f))(params)).count("custom_vjp_call")  # noqa: E731
    assert primal(loss) > primal(loss_output_stopped)


def test_task_loss_eval_and_flops():
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.model.n_layers = 1
        cfg.model.self_condition = False
    task = DimbaTask(cfg)
    model = task.init_model(nnx.Rngs(0))
    tokens = _batch()
    with pytest.raises(ValueError, match="tokens"):
        task.loss(model, {"ids": tokens}, jax.random.key(0))
    out = task.eval_metrics(model, {"tokens": tokens}, ts=(5, 95))
    assert set(out) == {"loss", "mse", "ce", "acc"} | {f"{k}_t{t}" for k in ("loss", "mse", "ce", "acc") for t in (5, 95)}
    levels = task.eval_metrics(model, {"tokens": tokens}, logsnrs=(-8.0, 2.0))
    assert {"acc_lam-8", "ce_lam2"} <= set(levels)
    assert out["mse_t5"] < out["mse_t95"]  # less noise, easier x0
    with pytest.raises(ValueError, match="outside"):
        task.eval_metrics(model, {"tokens": tokens}, ts=(0,))
    f_bi = task.flops_per_token(SEQ)
    with cfg.unlocked():
        cfg.model.embed_dim = cfg.model.d_model // 4
    narrow = DimbaTask(cfg)
    assert narrow.flops_per_token(SEQ) < f_bi  # a narrower diffusion space: smaller head and stem
    narrow_model = narrow.init_model(nnx.Rngs(0))
    loss, metrics = narrow.loss(narrow_model, {"tokens": tokens}, jax.random.key(1))
    assert np.isfinite(float(loss)) and narrow_model.embedding_table().shape[1] == cfg.model.d_model // 4
    with cfg.unlocked():
        cfg.model.embed_dim = 0
        cfg.model.posterior_input = True
    post = DimbaTask(cfg)
    e, d, v = cfg.model.d_model, cfg.model.d_model, post.tokenizer.vocab_size
    # softmax @ E and x_t @ E^T (the prior on its own: with a tied head and no posterior input
    # it is folded into the head's GEMM), and the stem's e more input rows
    extra = 2.0 * e * v * (1 + (not cfg.model.skip_logits or cfg.model.tie_embeddings)) + 2.0 * e * d
    passes = 3 + (cfg.diffusion.self_cond_prob if cfg.model.self_condition else 0.0)
    assert post.flops_per_token(SEQ) == pytest.approx(f_bi + extra * passes)
    with cfg.unlocked():
        cfg.model.posterior_input = False
        cfg.model.bidirectional = False
    assert DimbaTask(cfg).flops_per_token(SEQ) < f_bi


def test_host_self_cond_coin_compiles_the_step_without_a_conditional():
    """diffusion.self_cond_coin "host": the coin is a function of (seed, step) with the
    configured frequency; the task's step options carry it, and the train step compiled for
    either value has no conditional, where the device coin's step has one (its lax.cond)."""
    from benchmarks import train_throughput

    coins = [host_self_cond_coin(0, step, 0.5) for step in range(2000)]
    assert coins == [host_self_cond_coin(0, step, 0.5) for step in range(2000)]
    assert coins != [host_self_cond_coin(1, step, 0.5) for step in range(2000)]
    assert abs(np.mean(coins) - 0.5) < 0.05 and np.mean(
        [host_self_cond_coin(0, s, 0.2) for s in range(2000)]) < 0.25
    args = argparse.Namespace(config="configs/tiny.py", per_device_batch=2, seq_len=32, devices=1)
    s = train_throughput.build_setup(args, [("diffusion.self_cond_coin", "host")])
    assert s.task.step_option_sets() == [(("self_cond", False),), (("self_cond", True),)]
    assert s.task.step_options(1) == (("self_cond", host_self_cond_coin(s.config.seed, 1, 0.5)),)
    for options, conditional in ((("self_cond", True),), False), ((("self_cond", False),), False), ((), True):
        text = s.train_step.lower(s.state, s.rest, s.batch, options).as_text()
        assert ("stablehlo.case" in text or "stablehlo.if" in text) == conditional, options
    cfg = tiny_config()
    assert cfg.diffusion.self_cond_coin == "host" and DimbaTask(cfg).step_options(3) != ()
    with cfg.unlocked():
        cfg.diffusion.self_cond_coin = "device"
    assert DimbaTask(cfg).step_options(3) == () and DimbaTask(cfg).step_option_sets() == [()]
    with cfg.unlocked():
        cfg.diffusion.update(self_cond_coin="host", self_cond_prob=1.0)
    always = DimbaTask(cfg)  # every step with the pass, and no conditional: the coin's cost alone
    assert always.step_option_sets() == [(("self_cond", True),)]
    assert {always.step_options(s) for s in range(50)} == {(("self_cond", True),)}
    with cfg.unlocked():
        cfg.diffusion.self_cond_coin = "gpu"
    with pytest.raises(ValueError, match="self_cond_coin must be one of"):
        DimbaTask(cfg)
