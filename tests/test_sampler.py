"""Samplers: posterior algebra, a Python-loop reference, determinism, CFG, respacing, one trace."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.config import default_config
from dimba_jax.diffusion import sampler as sampling
from dimba_jax.diffusion.schedule import cosine_schedule
from dimba_jax.tasks.dimba import DimbaTask
from dimba_jax.models.dimba import DimbaModel

T_SMALL = 20
B, L, V = 2, 16, 40


def tiny_config():
    c = default_config()
    with c.unlocked():
        # float32 head: the paths compared below differ in how XLA rounds bf16, not in their math
        c.model.update(d_model=32, n_layers=1, d_state=16, headdim=16, chunk_size=16, time_embed_dim=32,
                       ssd_impl="reference", head_dtype="float32")
        # without the output prior, so that the random network's own (prompt-dependent) logits are
        # not drowned by the prior at the clean end of the schedule
        c.model.skip_logits = False
        c.diffusion.timesteps = T_SMALL
        c.data.seq_len = 32
    return c


@pytest.fixture(scope="module")
def setup():
    c = tiny_config()
    model = DimbaModel(c.model, V, rngs=nnx.Rngs(0))
    # make the (fresh, zero-initialised) conditioning matter so the prompt visibly changes outputs
    model.logit_scale[...] = jnp.asarray(1.5)
    for i, block in enumerate(model.blocks):  # FiLM matters too (the samplers' modulation table)
        block.cond.proj.kernel[...] = 0.1 * jax.random.normal(jax.random.key(10 + i),
                                                              block.cond.proj.kernel.shape)
    sch = cosine_schedule(T_SMALL)
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V, dtype=jnp.int32)
    mask = jnp.broadcast_to(jnp.arange(L) < 5, (B, L))
    return model, sch, tokens, mask


# ---------------------------------------------------------------- posterior algebra
def _gauss_posterior(x_t, x0, a_t, a_p):
    """q(x_prev | x_t, x0) by conditioning the joint Gaussian (float64, independent derivation)."""
    cov = math.sqrt(a_t / a_p) * (1 - a_p)
    mean = math.sqrt(a_p) * x0 + cov / (1 - a_t) * (x_t - math.sqrt(a_t) * x0)
    var = (1 - a_p) - cov ** 2 / (1 - a_t)
    return mean, math.sqrt(max(var, 0.0))


def test_ddpm_posterior_matches_gaussian_conditioning():
    sch = cosine_schedule(1000)
    rng = np.random.default_rng(0)
    x_t, x0 = rng.normal(size=(2, 8))
    for t, t_prev in [(1000, 999), (500, 499), (2, 1), (1, 0), (700, 300)]:
        a_t = float(sch.alpha_bar[t])
        a_p = 1.0 if t_prev == 0 else float(sch.alpha_bar[t_prev])
        mean, std = sampling.ddpm_posterior(jnp.asarray(x_t, jnp.float32), jnp.asarray(x0, jnp.float32), a_t, a_p)
        want_mean, want_std = _gauss_posterior(x_t, x0, a_t, a_p)
        np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=2e-4, atol=2e-5)
        assert float(std) == pytest.approx(want_std, rel=2e-3, abs=1e-6)


def test_ddim_eta1_makes_the_ddpm_update_over_all_T_steps():
    sch = cosine_schedule(1000)
    ts, ab_t, ab_prev = sampling.respaced_alphas(sch, 1000)  # every step T..1
    np.testing.assert_array_equal(ts, np.arange(1000, 0, -1))
    k1, k2 = jax.random.split(jax.random.key(0))
    x_t = jax.random.normal(k1, (1000, 6))
    x0 = jax.random.normal(k2, (1000, 6))
    a_t, a_p = jnp.asarray(ab_t)[:, None], jnp.asarray(ab_prev)[:, None]
    m_ddpm, s_ddpm = sampling.ddpm_posterior(x_t, x0, a_t, a_p)
    m_ddim, s_ddim = sampling.ddim_posterior(x_t, x0, a_t, a_p, 1.0)
    np.testing.assert_allclose(np.asarray(m_ddim), np.asarray(m_ddpm), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s_ddim), np.asarray(s_ddpm), rtol=1e-3, atol=1e-6)
    assert float(s_ddpm[-1, 0]) == 0.0 and np.all(np.asarray(s_ddpm[:-1]) > 0)  # last step returns x0


def test_ddim_eta0_is_deterministic_and_exact_for_consistent_inputs():
    sch = cosine_schedule(1000)
    rng = np.random.default_rng(1)
    x0, eps = rng.normal(size=(2, 8)).astype(np.float32)
    a_t, a_p = float(sch.alpha_bar[600]), float(sch.alpha_bar[350])
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    mean, std = sampling.ddim_posterior(jnp.asarray(x_t), jnp.asarray(x0), a_t, a_p, 0.0)
    assert float(std) == 0.0
    np.testing.assert_allclose(np.asarray(mean), math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps, atol=1e-5)


# ---------------------------------------------------------------- a Python-loop reference sampler
_ref_call = nnx.jit(lambda m, x, lam, tok, mask, sc, drop: m.predict(x, lam, tok, mask, self_cond=sc,
                                                                    drop_prompt=drop))


def reference_sample(model, sch, tokens, mask, rng, *, steps, sampler, eta, guidance, clamp, self_condition,
                     score_temperature=1.0, score_temperature_final=0.0, score_min_p=0.0, draw_x0=False):
    """Step by step in Python with its own respacing and its own posterior formulas; the model is
    told each step's log-SNR; the read-out is the argmax of the last step's guided logits. The
    score temperature of step i is tau_0 + (tau_end - tau_0) i / (steps - 1); with score_min_p, the
    re-weighting renormalises the probabilities at least score_min_p times their position's largest;
    with draw_x0 the step moves toward the embedding of a token drawn from those probabilities."""
    end = score_temperature_final or score_temperature
    taus = [score_temperature + (end - score_temperature) * i / max(steps - 1, 1) for i in range(steps)]
    big_t = sch.timesteps
    lam = lambda t: float(np.log(sch.alpha_bar[t].astype(np.float64)) - np.log1p(-sch.alpha_bar[t].astype(np.float64)))
    ts = [int(round(big_t - i * (big_t - 1) / (steps - 1))) for i in range(steps)] if steps > 1 else [big_t]
    ab = lambda t: 1.0 if t == 0 else float(sch.alpha_bar[t])
    r_init, key, _ = jax.random.split(rng, 3)
    b = tokens.shape[0]
    clean = model.embed(tokens)
    known = mask[..., None]
    x = jnp.where(known, clean, jax.random.normal(r_init, clean.shape))
    x0_prev = jnp.zeros_like(x)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else 0
        tb = jnp.full((b,), lam(t), jnp.float32)
        sc = x0_prev if self_condition else None
        cond, cond_logits = _ref_call(model, x, tb, tokens, mask, sc, jnp.zeros((b,), bool))
        uncond, uncond_logits = _ref_call(model, x, tb, tokens, mask, sc, jnp.ones((b,), bool))
        x0 = uncond + guidance * (cond - uncond)
        logits = uncond_logits + guidance * (cond_logits - uncond_logits)
        if taus[i] != 1.0 or score_min_p:
            p = np.asarray(jax.nn.softmax(logits / taus[i], -1), np.float64)
            if score_min_p:
                p = np.where(p >= score_min_p * p.max(-1, keepdims=True), p, 0.0)
                p = p / p.sum(-1, keepdims=True)
            x0 = jnp.asarray(p, jnp.float32) @ model.embedding_table()
        if clamp:
            x0 = jax.nn.softmax(model.logits(x0), -1) @ model.embedding_table()
        x0 = jnp.where(known, clean, x0)
        a_t, a_p = ab(t), ab(t_prev)
        key, sub = jax.random.split(key)
        target = x0
        if draw_x0:
            p = np.asarray(jax.nn.softmax(logits / taus[i], -1), np.float64)
            if score_min_p:
                p = np.where(p >= score_min_p * p.max(-1, keepdims=True), p, 0.0)
            with np.errstate(divide="ignore"):
                log_p = jnp.asarray(np.log(p / p.sum(-1, keepdims=True)), jnp.float32)
            drawn = jax.random.categorical(jax.random.fold_in(sub, 1), log_p, axis=-1)
            target = jnp.where(known, clean, model.embed(drawn))
        if sampler == "ddpm":
            mean, std = _gauss_posterior(x, target, a_t, a_p)
        else:
            eps = (x - math.sqrt(a_t) * target) / math.sqrt(1 - a_t)
            std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
            mean = math.sqrt(a_p) * target + math.sqrt(max(1 - a_p - std ** 2, 0.0)) * eps
        x = jnp.where(known, clean, mean + std * jax.random.normal(sub, x.shape))
        x0_prev = x0
    ids = jnp.where(mask, tokens, jnp.argmax(logits, -1))
    return ids, x0


@pytest.mark.parametrize("steps,kw", [
    (4, dict(sampler="ddim", eta=0.0, guidance=1.0, clamp=True, self_condition=True)),
    (4, dict(sampler="ddpm", eta=0.0, guidance=0.0, clamp=False, self_condition=True)),
    (7, dict(sampler="ddim", eta=0.5, guidance=2.0, clamp=True, self_condition=False)),
    (5, dict(sampler="ddim", eta=0.0, guidance=1.0, clamp=False, self_condition=True,
             score_temperature=0.4, score_temperature_final=1.2)),
    (5, dict(sampler="ddpm", eta=0.0, guidance=1.0, clamp=False, self_condition=True, score_temperature=0.6)),
    (4, dict(sampler="ddim", eta=0.0, guidance=1.0, clamp=False, self_condition=True, score_min_p=0.3)),
    (4, dict(sampler="ddim", eta=0.0, guidance=1.0, clamp=False, self_condition=True, score_temperature=0.7,
             score_min_p=0.9)),
    (4, dict(sampler="ddpm", eta=0.0, guidance=1.0, clamp=False, self_condition=True, score_temperature=0.8,
             draw_x0=True)),
    (4, dict(sampler="ddim", eta=0.0, guidance=2.0, clamp=False, self_condition=True, score_min_p=0.3,
             draw_x0=True)),
])
def test_scan_sampler_matches_python_loop(setup, monkeypatch, steps, kw):
    """Respaced (steps < T) reverse processes equal a step-by-step reference, and the whole
    process is one compiled scan: the model is traced exactly once (CFG batches both branches)."""
    model, sch, tokens, mask = setup
    rng = jax.random.key(7)
    calls = []
    original = DimbaModel.predict
    monkeypatch.setattr(DimbaModel, "predict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ids, x0 = sampling.sample(model, sch, tokens, mask, rng, steps=steps, return_x0=True, **kw)
    assert len(calls) == 1, f"model traced {len(calls)} times for {steps} steps"
    monkeypatch.undo()
    ref_ids, ref_x0 = reference_sample(model, sch, tokens, mask, rng, steps=steps, **kw)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(ref_x0), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))


def test_a_sweep_of_score_temperatures_and_prior_weights_compiles_once(setup, monkeypatch):
    """Score temperatures, their schedules and prior weights are traced values: a sampler sweep over
    them at one step count traces the model once, and each setting still gives its own samples."""
    model, sch, tokens, mask = setup
    calls = []
    original = DimbaModel.predict
    monkeypatch.setattr(DimbaModel, "predict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    sweep = [dict(score_temperature=0.5), dict(score_temperature=0.8), dict(score_temperature=1.0,
             score_temperature_final=0.5), dict(score_temperature=0.8, prior_weight=0.6),
             dict(score_temperature=0.9, prior_weight=0.8, prior_weight_final=0.2)]
    x0s = [sampling.sample(model, sch, tokens, mask, jax.random.key(3), steps=5, sampler="ddim", clamp=False,
                           return_x0=True, **kw)[1] for kw in sweep]
    assert len(calls) <= 1, f"model traced {len(calls)} times for {len(sweep)} settings"  # 0: compiled earlier
    assert not np.allclose(np.asarray(x0s[0]), np.asarray(x0s[1]), atol=1e-4)


def test_deterministic_given_seed_and_keeps_prompt(setup):
    model, sch, tokens, mask = setup
    kw = dict(steps=4, sampler="ddim", eta=0.0, guidance=1.0, clamp=True, self_condition=True, return_x0=True)
    a_ids, a_x0 = sampling.sample(model, sch, tokens, mask, jax.random.key(3), **kw)
    b_ids, b_x0 = sampling.sample(model, sch, tokens, mask, jax.random.key(3), **kw)
    _, c_x0 = sampling.sample(model, sch, tokens, mask, jax.random.key(4), **kw)
    np.testing.assert_array_equal(np.asarray(a_ids), np.asarray(b_ids))
    np.testing.assert_array_equal(np.asarray(a_x0), np.asarray(b_x0))
    fn = sampling.make_sample_fn(model, sch, steps=4, sampler="ddim", eta=0.0, guidance=1.0, clamp=True,
                                 self_condition=True)
    f_ids, f_x0 = fn(tokens, mask, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(f_ids), np.asarray(a_ids))
    np.testing.assert_array_equal(np.asarray(f_x0), np.asarray(a_x0))
    assert not np.allclose(np.asarray(a_x0)[:, 5:], np.asarray(c_x0)[:, 5:])
    np.testing.assert_array_equal(np.asarray(a_ids)[:, :5], np.asarray(tokens)[:, :5])
    np.testing.assert_allclose(np.asarray(a_x0)[:, :5], np.asarray(model.embed(tokens))[:, :5], atol=1e-5)


def test_guidance_zero_is_unconditional(setup):
    """w = 0 must ignore what the prompt says (same layout, prompt content hidden); w = 1 must not."""
    model, sch, tokens, mask = setup
    other = tokens.at[:, :5].set((tokens[:, :5] + 7) % V)
    kw = dict(steps=4, sampler="ddpm", clamp=False, self_condition=True, return_x0=True)
    _, x0_a = sampling.sample(model, sch, tokens, mask, jax.random.key(5), guidance=0.0, **kw)
    _, x0_b = sampling.sample(model, sch, other, mask, jax.random.key(5), guidance=0.0, **kw)
    np.testing.assert_allclose(np.asarray(x0_a)[:, 5:], np.asarray(x0_b)[:, 5:], atol=1e-6)
    kw.update(sampler="ddim", eta=0.0, clamp=True)  # (the settings compiled above, at w = 1)
    _, x0_c = sampling.sample(model, sch, tokens, mask, jax.random.key(5), guidance=1.0, **kw)
    _, x0_d = sampling.sample(model, sch, other, mask, jax.random.key(5), guidance=1.0, **kw)
    assert np.abs(np.asarray(x0_c)[:, 5:] - np.asarray(x0_d)[:, 5:]).max() > 1e-3


def test_respaced_timesteps_are_strided():
    ts, ab_t, ab_prev = sampling.respaced_alphas(cosine_schedule(T_SMALL), 5)
    np.testing.assert_array_equal(ts, [20, 15, 10, 6, 1])  # round(linspace(20, 1, 5))
    np.testing.assert_allclose(ab_prev[:-1], ab_t[1:])
    assert ab_prev[-1] == 1.0


def test_bad_arguments(setup):
    model, sch, tokens, mask = setup
    for steps in (0, -1, T_SMALL + 1):
        with pytest.raises(ValueError, match="steps"):
            sampling.sample(model, sch, tokens, mask, jax.random.key(0), steps=steps)
    with pytest.raises(ValueError, match="sampler"):
        sampling.sample(model, sch, tokens, mask, jax.random.key(0), steps=2, sampler="euler")
    with pytest.raises(ValueError, match="cond_mask"):
        sampling.sample(model, sch, tokens, mask[:, :3], jax.random.key(0), steps=2)


def test_gemm_knob_compiles_the_program_with_its_options(setup):
    """sample.gemm: "cublas" sets XLA's Triton GEMM emitter off on the sampling program alone
    (one more jitted function, the default one untouched), "xla" keeps XLA's defaults, "auto" is
    "cublas" on a GPU only; off GPU every value gives the same samples (on a GPU the float32
    test model's GEMMs round differently in the two libraries: x0 differs there, which
    benchmarks/results/gpu_tests_gemm_h100.log shows); an unknown value raises a one-line error
    naming the knob."""
    model, sch, tokens, mask = setup
    assert sampling.program_options("cublas") == {"xla_gpu_enable_triton_gemm": False}
    assert sampling.program_options("xla") == {}
    assert sampling.program_options("auto") == (
        {"xla_gpu_enable_triton_gemm": False} if jax.default_backend() == "gpu" else {})
    assert sampling.sample_program("xla") is sampling._sample_jit
    cublas = sampling.sample_program("cublas")
    assert cublas is not sampling._sample_jit and cublas is sampling.sample_program("cublas")
    kw = dict(steps=3, sampler="ddim", clamp=True, return_x0=True)
    a_ids, a_x0 = sampling.sample(model, sch, tokens, mask, jax.random.key(5), gemm="xla", **kw)
    b_ids, b_x0 = sampling.sample(model, sch, tokens, mask, jax.random.key(5), gemm="cublas", **kw)
    assert a_ids.shape == b_ids.shape and a_x0.shape == b_x0.shape
    if jax.default_backend() != "gpu":  # on a GPU the two GEMM libraries round differently
        np.testing.assert_array_equal(np.asarray(a_ids), np.asarray(b_ids))
        np.testing.assert_allclose(np.asarray(a_x0), np.asarray(b_x0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sample.gemm must be one of"):
        sampling.make_sample_fn(model, sch, steps=2, gemm="triton")


def test_cut_at_eos():
    assert sampling.cut_at_eos([5, 6, 9, 7, 9], 9) == [5, 6]
    assert sampling.cut_at_eos(np.array([1, 2, 3]), 9) == [1, 2, 3]
    assert sampling.cut_at_eos([9, 1], 9) == []


def test_task_generate_and_infill():
    c = tiny_config()
    with c.unlocked():
        c.sample.steps = 3
    task = DimbaTask(c)  # byte tokenizer
    model = task.init_model(nnx.Rngs(1))
    outs = task.generate(model, ["Hello", "A longer prompt"], length=6, seed=0)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert all(len(o.encode("utf-8", "replace")) <= 6 * 3 for o in outs)
    assert outs == task.generate(model, ["Hello", "A longer prompt"], length=6, seed=0)
    with pytest.raises(ValueError, match=r"40 tokens.*32"):
        task.generate(model, ["x" * 40], length=4)
    with pytest.raises(ValueError, match="steps"):
        task.generate(model, ["Hi"], length=4, steps=0)
    with pytest.raises(ValueError, match="mask token"):
        task.infill(model, "no gaps here")
    filled = task.infill(model, "ab[MASK]cd", span_length=3, steps=3)
    assert filled.startswith("ab") and filled.endswith("cd")


def test_sampler_options_are_the_configs_sample_settings_for_the_task_and_the_harness():
    from dimba_jax.evaluate.generators import DimbaGenerator

    c = tiny_config()
    with c.unlocked():
        c.sample.update(prior_weight=0.7, prior_weight_final=0.3, score_temperature=0.6, steps=7,
                        wavefront_order="random", clamp=True)
    opts = sampling.sampler_options(c.sample)
    assert opts["prior_weight"] == 0.7 and opts["prior_weight_final"] == 0.3 and opts["steps"] == 7
    assert opts["wavefront_order"] == "random" and opts["clamp"] is True
    assert opts["gemm"] == "auto" and opts["unroll"] == 1
    # every option is a keyword of the sampler's builder
    import inspect
    assert set(opts) <= set(inspect.signature(sampling.sampler_parts).parameters)
    task = DimbaTask.__new__(DimbaTask)
    task.config = c
    kw = task._sampler_kwargs(steps=3, clamp=False)
    assert kw == dict(opts, steps=3, clamp=False)
    model = DimbaModel(c.model, V, rngs=nnx.Rngs(0))
    gen = DimbaGenerator(model, c, tokenizer=None)
    assert {k: v for k, v in gen.defaults.items() if k != "self_condition"} == {
        k: v for k, v in opts.items() if k not in ("steps", "sampler")}


def test_generator_keys_are_jaxs_and_its_host_arguments_give_the_programs_tokens():
    """`prng_key` equals jax.random.PRNGKey at every seed (host-built in [0, 2**32)); the
    generator, passing numpy tokens, mask and key to the program, returns what the program
    returns for device arrays and jax's key, prompted (the prompt sliced off) and not."""
    from dimba_jax.diffusion.schedule import schedule_from_config
    from dimba_jax.evaluate.generators import DimbaGenerator, prng_key
    from dimba_jax.evaluate.harness import RunSpec

    for seed in (0, 1, 12345, 2 ** 31, 2 ** 32 - 1, 2 ** 32, -1):
        np.testing.assert_array_equal(np.asarray(prng_key(seed)), np.asarray(jax.random.PRNGKey(seed)))
    assert isinstance(prng_key(3), np.ndarray)
    c = tiny_config()
    with c.unlocked():
        c.sample.grid = "uniform"  # the tiny model has no noise warp
    model = DimbaModel(c.model, V, rngs=nnx.Rngs(0))
    gen = DimbaGenerator(model, c, tokenizer=None)
    prompt = np.array([[5, 6, 7]], np.int32)
    for prompts, p_len in ((None, 0), (prompt, 3)):
        spec = RunSpec("dimba", "ddim", 2, 8, prompts is not None)
        ids = gen.generate(spec, prompts, 1, 4)
        tokens, known = np.zeros((1, p_len + 8), np.int32), np.zeros((1, p_len + 8), bool)
        tokens[:, :p_len], known[:, :p_len] = prompt[:, :p_len], True
        fn = sampling.make_sample_fn(model, schedule_from_config(c.diffusion), steps=2, sampler="ddim",
                                     **gen.options(spec))
        want, _ = fn(jnp.asarray(tokens), jnp.asarray(known), jax.random.PRNGKey(4))
        assert ids.shape == (1, 8)
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(want)[:, p_len:])


