"""train.flat_update: the flat optimizer update (optim.FlatAdamW) equals the optax path, leaf for
leaf and over a toy training run; it is refused for sharded parameters; a run resumes only with
the setting it was saved with, and a refused resume leaves the checkpoint as it was."""

from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dimba_jax.config import default_config
from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import optim
from dimba_jax.train import state as state_lib
from dimba_jax.train import step as step_lib
from dimba_jax.train.loop import train_and_evaluate, validate_config
from dimba_jax.train.metrics import read_metrics
from train_toy import ToyTask, toy_config, toy_factories

AXES = {"embed": ("vocab", "embed"), "w1": ("embed", "mlp"), "A_log": ("heads",),
        "D": ("heads", None), "norm": ("embed",), "blocks": {"0": {"kernel": ("embed", "mlp")}}}
SHAPES = {"embed": (7, 4), "w1": (4, 8), "A_log": (4,), "D": (4, 2), "norm": (4,),
          "blocks": {"0": {"kernel": (4, 6)}}}


def _params(dtype, seed=0):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(r.normal(size=s), dtype), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _train_config(flat, **kw):
    t = default_config().train
    t.update(dict(flat_update=flat, lr=0.05, warmup_steps=2, steps=20, weight_decay=1.0,
                  grad_clip=1.0, ema_decay=0.9, **kw))
    return t


def _adam_state(opt_state):
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]


def _close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=8e-3)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        np.asarray(x, np.float32), np.asarray(y, np.float32), **tol), a, b)


