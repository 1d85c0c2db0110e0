"""The Pareto harness end to end (--smoke: tiny random models on CPU), resuming, and the plots."""

import json
import os
import time

import numpy as np
import pytest

from benchmarks import pareto, plot_pareto
from dimba_jax.evaluate import harness, results



def test_plan_puts_the_headline_first_and_filters_variants():
    specs = harness.plan(models=("ar", "dimba"), samplers=("ddim", "ddpm"), steps=(8, 64),
                         lengths=(256, 1024), prompted=(False, True), variants=("", "cfg2"))
    assert specs[0] == harness.RunSpec("ar", "ar", 1024, 1024, False)
    assert specs[1] == harness.RunSpec("dimba", "ddim", 64, 1024, False)
    assert all(s.prompted for s in specs if s.variant == "cfg2")
    assert all(s.model == "dimba" for s in specs if s.variant)
    # 2 lengths x 2 prompted x (1 AR + 2 samplers x 2 steps) + cfg2 on prompted only (2 x 4)
    assert len(specs) == 2 * 2 * 5 + 2 * 4
    with pytest.raises(ValueError):
        harness.plan(variants=("nonsense",))
    with pytest.raises(ValueError):
        harness.plan(models=("gpt",))


def test_results_of_other_checkpoints_are_detected():

    old = {"dimba": {"workdir": "runs/small", "step": 100, "params": 5},
           "judge": {"workdir": "runs/judge", "step": 50, "params": 9}}
    assert pareto._stale_models(old, {"dimba": dict(old["dimba"]), "judge": dict(old["judge"])}) == []
    assert pareto._stale_models(old, {"dimba": dict(old["dimba"], step=200),
                                      "judge": dict(old["judge"]), "ar": {"step": 1}}) == ["dimba"]


def test_cut_at_eos():
    assert harness.cut_at_eos([5, 6, 9, 7], 9) == [5, 6]
    assert harness.cut_at_eos(np.array([1, 2]), 9) == [1, 2]


def test_smoke_end_to_end_writes_valid_results_resumes_and_plots(tmp_path):

    out = str(tmp_path / "pareto.json")
    # an older file measured with another checkpoint: its rows must go, its timings stay
    old = results.empty_results("cpu", "old command")
    results.merge_rows(old, [{"model": "dimba", "sampler": "ddim", "steps": 99, "L_gen": 8,
                              "batch": 1, "prompted": True, "latency_ms": 1.0, "tokens_per_s": 1.0,
                              "judge_ppl": 1.0, "entropy": 1.0}])
    results.merge_long_context(old, [{"L": 8, "step_ms": 0.1, "peak_gib": None}])
    old["models"] = {"dimba": {"workdir": "elsewhere", "step": 7, "params": 1}}
    results.save(old, out)
    argv = ["--smoke", "--results", out, "--models", "ar,dimba", "--samplers", "ddim",
            "--steps", "2", "--lengths", "8", "--prompted", "1", "--batches", "1,2",
            "--repeats", "1", "--prompt-len", "4", "--judge-window", "16", "--judge-batch", "4",
            "--long-context", "16,32"]
    res = pareto.main(argv)
    results.validate(res)
    with open(out) as f:
        on_disk = json.load(f)
    results.validate(on_disk)
    rows = on_disk["rows"]
    assert len(rows) == 4  # (ar, dimba) x batches (1, 2)
    assert {(r["model"], r["batch"]) for r in rows} == {("ar", 1), ("ar", 2), ("dimba", 1), ("dimba", 2)}
    for r in rows:
        assert set(r) == set(results.ROW_KEYS)
        assert r["prompted"] is True and r["L_gen"] == 8
        assert r["latency_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 8 / (r["latency_ms"] / 1e3))
        # a random judge over a 257-token vocabulary: perplexity near (but not above ~2x) 257
        assert 50 < r["judge_ppl"] < 600
        assert 0 < r["entropy"] < np.log2(257)  # bits per byte token
        assert r["steps"] == (8 if r["model"] == "ar" else 2)  # AR: one network call per token
    for key, detail in on_disk["details"].items():  # prompted rows carry the prompt fit of their judged samples
        assert detail["fit_ppl_own"] > 0 and detail["fit_ppl_other"] > 0 and detail["fit_tokens"] == 32, key
    assert [r["L"] for r in on_disk["long_context"]] == [8, 16, 32]
    assert "old command" not in on_disk["command"]
    assert on_disk["reference"]["judge_ppl"] > 0 and on_disk["reference"]["entropy"] > 0
    real = on_disk["reference_by_L"]["8"]["prompted"]  # real text after its own 4-token prompt
    assert real["prompt_len"] == 4 and real["ratio"] == pytest.approx(
        real["ppl_prompted"] / real["ppl_unprompted"])
    assert on_disk["models"]["dimba"]["params"] > 0
    # the pre-split path gave exactly the public API's samples for both models
    assert results.load(out)["pre_split_fast_path"] == {"ar": True, "dimba": True}

    # resuming: every spec is already measured, so nothing is recompiled or re-timed
    before = {results.row_key(r): r["latency_ms"] for r in rows}
    t0 = time.perf_counter()
    pareto.main(argv)
    again = results.load(out)
    assert {results.row_key(r): r["latency_ms"] for r in again["rows"]} == before
    assert time.perf_counter() - t0 < 15

    docs = tmp_path / "docs"
    paths = plot_pareto.main(["--results", out, "--docs", str(docs)])
    for name in ("pareto_ppl_vs_latency.png", "pareto_quality_vs_steps.png", "long_context_step_time.png"):
        assert (docs / name).stat().st_size > 5000
    table = open(os.path.splitext(out)[0] + ".md").read()
    assert table.count("| ar | ar |") == 2 and table.count("| dimba | ddim |") == 2
    assert len(paths) == 4


def test_pareto_table_puts_each_models_bits_per_token_beside_its_rows():
    from dimba_jax.evaluate import plots
    row = dict(sampler="ddim", variant="", steps=64, L_gen=1024, batch=1, prompted=False,
               latency_ms=113.1, tokens_per_s=9051.0, judge_ppl=256.8, entropy=7.456)
    table = plots.markdown_table({"rows": [dict(row, model="dimba", nll_bits=7.9699),
                                           dict(row, model="ar", sampler="ar", steps=1024)]})
    assert "| 256.80 | 7.456 | 7.97 |" in table  # DIMBA's bound
    ar_line = next(l for l in table.splitlines() if l.startswith("| ar | ar |"))
    assert ar_line.endswith("| 7.456 | — |")  # no likelihood recorded: a dash, not a number