def test_score_min_p_is_checked_and_named_by_variants(setup):
    from dimba_jax.evaluate.harness import variant_options

    model, sch, tokens, mask = setup
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="score_min_p"):
            sampling.make_sample_fn(model, sch, steps=2, score_min_p=bad)
    assert variant_options("mp0.05+st0.8") == {"score_min_p": 0.05, "score_temperature": 0.8}
    assert variant_options("temp0.5") == {"temperature": 0.5}


def test_step_modulations_are_each_steps_block_modulations(setup):
    """The sampler's table of every step's block modulations (one GEMM per block for all steps)
    equals the per-step `block_modulations(block_conditioning(lam, pooled))`; a table over
    MAX_STEP_MODULATION_BYTES is not built (None: each step computes its own)."""
    model, _, tokens, mask = setup
    ctx = model.prompt_context(tokens, mask)
    lams = jnp.array([4.0, 0.5, -3.0])
    table = sampling.step_modulations(model, lams, ctx.pooled)
    assert table.shape == (3, len(model.blocks), B, 2, model.d_model)
    assert float(jnp.abs(table).max()) > 0.0  # the fixture's FiLM is not zero
    for i, lam in enumerate(lams):
        want = model.block_modulations(model.block_conditioning(jnp.full((B,), lam), ctx.pooled))
        np.testing.assert_allclose(np.asarray(table[i]), np.asarray(want), rtol=1e-5, atol=1e-6)
    too_many = sampling.MAX_STEP_MODULATION_BYTES // (B * 2 * model.d_model * 4) + 1
    assert sampling.step_modulations(model, jnp.zeros((too_many,)), ctx.pooled) is None


