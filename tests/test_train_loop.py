"""The training loop on one device with a toy task: exact resume after SIGTERM, corrupt-checkpoint
fallback, the non-finite abort, gradient accumulation, the weight-decay mask, EMA and schedule."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import optim
from dimba_jax.train import state as state_lib
from dimba_jax.train import step as step_lib
from dimba_jax.train.loop import train_and_evaluate, validate_config
from dimba_jax.train.metrics import read_metrics
from train_toy import ToyData, ToyTask, toy_config, toy_factories


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def _run(config, workdir, **kw):
    data, evals = toy_factories(**kw)
    return train_and_evaluate(config, str(workdir), task=ToyTask(config), data_factory=data,
                              eval_factory=evals)


def _final_params(workdir, ema):
    loaded = ckpt_lib.load_params_for_inference(str(workdir), prefer_ema=ema)
    return loaded.step, loaded.params


class _SigtermData(ToyData):
    """Sends this process a real SIGTERM while the batch of call `at` is being read."""

    def __init__(self, *a, at, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def __next__(self):
        if self.calls + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def test_sigterm_saves_and_resume_repeats_the_uninterrupted_run_bitwise(tmp_path):
    config = toy_config(8)
    full = _run(config, tmp_path / "full")
    assert full["step"] == 8 and not full["preempted"]

    def sigterm_data(cfg, tok, pid, nproc):
        return _SigtermData(8, 12, int(cfg.seed), pid, at=4)
    _, evals = toy_factories()
    part = train_and_evaluate(config, str(tmp_path / "cut"), task=ToyTask(config),
                              data_factory=sigterm_data, eval_factory=evals)
    assert part["preempted"] and part["step"] == 4
    assert ckpt_lib.Checkpointer(str(tmp_path / "cut")).all_steps() == [4]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler given back

    resumed = _run(config, tmp_path / "cut")
    assert resumed["start_step"] == 4 and resumed["step"] == 8
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), (a, b)  # bitwise: the same float32 values
    for ema in (False, True):
        (sa, pa), (sb, pb) = _final_params(tmp_path / "full", ema), _final_params(tmp_path / "cut", ema)
        assert sa == sb == 8
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)


def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
    work = tmp_path / "run"
    _run(toy_config(6, checkpoint_every=2), work)
    ref = _losses(work)
    ckdir = work / "checkpoints"
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [2, 4, 6]
    for root, _, files in os.walk(ckdir / "6" / "params"):  # garble every array file of step 6
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    (ckdir / "7.orbax-checkpoint-tmp-1").mkdir()  # a save cut short: must be ignored

    caplog.set_level("WARNING")
    config = toy_config(6, checkpoint_every=2, eval_batches=1)
    config.sample.num_samples = 2
    out = _run(config, work)
    assert out["start_step"] == 4 and out["step"] == 6
    assert len(out["samples"]) == 2 and "=== step 6" in (work / "samples.txt").read_text()
    assert read_metrics(work, "eval")[-1]["step"] == 6 and np.isfinite(out["eval"]["loss"])
    assert "unreadable" in caplog.text and "step 6" in caplog.text
    assert (ckdir / "6.corrupt").is_dir()  # moved aside, not deleted
    again = {r["step"]: r["loss"] for r in read_metrics(work, "train")[6:]}
    assert again == {5: ref[5], 6: ref[6]}


def test_nonfinite_loss_aborts_with_the_step_and_parameters_and_saves_nothing_bad(tmp_path):
    with pytest.raises(step_lib.NonFiniteError) as err:
        _run(toy_config(6, checkpoint_every=1), tmp_path, nan_at=3)
    msg = str(err.value)
    assert "step 3" in msg and "loss=nan" in msg and "w1" in msg and "embed" in msg
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def _step_setup(config, task):
    """(jitted train step, initial state, rest, batch) on one device; the batch the first
    ToyData batch."""
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    parts = state_lib.model_parts(task, jax.random.PRNGKey(0))
    tx = optim.make_optimizer(config.train, parts.abstract_params, parts.logical_axes)
    sh, rsh = state_lib.state_shardings(parts, tx, mesh, config.mesh.axis_rules, jnp.float32, True)
    st, rest = state_lib.create_train_state(task, parts, tx, 0, sh, rsh, jnp.float32, True)
    ds = step_lib.batch_sharding(mesh, config.mesh.axis_rules)
    fn = step_lib.make_train_step(task, parts, tx, config.train, mesh, sh, rsh, ds)
    return fn, st, rest, step_lib.global_batch(next(ToyData(8, 12)), ds)


def _first_step(config, task):
    """(new state, metrics, health) of the jitted train step on one device from the
    initial state, on the first ToyData batch."""
    fn, st, rest, batch = _step_setup(config, task)
    return fn(st, rest, batch)


def _one_step_params(accum):
    config = toy_config(1, grad_accum=accum, warmup_steps=0)
    task = ToyTask(config)
    task.dropout = 0.0  # the loss then ignores its rng, so micro-batching must not change it
    new, metrics, _ = _first_step(config, task)
    return jax.device_get(new.params), float(metrics["loss"]), float(metrics["grad_norm"])


def test_gradient_accumulation_equals_the_full_batch():
    p1, l1, g1 = _one_step_params(1)
    p4, l4, g4 = _one_step_params(4)
    assert l1 == pytest.approx(l4, rel=1e-6) and g1 == pytest.approx(g4, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p4)


def test_weight_decay_mask_spares_ssm_params_norms_and_embeddings():
    params = {"embed": jnp.zeros((5, 4)), "w1": jnp.zeros((4, 8)), "A_log": jnp.zeros((4,)),
              "D": jnp.zeros((4, 2)), "dt_bias": jnp.zeros((4,)), "norm": jnp.zeros((4,))}
    axes = {"embed": ("vocab", "embed"), "w1": ("embed", "mlp"), "A_log": ("heads",),
            "D": ("heads", None), "dt_bias": ("heads",), "norm": ("embed",)}
    mask = optim.weight_decay_mask(params, axes)
    assert mask == {"embed": False, "w1": True, "A_log": False, "D": False, "dt_bias": False,
                    "norm": False}
    assert optim.weight_decay_mask(params, axes, decay_embeddings=True)["embed"] is True


def test_ema_and_learning_rate_schedule():
    ema = optim.update_ema({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, jnp.int32(1000), 0.9)
    np.testing.assert_allclose(ema["w"], 0.9)
    early = optim.update_ema({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, jnp.int32(1), 0.999)
    np.testing.assert_allclose(early["w"], 2.0 / 11.0, rtol=1e-6)  # warm-up: (1+1)/(10+1)
    config = toy_config(100, warmup_steps=10, lr=1.0, final_lr_frac=0.1)
    lr = optim.learning_rate_schedule(config.train)
    with pytest.raises(ValueError, match="ema_every must be >= 1, got 0"):
        validate_config(toy_config(4, ema_every=0), 1, 1)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0) and float(lr(100)) == pytest.approx(0.1)
    assert float(lr(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint


def test_apply_update_is_optax_clip_and_adamw_with_one_reduction_per_shape_group():
    """apply_update = optax's clip_by_global_norm + AdamW + the EMA, with the grad norm and the
    per-leaf finiteness read off the per-leaf sums of squares: small leaves of one shape share
    one reduction (three (5,) biases, two (4, 3) kernels), a large leaf has its own, and the
    compiled update holds exactly those (the clip's norm is the same computation: no second
    pass, no parameter norm)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 16))
    shapes = {"w1": (6, 5), "b": (5,), "deep": {"w2": (5, 3, 2), "b2": (5,), "b3": (5,),
                                                  "k1": (4, 3), "k2": (4, 3)},
              "big": (300, 300)}
    params = jax.tree.map(lambda s: jax.random.normal(next(keys), s), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    grads = jax.tree.map(lambda p: 3.0 * jax.random.normal(next(keys), p.shape), params)
    axes = jax.tree.map(lambda p: ("mlp",) + (None,) * (p.ndim - 1), params)
    config = toy_config(100, warmup_steps=0, lr=0.1, grad_clip=1.0)
    tx = optim.make_optimizer(config.train, params, axes)
    opt_state, ema, step = tx.init(params), jax.tree.map(jnp.zeros_like, params), jnp.int32(5)

    def update(g, s, p, e):
        return optim.apply_update(tx, g, s, p, e, step, 0.9)

    new_p, _, new_e, norm, sq = jax.jit(update)(grads, opt_state, params, ema)
    no_clip = dict(config.train.items(), grad_clip=0.0)
    adamw = optim.make_optimizer(type(config.train)(no_clip), params, axes)
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    ref_updates, _ = adamw.update(clipped, adamw.init(params), params)
    ref_p = optax.apply_updates(params, ref_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_p, ref_p)
    d = float(optim.ema_decay_at(step, 0.9))
    jax.tree.map(lambda e, p: np.testing.assert_allclose(e, (1 - d) * p, rtol=1e-6), new_e, new_p)
    assert float(norm) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6) and norm > 1.0
    want = [np.sum(np.square(g)) for g in jax.tree.leaves(grads)]  # leaf order
    np.testing.assert_allclose(sq, want, rtol=1e-5)
    assert type(opt_state[0]) is optax.EmptyState  # the clip's state: optax's own
    hlo = jax.jit(update).lower(grads, opt_state, params, ema).compile().as_text()
    # w1, w2, big alone; the (5,) group; the (4, 3) group; the norm's sum over their vector
    assert hlo.count(" reduce(") == 6, hlo.count(" reduce(")


