"""The flat parameter layout (train/flat.py, `train.param_layout = "flat"`): ravel / unravel and
its VJP, the per-leaf square sums, the train step against the tree layout's, checkpoints that
resume under either layout, and the refusal of a sharded mesh."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import flat as flat_lib
from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import optim
from dimba_jax.train import state as state_lib
from dimba_jax.train import step as step_lib
from dimba_jax.train.loop import train_and_evaluate
from dimba_jax.train.metrics import read_metrics
from train_toy import ToyData, ToyTask, toy_config, toy_factories


def _tree(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"a": {"w": jax.random.normal(k[0], (3, 700)), "b": jax.random.normal(k[1], (5,))},
            "c": jax.random.normal(k[2], (2, 3, 4)), "d": jax.random.normal(k[3], (1,))}


MASK = {"a": {"w": True, "b": False}, "c": True, "d": False}


def test_ravel_places_leaves_on_rows_and_unravel_inverts_it():
    tree = _tree()
    layout = flat_lib.FlatLayout.from_params(tree, MASK)
    assert layout.rows == {"decay": 3 + 1, "keep": 1 + 1}  # 2100 -> 3 rows, 24 -> 1; 5, 1
    assert all(o % flat_lib.ROW == 0 for o in layout.offset)
    assert layout.group_mask == {"decay": True, "keep": False}
    flat = layout.ravel(tree)
    assert {g: v.shape for g, v in flat.items()} == {"decay": (4096,), "keep": (2048,)}
    np.testing.assert_array_equal(flat["decay"][:2100], np.ravel(tree["a"]["w"]))
    assert not np.any(flat["decay"][2100:3072]) and not np.any(flat["keep"][5:1024])
    back = layout.unravel(flat)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    assert layout.is_flat(flat) and layout.is_tree(tree) and not layout.is_tree(flat)


def test_unravel_vjp_is_the_raveled_tree_gradient():
    tree = _tree()
    layout = flat_lib.FlatLayout.from_params(tree, MASK)

    def f(t):
        return (jnp.sum(jnp.sin(t["a"]["w"]) * 2.0) + jnp.sum(t["a"]["b"] ** 3)
                + jnp.sum(t["c"] * t["c"][::-1]) + 5.0 * t["d"][0])
    g_flat = jax.grad(lambda fl: f(layout.unravel(fl)))(layout.ravel(tree))
    g_tree = layout.ravel(jax.grad(f)(tree))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_flat, g_tree)
    assert not np.any(g_flat["keep"][5:1024])  # the padding's gradient is zero


def test_leaf_square_sums_match_the_trees_and_flag_only_the_bad_leaf():
    tree = _tree()
    layout = flat_lib.FlatLayout.from_params(tree, MASK)
    got = jax.jit(layout.leaf_square_sums)(layout.ravel(tree))
    np.testing.assert_allclose(got, optim.leaf_square_sums(tree), rtol=1e-5)
    bad = jax.tree.map(lambda x: x, tree)
    bad["c"] = bad["c"].at[1, 2, 3].set(jnp.nan)
    flags = ~np.isfinite(np.asarray(layout.leaf_square_sums(layout.ravel(bad))))
    names = step_lib.param_leaf_names(tree)
    assert [n for n, f in zip(names, flags) if f] == ["c"]


def test_from_params_refuses_mixed_dtypes_and_a_wrong_mask():
    tree = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,), jnp.bfloat16)}
    with pytest.raises(ValueError, match="one float dtype"):
        flat_lib.FlatLayout.from_params(tree, {"w": True, "b": False})
    with pytest.raises(ValueError, match="structure of the params"):
        flat_lib.FlatLayout.from_params({"w": jnp.zeros((2, 2))}, {"w": True, "b": False})


def _steps(config, n):
    """n train steps of the toy task on one device -> (state in the saved form, [metrics],
    [health])."""
    task = ToyTask(config)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    parts = state_lib.model_parts(task, jax.random.PRNGKey(0))
    layout = state_lib.param_layout(parts, config.train, mesh, config.mesh.axis_rules)
    tx = state_lib.optimizer_for(parts, config.train, layout)
    sh, rsh = state_lib.state_shardings(parts, tx, mesh, config.mesh.axis_rules, jnp.float32,
                                        True, layout)
    st, rest = state_lib.create_train_state(task, parts, tx, 0, sh, rsh, jnp.float32, True, layout)
    ds = step_lib.batch_sharding(mesh, config.mesh.axis_rules)
    fn = step_lib.make_train_step(task, parts, tx, config.train, mesh, sh, rsh, ds, layout)
    data = ToyData(8, 12)
    out = []
    for _ in range(n):
        st, m, h = fn(st, rest, step_lib.global_batch(next(data), ds))
        out.append((jax.device_get(m), jax.device_get(h)))
    to_saved, _ = state_lib.form_converters(layout, sh)
    return jax.device_get(to_saved(st)), out


@pytest.mark.parametrize("accum", [1, 2])
def test_flat_train_step_equals_the_tree_step(accum):
    """Clipping active (grad_clip below the norm), weight decay on, EMA every 2 steps: params,
    moments, EMA, loss, grad norm and the finiteness flags of the two layouts agree."""
    kw = dict(grad_clip=0.05, weight_decay=0.1, ema_every=2, grad_accum=accum, warmup_steps=0)
    tree, tm = _steps(toy_config(3, **kw), 3)
    flat, fm = _steps(toy_config(3, param_layout="flat", **kw), 3)
    assert jax.tree.structure(tree) == jax.tree.structure(flat)  # the same saved form
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), tree, flat)
    assert float(tree.step) == 3 and not np.array_equal(tree.params["w1"], tree.ema["w1"])
    for (m1, h1), (m2, h2) in zip(tm, fm):
        assert m1["grad_norm"] > 0.05  # clipped
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
        np.testing.assert_array_equal(h1["nonfinite_grads"], h2["nonfinite_grads"])
        assert bool(h1["finite"]) and bool(h2["finite"])


def test_a_run_resumes_under_the_other_layout_and_saves_trees(tmp_path):
    data, evals = toy_factories()

    def run(workdir, steps, layout, samples=0, **kw):
        config = toy_config(steps, checkpoint_every=2, param_layout=layout, **kw)
        config.sample.num_samples = samples
        return train_and_evaluate(config, str(workdir), task=ToyTask(config),
                                  data_factory=data, eval_factory=evals)
    for name, first in (("ref", "tree"), ("mix", "flat")):  # the same run to 6, resumed at 4
        run(tmp_path / name, 4, first)
        out = run(tmp_path / name, 6, "tree")
        assert out["start_step"] == 4 and out["step"] == 6
    ref = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref")}
    mix = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "mix")}
    for s in range(1, 7):
        assert mix[s] == pytest.approx(ref[s], rel=1e-5), s
    out = run(tmp_path / "mix", 8, "flat", samples=2, eval_batches=1)  # tree -> flat
    assert out["start_step"] == 6 and np.isfinite(out["eval"]["loss"])
    assert len(out["samples"]) == 2  # sampled from the EMA's tree
    loaded = ckpt_lib.load_params_for_inference(str(tmp_path / "mix"), prefer_ema=True)
    assert loaded.step == 8 and loaded.params["w1"].shape == (16, 32)


def test_flat_layout_refuses_an_unknown_name_and_a_sharding_mesh():
    config = toy_config(1, param_layout="flat")
    parts = state_lib.model_parts(ToyTask(config), jax.random.PRNGKey(0))
    fsdp2 = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 1})
    data2 = types.SimpleNamespace(shape={"data": 2, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="param_layout='flat' keeps every parameter whole.*'fsdp'"):
        state_lib.param_layout(parts, config.train, fsdp2, config.mesh.axis_rules)
    config.train.param_layout = "auto"  # flat where no parameter is sharded, else the tree
    assert state_lib.param_layout(parts, config.train, fsdp2, config.mesh.axis_rules) is None
    auto = state_lib.param_layout(parts, config.train, data2, config.mesh.axis_rules)
    assert isinstance(auto, flat_lib.FlatLayout)
    config.train.param_layout = "flattened"
    with pytest.raises(ValueError, match="param_layout must be 'tree', 'flat' or 'auto', got 'flattened'"):
        state_lib.param_layout(parts, config.train, fsdp2, config.mesh.axis_rules)