def test_mixer_constants_passed_in_give_the_same_prediction(setup):
    """`predict` with `mixer_constants()` computed beforehand (the sampler's loop invariant)
    equals `predict` computing each block's own; the constants are both directions' float32
    (A, D, dt_bias) with A = -exp(A_log) and D each head's skip repeated over its channels."""
    model, _, tokens, mask = setup
    consts = model.mixer_constants()
    assert len(consts) == len(model.blocks)
    mixer = model.blocks[0].mixer
    a, d, bias = consts[0]
    np.testing.assert_allclose(
        np.asarray(a), -np.exp(np.concatenate([np.asarray(mixer.fwd.A_log[...]),
                                               np.asarray(mixer.bwd.A_log[...])])), rtol=1e-6)
    assert bias.shape == (2 * mixer.fwd.nheads,)
    assert d.shape == (2 * mixer.fwd.nheads, mixer.fwd.headdim)  # repeated over the channels
    np.testing.assert_array_equal(
        np.asarray(d[:, 0]), np.concatenate([np.asarray(mixer.fwd.D[...]),
                                             np.asarray(mixer.bwd.D[...])]).astype(np.float32))
    assert float(jnp.abs(d - d[:, :1]).max()) == 0.0
    x_t = jax.random.normal(jax.random.key(3), (B, L, model.embed_dim))
    lam = jnp.full((B,), 1.5)
    want = model.predict(x_t, lam, tokens, mask)
    got = model.predict(x_t, lam, tokens, mask, mixer_constants=consts)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_make_sample_fn_hashes_no_graphdef_per_call(setup, monkeypatch):
    """make_sample_fn's calls run `bound_program` (graph, state layout and settings bound):
    after it is built, a call hashes no GraphDef (a whole-module-tree walk that jit does for a
    static argument at every call) and passes the small state arrays packed, two builds share
    one jitted program, and the samples are those of the unbound `sample_program` with the
    graph as a static argument (packed or not)."""
    model, sch, tokens, mask = setup
    kw = dict(steps=3, sampler="ddim", eta=0.0, guidance=1.0, clamp=False, self_condition=True)
    fn = sampling.make_sample_fn(model, sch, **kw)
    ids, x0 = fn(tokens, mask, jax.random.key(2))
    graphdef, state = nnx.split(model)
    hashes = []
    original = type(graphdef).__hash__
    monkeypatch.setattr(type(graphdef), "__hash__", lambda self: hashes.append(1) or original(self))
    for seed in (2, 5):
        again_ids, again_x0 = fn(tokens, mask, jax.random.key(seed))
    assert hashes == [], f"{len(hashes)} GraphDef hashes in two calls"
    monkeypatch.undo()
    static = dict(sampler="ddim", guidance=1.0, clamp=False, self_condition=True, temperature=0.0,
                  unroll=1, reweight=False, wavefront=0.0, wavefront_order="left_to_right",
                  score_min_p=0.0, draw_x0=False)
    run, params = sampling.bound_program(graphdef, state, "auto", **static)
    assert run is sampling.bound_program(graphdef, state, "auto", **static)[0]
    n_arrays = len(jax.tree.leaves(state))
    assert len(jax.tree.leaves(params)) < n_arrays // 2  # the small arrays travel packed
    unpacked, all_big = sampling.bound_program(graphdef, state, "auto", pack_max=-1, **static)
    assert unpacked is not run and len(all_big[0]) == n_arrays and all_big[1] == ()
    ts, ab_t, ab_prev = sampling.noise_grid(model, sch, 3, "uniform")
    ones = jnp.ones((3,), jnp.float32)
    want_ids, want_x0 = sampling.sample_program("auto")(
        graphdef, state, tokens, mask, jax.random.key(2), ts, ab_t, ab_prev, jnp.float32(0.0),
        ones, ones, **static)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(want_x0))
    u_ids, u_x0 = unpacked(all_big, tokens, mask, jax.random.key(2), ts, ab_t, ab_prev,
                           jnp.float32(0.0), ones, ones)
    np.testing.assert_array_equal(np.asarray(u_ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(u_x0), np.asarray(want_x0))
    assert not np.array_equal(np.asarray(again_x0), np.asarray(x0))  # seed 5 differs


def test_ddim_at_eta_zero_draws_no_noise(setup):
    """DDIM at eta 0 (std 0) runs its steps without the Gaussian draw (`noise` False, which
    `sampler_parts` sets): the same ids and x0 bits as the program that draws and multiplies
    by zero, and one random-normal fewer per step in the traced program; eta > 0 and DDPM
    keep it."""
    model, sch, tokens, mask = setup
    graphdef, state = nnx.split(model)
    static = dict(sampler="ddim", guidance=1.0, clamp=False, self_condition=False,
                  temperature=0.0, unroll=1, reweight=False, wavefront=0.0,
                  wavefront_order="left_to_right", score_min_p=0.0, draw_x0=False)
    ts, ab_t, ab_prev = sampling.noise_grid(model, sch, 3, "uniform")
    ones = jnp.ones((3,), jnp.float32)
    args = (graphdef, state, tokens, mask, jax.random.key(4), ts, ab_t, ab_prev,
            jnp.float32(0.0), ones, ones)
    program = sampling.sample_program("auto")
    drawn = program(*args, noise=True, **static)
    skipped = program(*args, noise=False, **static)
    for a, b in zip(drawn, skipped):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def normals(noise):
        text = str(jax.make_jaxpr(functools.partial(sampling._sample_program, noise=noise,
                                                    **static), static_argnums=(0,))(*args))
        return len(re.findall(r"name=_normal\b", text))  # one per Gaussian draw (x_T's too)
    assert normals(True) == normals(False) + 1
    for kw in (dict(sampler="ddim", eta=0.5), dict(sampler="ddpm")):
        assert sampling.sampler_parts(model, sch, steps=2, **kw).static["noise"]
    assert not sampling.sampler_parts(model, sch, steps=2, sampler="ddim").static["noise"]