def test_param_norm_is_logged_on_logging_steps_and_not_by_the_step(tmp_path):
    config = toy_config(4, log_every=2)
    _run(config, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4] and all(r["param_norm"] > 0 for r in rows)
    _, params = _final_params(tmp_path, ema=False)
    assert rows[-1]["param_norm"] == pytest.approx(float(optim.global_norm(params)), rel=1e-6)
    _, metrics, health = _first_step(config, ToyTask(config))
    assert "param_norm" not in metrics and bool(health["finite"])
    flags = np.asarray(jax.device_get(health["nonfinite_grads"]))
    assert flags.dtype == bool and flags.shape == (len(jax.tree.leaves(params)),)
    assert not flags.any()


class _CoinTask(ToyTask):
    """ToyTask with a host coin: steps 3, 6, ... take the static option flip=True (their own
    compiled step, as the DIMBA task's self-conditioning coin)."""

    def step_options(self, step):
        return (("flip", step % 3 == 0),)

    def step_option_sets(self):
        return [(("flip", False),), (("flip", True),)]

    def loss(self, model, batch, rng, flip=False):
        loss, metrics = super().loss(model, batch, rng)
        return (loss * 1.5 if flip else loss), metrics


def test_every_step_variant_compiles_before_the_first_step(tmp_path):
    """The loop compiles both variants of the step after reading the first batch (concurrently),
    not the second one at step 3 where the coin first flips: every backend compile of the step
    happens while one batch has been read, and there are exactly two."""
    config = toy_config(4)
    data, evals = toy_factories()
    streams, compiles = [], []

    def counting_data(*a):
        streams.append(data(*a))
        return streams[-1]

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") == "jit(step)":
            compiles.append(streams[0].calls if streams else None)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train_and_evaluate(config, str(tmp_path), task=_CoinTask(config), data_factory=counting_data,
                           eval_factory=evals)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [1, 1], compiles


