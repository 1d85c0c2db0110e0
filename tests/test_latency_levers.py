"""benchmarks/latency_levers.py on CPU: the subprocess-per-variant driver, its JSON/Markdown output,
a failing variant (an unknown XLA flag aborts its process) reported without stopping the run,
and the sampler's scan `unroll` giving the same tokens as the plain scan."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import latency_levers as levers



def test_smoke_run_writes_results_and_survives_a_bad_variant(tmp_path, monkeypatch):
    monkeypatch.setitem(levers.VARIANTS, "bad_flag", {"xla_flags": "--xla_no_such_flag_for_this_test=1"})
    state = levers.main(["--smoke", "--out", str(tmp_path), "--variants", "bad_flag,base",
                         "--budget-s", "120", "--min-variant-s", "5", "--profile", "0"])
    data = json.loads((tmp_path / "latency_levers.json").read_text())
    assert data["rows"] == state["rows"]
    assert data["command"].startswith("python3 -m benchmarks.latency_levers --smoke --out ")
    base = {r["case"]: r for r in data["rows"] if r["variant"] == "base"}
    # headline DIMBA, AR, the second step count: all timed, positive, with kernel counts
    assert set(base) == {"dimba_T4", "ar", "dimba_T2"}
    for r in base.values():
        assert "error" not in r, r.get("traceback")
        assert r["latency_ms"] > 0 and len(r["times_ms"]) == 2
        assert r["same_ids_as_base"] is True
        assert r["hlo_counts"]["fusions"] > 0
    assert base["ar"]["steps"] == 32 and base["dimba_T4"]["steps"] == 4
    # the derived step cost is the slope between the two step counts
    d = data["derived"]["base"]
    expect = (base["dimba_T4"]["latency_ms"] - base["dimba_T2"]["latency_ms"]) / 2
    assert d["dimba_step_ms"] == pytest.approx(expect)
    assert d["ar_ms_per_token"] == pytest.approx(base["ar"]["latency_ms"] / 32)
    # the aborted variant is reported (no rows), the run went on
    assert not [r for r in data["rows"] if r["variant"] == "bad_flag" and "latency_ms" in r]
    assert "exit code" in data["variant_status"]["bad_flag"]
    assert data["variant_status"]["base"].startswith("ok")
    md = (tmp_path / "latency_levers.md").read_text()
    assert "| base | dimba_T4 |" in md and "bad_flag" in md
    # a continuation call keeps the earlier rows and skips finished variants (no new process)
    prev = tmp_path / "first.json"
    prev.write_text(json.dumps(data))
    again = levers.main(["--smoke", "--out", str(tmp_path / "second"), "--variants", "base",
                         "--previous", str(prev)])
    assert again["rows"] == data["rows"]
    assert json.loads((tmp_path / "second" / "latency_levers.json").read_text())["derived"] == data["derived"]


def test_unknown_variant_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown variants"):
        levers.main(["--smoke", "--out", str(tmp_path), "--variants", "base,warp_drive"])
    with pytest.raises(ValueError, match=r"^unknown config key --config\.model\.warp"):
        levers.main(["--smoke", "--out", str(tmp_path), "--variants", "base",
                     "--variant", "w:model.warp=9"])
    with pytest.raises(ValueError, match="the name 'base' is taken"):
        levers.main(["--smoke", "--out", str(tmp_path), "--variants", "base",
                     "--variant", "base:model.ssd_forward_only_block_len=128"])


def test_variant_overrides_reach_both_configs():
    args = levers.parse_args(["--smoke"])
    dimba, ar = levers._configs(args, {"overrides": [["model.ssd_forward_only_block_len", "128"],
                                                     ["model.head_dtype", "bfloat16"]]})
    for cfg in (dimba, ar):
        assert cfg.model.ssd_forward_only_block_len == 128
        assert cfg.model.head_dtype == "bfloat16"


def test_sampler_unroll_gives_the_same_tokens():
    from dimba_jax.config import default_config
    from dimba_jax.diffusion import sampler as sampling
    from dimba_jax.diffusion.schedule import cosine_schedule
    from dimba_jax.models.dimba import DimbaModel

    c = default_config()
    c.model.update(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=8, time_embed_dim=16,
                   ssd_impl="reference")
    model = nnx.jit(lambda: DimbaModel(c.model, 24, rngs=nnx.Rngs(0)))()  # one program, not op by op
    sch = cosine_schedule(20)
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 24, dtype=jnp.int32)
    known = jnp.broadcast_to(jnp.arange(12) < 3, (1, 12))
    outs = []
    for unroll in (1, 2):  # 2 does not divide 3 steps: the remainder path too
        fn = sampling.make_sample_fn(model, sch, steps=3, sampler="ddpm", unroll=unroll)
        ids, x0 = fn(tokens, known, jax.random.key(2))
        outs.append((np.asarray(ids), np.asarray(x0)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unroll"):
        sampling.make_sample_fn(model, sch, steps=5, unroll=0)


def test_matmul_state_pass_matches_the_associative_scan(monkeypatch):
    from dimba_jax.ssd import chunked

    k1, k2 = jax.random.split(jax.random.key(0))
    decay = jax.random.uniform(k1, (2, 6, 1, 3), minval=0.2, maxval=1.0)
    decay = decay.at[:, 3].set(0.0)  # a chunk whose decay underflowed (or a segment boundary)
    states = jax.random.normal(k2, (2, 6, 1, 3, 4, 5))
    _, want = jax.jit(lambda e: jax.lax.associative_scan(chunked._combine_chunks, e, axis=1))((decay, states))
    _, got = jax.jit(lambda e: levers.matmul_state_pass(chunked._combine_chunks, e, axis=1))((decay, states))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # the patch routes chunked_scan through it with the same results
    x = jax.random.normal(k1, (1, 40, 2, 4))
    dt = jax.nn.softplus(jax.random.normal(k2, (1, 40, 2)))
    B = jax.random.normal(k2, (1, 40, 1, 8))
    C = jax.random.normal(k1, (1, 40, 1, 8))
    A = -jnp.array([0.5, 2.0])
    ref = jax.jit(lambda *a: chunked.chunked_scan(*a, 8))(x, dt, A, B, C)  # a fresh trace each
    calls = []
    real = levers.matmul_state_pass
    monkeypatch.setattr(levers, "matmul_state_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(chunked, "jax", chunked.jax)  # restored after the test
    levers._install_matmul_state_pass()
    out = jax.jit(lambda *a: chunked.chunked_scan(*a, 8))(x, dt, A, B, C)
    assert calls  # the patched state passing really ran
    for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_variant_settings_reach_the_configs():
    """ssd_xla and head_f32 change what they name in the DIMBA config (and the AR config's
    ssd_impl), nothing else."""
    import argparse

    args = argparse.Namespace(smoke=True)
    base_d, base_a = levers._configs(args, {})
    for name, want in (("ssd_xla", {"ssd_impl": "xla"}), ("head_f32", {"head_dtype": "float32"})):
        d, a = levers._configs(args, dict(levers.VARIANTS[name], name=name))
        for cfg, base in ((d, base_d), (a, base_a)):
            changed = {k for k in cfg.model if cfg.model[k] != base.model[k]}
            assert changed <= set(want), (name, changed)
            assert all(cfg.model[k] == v for k, v in want.items())
    assert base_d.model.head_dtype == "bfloat16"


def test_sampler_dispatch_smoke(tmp_path):
    """benchmarks.sampler_dispatch on a tiny config: every way gives the same tokens (it
    checks) and the JSON / Markdown carry every way's medians."""
    from benchmarks import sampler_dispatch

    out = tmp_path / "sd"
    sampler_dispatch.main(["--config", "configs/tiny.py", "--steps", "2", "--length", "32",
                           "--repeats", "2", "--out", str(out)])
    doc = json.loads((out.parent / "sd.json").read_text())
    assert set(doc["ways"]) == set(sampler_dispatch.WAYS)
    assert all(r["call_ms"] >= r["dispatch_ms"] > 0 for r in doc["ways"].values())
    assert "| unbound |" in (out.parent / "sd.md").read_text()
