"""benchmarks/merge_pareto.py: joining parallel Pareto shards."""

import pytest

from benchmarks import merge_pareto
from dimba_jax.evaluate import results as results_lib


def _row(model, steps, latency):
    return {"model": model, "sampler": "ddim" if model == "dimba" else "ar", "steps": steps,
            "L_gen": 1024, "batch": 1, "prompted": False, "latency_ms": latency,
            "tokens_per_s": 1.0, "judge_ppl": 10.0, "entropy": 7.0}


def _shard(rows, step=100):
    res = results_lib.empty_results(device="gpu", command=f"shard {rows[0]['steps']}")
    res["models"] = {"dimba": {"workdir": "runs/small", "step": step, "params": 3},
                     "ar": {"workdir": "runs/ar", "step": 100, "params": 3}}
    res["reference"] = {"judge_ppl": 50.0, "entropy": 7.7}
    results_lib.merge_rows(res, rows, {results_lib.row_key(r): {"n": r["steps"]} for r in rows})
    return res


def test_merge_unions_rows_keeps_long_context_and_drops_stale_base_rows(tmp_path):
    base = _shard([_row("dimba", 64, 999.0)], step=1)  # another checkpoint: its row must go
    base["long_context"] = [{"L": 1024, "step_ms": 2.0, "peak_gib": 0.2}]
    merged = merge_pareto.merge(base, [_shard([_row("ar", 1024, 400.0), _row("dimba", 64, 90.0)]),
                                       _shard([_row("dimba", 16, 30.0)])])
    got = {(r["model"], r["steps"]): r["latency_ms"] for r in merged["rows"]}
    assert got == {("ar", 1024): 400.0, ("dimba", 64): 90.0, ("dimba", 16): 30.0}
    assert merged["long_context"] == base["long_context"]
    assert merged["reference"]["judge_ppl"] == 50.0
    assert len(merged["details"]) == 3 and "shard 16" in merged["command"]


def test_merge_keeps_base_rows_of_the_same_models():
    base = _shard([_row("dimba", 8, 12.0)])
    merged = merge_pareto.merge(base, [_shard([_row("dimba", 16, 30.0)])])
    assert sorted(r["steps"] for r in merged["rows"]) == [8, 16]


def test_merge_refuses_shards_of_different_checkpoints():
    with pytest.raises(ValueError, match="dimba"):
        merge_pareto.merge(results_lib.empty_results(),
                           [_shard([_row("dimba", 16, 1.0)], step=100),
                            _shard([_row("dimba", 64, 1.0)], step=200)])


def test_cli_missing_shard_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        merge_pareto.main([str(tmp_path / "nope.json"), "--out", str(tmp_path / "m.json")])