def test_raise_if_nonfinite_names_the_flagged_parameters_of_the_flag_vector():
    names = step_lib.param_leaf_names({"a": {"w": 1.0, "b": 2.0}, "z": 3.0})
    assert names == ["a/b", "a/w", "z"]  # jax.tree.leaves order (sorted dict keys)
    metrics = {"loss": jnp.float32(np.nan)}
    ok = {"finite": jnp.bool_(True), "nonfinite_grads": jnp.zeros((3,), bool)}
    step_lib.raise_if_nonfinite(7, metrics, ok, names)  # finite: nothing raised
    bad = {"finite": jnp.bool_(False), "nonfinite_grads": jnp.array([False, True, True])}
    with pytest.raises(step_lib.NonFiniteError, match=r"step 7.*\(2\): a/w, z\. "):
        step_lib.raise_if_nonfinite(7, metrics, bad, names)
    with pytest.raises(ValueError, match="one flag per parameter"):
        step_lib.raise_if_nonfinite(7, metrics, bad, names[:2])


def test_ema_every_k_steps_skips_the_others_and_matches_k_updates_of_still_parameters():
    ema, params = {"w": jnp.array([1.0, -2.0, 3.0])}, {"w": jnp.array([0.5, 0.5, -1.0])}
    update = jax.jit(optim.update_ema, static_argnums=(3, 4))
    for step in (1, 2, 4, 5, 7):  # not a multiple of 3: untouched, bit for bit
        out = update(ema, params, jnp.int32(step), 0.99, 3)
        np.testing.assert_array_equal(out["w"], ema["w"])
    for step in (3, 6, 300):  # k = 3 single-step updates (the warm-up's decays included)
        want = ema
        for s in (step - 2, step - 1, step):
            want = optim.update_ema(want, params, jnp.int32(s), 0.99)
        got = update(ema, params, jnp.int32(step), 0.99, 3)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, atol=1e-7)
        assert not np.allclose(got["w"], ema["w"])
    with pytest.raises(ValueError, match="every must be >= 1"):
        optim.update_ema(ema, params, jnp.int32(3), 0.99, 0)


def test_the_train_step_updates_the_ema_on_its_kth_steps_only():
    for every, moved in ((2, False), (1, True)):  # step 1: skipped at k = 2, taken at k = 1
        config = toy_config(4, ema_every=every)
        fn, st, rest, batch = _step_setup(config, ToyTask(config))
        init = jax.device_get(st.ema)
        st, _, _ = fn(st, rest, batch)
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(st.ema)),
                                                     jax.tree.leaves(init))]
        assert (not all(same)) if moved else all(same), (every, same)