def test_flat_layout_round_trip_puts_decayed_leaves_first():
    params = _params(jnp.float32)
    params["norm"] = params["norm"].astype(jnp.bfloat16)  # a second dtype: a second vector
    mask = optim.weight_decay_mask(params, AXES)
    layout = optim.FlatLayout.of(params, mask)
    flat = layout.ravel(params)
    assert {k: v.dtype for k, v in flat.items()} == {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    assert layout.sizes() == {"float32": 28 + 4 + 8 + 24 + 32, "bfloat16": 4}
    assert layout.n_decay == {"float32": 24 + 32, "bfloat16": 0}  # blocks/0/kernel and w1
    np.testing.assert_array_equal(flat["float32"][:24], np.ravel(params["blocks"]["0"]["kernel"]))
    np.testing.assert_array_equal(flat["float32"][24:56], np.ravel(params["w1"]))
    back = layout.unravel(flat)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_flat_update_matches_the_optax_path(dtype):
    """Six steps, five with the global norm above grad_clip (clipped) and one below, weight
    decay 1.0 on the masked leaves only: params, EMA, both moments, count and norms agree."""
    params = _params(dtype)
    tx = optim.make_optimizer(_train_config(False), params, AXES)
    fx = optim.make_optimizer(_train_config(True), params, AXES)
    assert isinstance(fx, optim.FlatAdamW) and not isinstance(tx, optim.FlatAdamW)
    a, b = (params, tx.init(params), params), (params, fx.init(params), params)
    r = np.random.default_rng(1)
    clipped = []
    for i in range(6):
        scale = 0.01 if i == 3 else 2.0
        grads = jax.tree.map(lambda p: jnp.asarray(scale * r.normal(size=p.shape), dtype), params)
        step = jnp.int32(i + 1)
        pa, sa, ea, gna, pna = jax.jit(lambda g, s, p, e: optim.apply_update(
            tx, g, s, p, e, step, 0.9))(grads, a[1], a[0], a[2])
        pb, sb, eb, gnb, pnb = jax.jit(lambda g, s, p, e: optim.apply_update(
            fx, g, s, p, e, step, 0.9))(grads, b[1], b[0], b[2])
        clipped.append(float(gna) > 1.0)
        np.testing.assert_allclose(float(gnb), float(gna), rtol=1e-5)
        np.testing.assert_allclose(float(pnb), float(pna), rtol=1e-5 if dtype == jnp.float32 else 1e-2)
        a, b = (pa, sa, ea), (pb, sb, eb)
    assert clipped == [True, True, True, False, True, True]
    _close(b[0], a[0], dtype)
    _close(b[2], a[2], dtype)
    adam = _adam_state(a[1])
    assert int(b[1].count) == int(adam.count) == 6
    assert b[1].mu["float32" if dtype == jnp.float32 else "bfloat16"].dtype == dtype
    _close(fx.layout.unravel(b[1].mu), adam.mu, dtype)
    _close(fx.layout.unravel(b[1].nu), adam.nu, dtype)
    # the comparison sees the mask: decaying the embedding too moves it well outside tolerance
    gx = optim.make_optimizer(_train_config(True, decay_embeddings=True), params, AXES)
    grads = jax.tree.map(jnp.zeros_like, params)
    warm = fx.init(params)._replace(count=jnp.int32(5))  # past the warm-up: lr > 0
    decayed = gx.apply(grads, warm, params, None, jnp.int32(6), 0.9)[0]
    kept = fx.apply(grads, warm, params, None, jnp.int32(6), 0.9)[0]
    np.testing.assert_array_equal(np.asarray(kept["embed"]), np.asarray(params["embed"]))
    assert np.max(np.abs(np.asarray(decayed["embed"], np.float32)
                         - np.asarray(params["embed"], np.float32))) > 0.01


def test_flat_update_is_refused_for_sharded_parameters():
    config = toy_config(4, flat_update=True)
    validate_config(config, 1, 1)
    for axis in ("fsdp", "tensor"):
        c = toy_config(4, flat_update=True)
        c.mesh[axis] = 2
        with pytest.raises(ValueError, match=f"train.flat_update=True .*mesh.{axis}=2") as err:
            validate_config(c, 1, 2)
        assert "\n" not in str(err.value)
        c.train.flat_update = False
        validate_config(c, 1, 2)
    # make_train_step checks the shardings themselves (custom axis rules, fsdp = -1)
    params = {"w": jnp.zeros((4, 4))}
    fx = optim.make_optimizer(config.train, params, {"w": ("embed", "mlp")})
    shardings = types.SimpleNamespace(params={"w": types.SimpleNamespace(is_fully_replicated=False)})
    with pytest.raises(ValueError, match=r"train.flat_update needs replicated .*\['w'\]"):
        step_lib.make_train_step(None, None, fx, config.train, None, shardings, None, None)


def _run(config, workdir):
    data, evals = toy_factories()
    return train_and_evaluate(config, str(workdir), task=ToyTask(config), data_factory=data,
                              eval_factory=evals)


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def _listing(workdir):
    return sorted(os.path.relpath(os.path.join(root, f), workdir)
                  for root, _, files in os.walk(workdir / "checkpoints") for f in files)


def _saved(workdir, ema):
    return ckpt_lib.load_params_for_inference(str(workdir), prefer_ema=ema).params


def _toy(flat):
    """Six toy steps, every one clipped (grad_clip below the gradient norms), weight decay on."""
    return toy_config(6, checkpoint_every=3, flat_update=flat, lr=3e-2, grad_clip=0.05,
                      weight_decay=0.1)


def test_a_toy_run_with_flat_update_trains_like_the_optax_path_and_resumes_exactly(tmp_path):
    tree, flat = tmp_path / "tree", tmp_path / "flat"
    _run(_toy(False), tree)
    out = _run(_toy(True), flat)
    assert out["step"] == 6
    a, b = _losses(tree), _losses(flat)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    assert a[6] < a[1]  # it trains
    assert all(r["grad_norm"] > 0.05 for r in read_metrics(str(flat)))  # clipping was active
    for ema in (False, True):
        _close(_saved(flat, ema), _saved(tree, ema), jnp.float32)
    # resume the flat run from step 3: the same steps 4-6, bit for bit
    final = {ema: _saved(flat, ema) for ema in (False, True)}
    ckdir = flat / "checkpoints"
    for root, dirs, files in os.walk(ckdir / "6", topdown=False):
        for f in files:
            os.remove(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(ckdir / "6")
    again = _run(_toy(True), flat)
    assert again["start_step"] == 3 and again["step"] == 6
    records = [r for r in read_metrics(str(flat)) if r["step"] > 3]
    assert [r["loss"] for r in records[-3:]] == [b[4], b[5], b[6]]
    for ema in (False, True):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                     _saved(flat, ema), final[ema])


@pytest.mark.parametrize("saved_flat", [False, True], ids=["tree_saved", "flat_saved"])
def test_resuming_with_the_knob_flipped_is_refused_and_the_checkpoint_kept(tmp_path, saved_flat):
    work = tmp_path / "run"
    _run(toy_config(4, flat_update=saved_flat), work)
    before, config_json = _listing(work), (work / "config.json").read_text()
    assert "4/opt_state" in " ".join(before)
    flipped = toy_config(6, flat_update=not saved_flat)
    with pytest.raises(ValueError, match=f"train.flat_update={saved_flat}") as err:
        _run(flipped, work)
    assert "\n" not in str(err.value)
    assert _listing(work) == before and (work / "config.json").read_text() == config_json

    # the checkpointer refuses too when config.json is not consulted, and moves nothing aside
    task = ToyTask(flipped)
    parts = state_lib.model_parts(task, jax.random.PRNGKey(0))
    tx = optim.make_optimizer(flipped.train, parts.abstract_params, parts.logical_axes)
    mesh = mesh_lib.make_mesh(flipped.mesh, jax.devices()[:1])
    sh, _ = state_lib.state_shardings(parts, tx, mesh, flipped.mesh.axis_rules, jnp.float32, True)
    abstract = state_lib.abstract_train_state(parts, tx, sh, jnp.float32, True)
    checkpointer = ckpt_lib.Checkpointer(str(work))
    with pytest.raises(ValueError, match=f"saved with train.flat_update={saved_flat} and this "
                                         f"run has train.flat_update={not saved_flat}"):
        checkpointer.restore(abstract)
    checkpointer.close()
    assert _listing(work) == before and sorted(os.listdir(work / "checkpoints")) == ["4"]

    out = _run(toy_config(6, flat_update=saved_flat), work)  # the saved setting resumes
    assert out["start_step"] == 4 and out["step"] == 6


def test_flat_update_with_decay_embeddings_changed_is_refused(tmp_path):
    work = tmp_path / "run"
    _run(toy_config(2, flat_update=True), work)
    with pytest.raises(ValueError, match="train.decay_embeddings=False"):
        ckpt_lib.check_config(str(work), toy_config(4, flat_update=True, decay_embeddings=True))
    ckpt_lib.check_config(str(work), toy_config(4, flat_update=True))
