"""The quality study driver's pure parts: the sweep's setting of record, --sweep / --variants
parsing, the Pareto file rebuilt from a study (rows of one checkpoint only), and the report's
tables from the committed results."""

import json
import math
import os

import pytest

from benchmarks import quality_study as qs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(sampler, variant, ppl, entropy):
    return {"sampler": sampler, "variant": variant, "judge_ppl": ppl, "entropy": entropy}


def test_choose_setting_prefers_entropy_within_tolerance():
    rows = [_row("ddim", "st0.5", 189.0, 6.62), _row("ddim", "st0.7", 338.0, 7.14),
            _row("ddim", "st0.8", 563.0, 7.47), _row("ddpm", "st0.7", 433.0, 7.34)]
    # real text 7.79: only st0.8 is within 5% (7.47 / 7.79 - 1 = -4.1%)
    assert qs.choose_setting(rows, 7.79)["variant"] == "st0.8"
    # with a looser tolerance the lowest perplexity among the close ones wins
    assert qs.choose_setting(rows, 7.79, tolerance=0.09)["variant"] == "st0.7"
    # none close: the lowest perplexity overall; a NaN perplexity never wins
    far = [_row("ddim", "a", math.nan, 1.0), _row("ddim", "b", 50.0, 1.0), _row("ddim", "c", 40.0, 1.0)]
    assert qs.choose_setting(far, 7.79)["variant"] == "c"


def test_parse_sweep():
    assert qs.parse_sweep("ddim:st0.7, ddpm:st0.75,ddim") == (("ddim", "st0.7"), ("ddpm", "st0.75"), ("ddim", ""))
    assert qs.parse_sweep("ddpm:st0.65+stf1") == (("ddpm", "st0.65+stf1"),)
    with pytest.raises(ValueError, match="unknown sampling variant 'xx0.5'"):
        qs.parse_sweep("ddim:xx0.5")
    with pytest.raises(ValueError, match="unknown sampler"):
        qs.parse_sweep("euler:st0.7")


def test_workers_get_the_drivers_sampler_choices():
    args = qs.parse_args(["--study", "tiny", "--workdir", "w", "--out", "o.json",
                          "--variants", "st0.8,pw0.5", "--sweep", "ddim:st0.7", "--set", "ar:train.steps=9"])
    argv = qs.sys_args(args)
    assert argv[argv.index("--variants") + 1] == "st0.8,pw0.5"
    assert argv[argv.index("--sweep") + 1] == "ddim:st0.7"
    assert argv[argv.index("--set") + 1] == "ar:train.steps=9"
    assert "--variants" not in qs.sys_args(qs.parse_args(["--study", "tiny", "--workdir", "w", "--out", "o"]))
    # a worker parses those arguments back into the same study as the driver
    worker = qs.study_from_args(qs.parse_args(argv + ["--seed", "3", "--worker", "dimba"]))
    assert worker["variants"] == ("st0.8", "pw0.5") and worker["sweep"] == (("ddim", "st0.7"),)
    assert worker["seed"] == 3 and qs.study_from_args(args).get("seed", 0) == 0
    assert worker["runs"] == qs.STUDIES["tiny"]["runs"]
    # --set reaches the run's config and the overrides its results record
    assert qs.run_overrides("ar", worker, args)["train.steps"] == "9"
    assert "--config.train.steps=9" in qs.config_args("ar", worker, args)[1]
    assert "train.steps" not in qs.run_overrides("dimba", worker, args)


def test_variant_names_and_patterns():
    from dimba_jax.evaluate.harness import variant_options
    assert variant_options("") == {}
    assert variant_options("noclamp") == {"clamp": False}
    assert variant_options("st0.65+stf1") == {"score_temperature": 0.65, "score_temperature_final": 1.0}
    assert variant_options("wf1+st0.6+noselfcond") == {"wavefront": 1.0, "score_temperature": 0.6,
                                                        "self_condition": False}
    assert variant_options("cfg2+eta0.5+temp0.9") == {"guidance": 2.0, "eta": 0.5, "temperature": 0.9}
    assert variant_options("pw0.4+pwf1") == {"prior_weight": 0.4, "prior_weight_final": 1.0}
    for bad in ("st", "stx", "foo", "st0.6+"):
        with pytest.raises(ValueError, match="unknown sampling variant"):
            variant_options(bad)


def test_to_pareto_replaces_rows_and_keeps_the_long_context_study():
    old = {"rows": [{"model": "dimba", "variant": "", "steps": 64}], "long_context": [{"L": 1024, "ms": 2.5}],
           "long_context_slope": 0.72, "notes": ["Rows measured at 0.5", "long_context rows copied from X"],
           "models": {"dimba": {"step": 4000, "workdir": "old"}}, "commands": ["old command"],
           "samples": {"old|key": ["x"]}, "details": {"old": {}}}
    study = {"rows": [{"model": "dimba", "variant": "st0.8", "steps": 64}], "reference": {"judge_ppl": 34.3},
             "reference_by_L": {"1024": {"entropy": 7.79}}, "samples": {"dimba|key": ["y"]},
             "runs": {"dimba": {"step": 4000, "workdir": "new", "noise_curve": {"ce_lam0": 0.0}}},
             "commands": ["study command"], "device": "gpu:H200 x1"}
    out = qs.to_pareto(study, old, "merge command")
    assert out["rows"] == study["rows"] and out["samples"] == study["samples"] and out["details"] == {}
    assert out["long_context"] == old["long_context"] and out["long_context_slope"] == 0.72
    assert out["notes"] == ["long_context rows copied from X"]
    assert out["models"] == {"dimba": {"step": 4000, "workdir": "new"}}  # no noise curve
    assert out["commands"] == ["study command", "merge command"]
    assert out["command"] == "study command ; merge command" and out["device"] == "gpu:H200 x1"


def test_quality_report_renders_every_committed_study(tmp_path):
    """The report runs on the committed results (CPU only) and each table carries its rows."""
    import shutil

    from benchmarks import quality_report
    results = os.path.join(ROOT, "benchmarks", "results")
    for name in os.listdir(results):
        if name.startswith("quality_") and name.endswith(".json"):
            shutil.copy(os.path.join(results, name), tmp_path / name)
    (tmp_path / "docs" / "small_run").mkdir(parents=True)
    written = quality_report.main(["--results", str(tmp_path), "--docs", str(tmp_path / "docs")])
    names = {os.path.basename(p) for p in written}
    assert {"quality_ablation_h200.md", "quality_small_h200.md", "quality_small_opt_h100.md", "noise_curves.png",
            "samples.txt"} <= names
    tiny = (tmp_path / "quality_tiny_sched_cpu.md").read_text()
    assert "| DIMBA st0.9+stf0.5 | 2539 |" in tiny and "score temperature" in tiny
    for md in (p for p in written if p.endswith(".md")):
        assert open(md).read().count("\n|") >= 3, md
    if (tmp_path / "quality_prompt_ar_h100.json").exists():
        prompt2 = (tmp_path / "quality_prompt2_h100.md").read_text()
        assert "real text itself scores 0.94x" in prompt2
        assert "quality_prompt_ar_h100.json" in prompt2


def test_noise_agreement_helpers():
    import numpy as np

    from benchmarks import noise_agreement as na
    from dimba_jax.evaluate.results import parse_named_paths
    assert na.agreement(np.array([[1, 2, 3, 4]]), np.array([[1, 0, 3, 0]])) == 0.5
    with pytest.raises(ValueError, match="equal shapes"):
        na.agreement(np.zeros((2, 3)), np.zeros((3, 2)))
    assert parse_named_paths("a=runs/x, b=m.npz") == {"a": "runs/x", "b": "m.npz"}
    for bad in ("", "a", "=x", "a="):
        with pytest.raises(ValueError, match="--models"):
            parse_named_paths(bad)


def test_likelihood_table():
    from benchmarks.likelihood import to_markdown
    doc = {"device": "cpu:cpu x1", "command": "python -m benchmarks.likelihood --models a=x", "batches": 4,
           "rows": [{"run": "d", "path": "x", "task": "dimba", "tokens_seen": 1000, "bits": 10.1234,
                     "diffusion_bits": 10.0, "recon_bits": 0.1234, "context_free_bits": 10.5},
                    {"run": "a", "path": "y", "task": "ar", "tokens_seen": 1000, "bits": 8.2}]}
    text = to_markdown(doc)
    assert "| d | dimba | 1,000 | 10.123 | 10.000 | 0.123 | 10.500 | 0.377 |" in text
    assert "| a | ar | 1,000 | 8.200 | — | — | — | — |" in text
    assert "windows each" not in text
    assert "(24 windows each, for every run)" in to_markdown(dict(doc, batch_size=24))


def test_likelihood_curve_levels_and_context_gain_plot(tmp_path):
    from benchmarks.likelihood import parse_levels
    from benchmarks.quality_report import plot_context_gain
    assert parse_levels("-10:2:0.5")[:3] == [-10.0, -9.5, -9.0] and parse_levels("-10:2:0.5")[-1] == 2.0
    assert parse_levels("-1:-1:1") == [-1.0]
    for bad in ("1:2", "2:1:1", "0:1:0"):
        with pytest.raises(ValueError, match="curve-logsnrs"):
            parse_levels(bad)
    doc = {"rows": [{"run": "d", "task": "dimba", "bits": 9.9, "context_free_bits": 10.0,
                     "curve": {"logsnr": [-4.0, -2.0], "ce_bits": [8.0, 1.0], "context_free_ce_bits": [8.1, 1.2]}},
                    {"run": "a", "task": "ar", "bits": 8.3}]}
    path = plot_context_gain({"tiny": doc}, str(tmp_path / "gain.png"))
    assert os.path.getsize(path) > 1000


def test_every_studys_overrides_name_keys_of_its_config():
    from dimba_jax.config import load_config_file

    args = qs.parse_args(["--study", "tiny", "--workdir", "w", "--out", "o.json"])
    configs = {}
    for study_name, study in qs.STUDIES.items():
        for run in study["runs"]:
            config, overrides = qs.config_args(run, study, args)
            c = configs.setdefault(config, load_config_file(config))
            for item in overrides:
                key, _, value = item.removeprefix("--config.").partition("=")
                node = c
                for part in key.split(".")[:-1]:
                    node = node[part]
                assert key.split(".")[-1] in node, f"{study_name}/{run}: unknown key {key}"
    # equal tokens: the small study's DIMBA and AR runs see the same windows
    small, ar = load_config_file("configs/small.py"), load_config_file("configs/ar_small.py")
    assert (small.train.steps, small.train.batch_size, small.data.seq_len) == (
        ar.train.steps, ar.train.batch_size, ar.data.seq_len)


def test_first_position_line_reads_the_by_position_accuracies():
    from benchmarks import quality_report
    dimba = {"context_by_position": {"-10": {"prompt": [0.2, 0.1], "noprompt": [0.05, 0.1]},
                                     "-7": {"prompt": [0.3, 0.2], "noprompt": [0.1, 0.1]}}}
    line = quality_report.first_position_line(dimba, {"acc_after_prompt_by_position": [0.31, 0.2]})
    assert "-10: 0.200/0.050" in line and "-7:" not in line and line.endswith("there: 0.310.")
    assert quality_report.first_position_line({}, {}) == ""


def test_prompt_fit_line_reads_each_runs_prompted_rows():
    from benchmarks import quality_report
    fit = {"fit_ppl_own": 50.0, "fit_ppl_other": 100.0, "fit_tokens": 32}
    res = {"runs": {"dimba": {"prompt_fit": {"dimba|ddim|64|1024|64|True|st0.8": fit,
                                             "dimba|ddim|64|1024|1|True|st0.8": fit,
                                             "dimba|ddim|64|1024|64|True|cfg2": dict(fit, fit_ppl_own=40.0),
                                             "dimba|ddim|64|1024|64|True|": fit}},
                    "ar": {"prompt_fit": {"ar|ar|1024|1024|64|True|": dict(fit, fit_ppl_own=25.0)}}}}
    line = quality_report.prompt_fit_line(res)
    assert "first 32 judge tokens" in line
    assert "dimba T = 64 st0.8 50.0 / 100.0 (0.50x)" in line and "AR 25.0 / 100.0 (0.25x)" in line
    assert "dimba T = 64 cfg2 40.0 / 100.0 (0.40x)" in line and "dimba T = 64 50.0" in line
    assert line.count("dimba T = 64 st0.8") == 1  # one cell per setting, whatever the batch
    assert quality_report.prompt_fit_line({"runs": {"dimba": {}}}) == ""


def test_bounds_from_too_few_strata_are_not_quoted():
    from benchmarks import quality_report, quality_study
    assert quality_report.MIN_BOUND_LEVELS == quality_study.MIN_BOUND_LEVELS
    assert quality_report.bound_cell({"bound_bits": 2.6, "levels": 8}).startswith("— (8 strata")
    assert quality_report.bound_cell({"bound_bits": 10.84, "levels": 32}) == "10.84"
    assert quality_report.bound_cell({"bound_bits": 10.84}) == "10.84"  # older files: levels not recorded


def test_a_run_is_measured_only_when_its_estimate_fits_the_budget_left():
    study = qs.STUDIES["small_post"]
    assert qs.too_little_time(study, "ar", 111.0) == ""
    msg = qs.too_little_time(study, "dimba", 300.0)
    assert msg.startswith("dimba not measured: 300s of the budget left") and "450s" in msg
    assert qs.too_little_time(qs.STUDIES["tiny"], "dimba", 31.0) == ""  # no estimate: 30 s
    assert "0s of the budget left" in qs.too_little_time(qs.STUDIES["tiny"], "ar", -5.0)


def test_nothing_is_measured_before_the_judge_has_finished_training(tmp_path, monkeypatch):
    monkeypatch.setattr(qs, "train_all", lambda *a, **k: {})
    monkeypatch.setattr(qs, "finished", lambda workdir: not workdir.endswith("judge"))
    out = tmp_path / "q.json"
    assert qs.main(["--study", "small_post", "--workdir", str(tmp_path), "--out", str(out)]) == {}
    assert not out.exists()


def test_rows_of_record_at_the_chosen_setting_with_guided_prompted_rows():
    specs = qs.record_specs(qs.STUDIES["small_post"], "ddim", "pw0.6+st1+stf0.8")
    got = [(s.steps, s.prompted, s.variant) for s in specs]
    assert got[:4] == [(64, False, "pw0.6+st1+stf0.8"), (16, False, "pw0.6+st1+stf0.8"),
                       (32, False, "pw0.6+st1+stf0.8"), (128, False, "pw0.6+st1+stf0.8")]
    assert got[4:] == [(64, True, "pw0.6+st1+stf0.8"), (16, True, "pw0.6+st1+stf0.8"),
                       (64, True, "pw0.6+st1+stf0.8+cfg2")]
    assert [s.variant for s in qs.record_specs(qs.STUDIES["small_post"], "ddim", "") if s.prompted] == ["", "", "cfg2"]
    assert all("cfg" not in s.variant for s in qs.record_specs(qs.STUDIES["small"], "ddim", "st0.8"))


def test_small_table_names_the_variant_of_rows_off_the_chosen_setting():
    from benchmarks import quality_report as qr
    with open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                           "quality_small_opt_h100.json")) as f:
        res = json.load(f)
    row = next(r for r in res["rows"] if r["model"] == "dimba" and r["prompted"] and r["batch"] == 1
               and r["steps"] == 64)
    res["rows"].append(dict(row, variant=row["variant"] + "+cfg2", judge_ppl=123.4))
    table = qr.small_table(res, "x.json", "t")
    assert f"| dimba | 64 ({row['variant']}+cfg2) | yes |" in table and "| 123.4 |" in table
    assert "| dimba | 64 | yes |" in table  # the row at the chosen setting keeps its plain T


def test_prompt_table_divides_each_prompted_sampler_by_its_unguided_unprompted_twin():
    from benchmarks import quality_report as qr
    assert qr.without_guidance("pw0.6+st1+stf0.8+cfg2") == "pw0.6+st1+stf0.8"
    assert qr.without_guidance("cfg3") == "" and qr.without_guidance("pw0.3+eta1") == "pw0.3+eta1"

    def row(variant, prompted, ppl, model="dimba"):
        return dict(model=model, variant=variant, prompted=prompted, batch=32, judge_ppl=ppl, entropy=7.0)
    fit = {"fit_ppl_own": 30.0, "fit_ppl_other": 60.0, "fit_tokens": 32}
    res = {"rows": [row("post", False, 400.0), row("post", True, 380.0),
                    row("post/pw0.6", False, 300.0), row("post/pw0.6", True, 270.0),
                    row("post/pw0.6+cfg3", True, 210.0),
                    row("ar", False, 50.0, "ar"), row("ar", True, 45.0, "ar")],
           "runs": {"post": {"task": "dimba", "prompt_fit": {"dimba|ddim|32|256|32|True|pw0.6+cfg3": fit}},
                    "ar": {"task": "ar", "prompt_fit": {"ar|ar|256|256|32|True|": fit}}}}
    table = qr.prompt_table(res, "quality_prompt_h100")
    assert "| post | pw0.6+cfg3 | 300 / 7.00 | 210 / 7.00 | 0.70x | 30 / 60 (0.50x) |" in table
    assert "| post | pw0.6 | 300 / 7.00 | 270 / 7.00 | 0.90x | — |" in table
    assert "| post | its default | 400 / 7.00 | 380 / 7.00 | 0.95x | — |" in table
    assert "| ar | its default | 50 / 7.00 | 45 / 7.00 | 0.90x | 30 / 60 (0.50x) |" in table
    assert "Real text after" not in table  # not measured: no sentence
    res["reference_by_L"] = {"256": {"prompted": {"ppl_prompted": 45.0, "ppl_unprompted": 60.0,
                                                  "ratio": 0.75, "prompt_len": 32}}}
    assert ("Real text after its own 32-token prompt: judge ppl 45.0 against 60.0 without it "
            "(0.75x)") in qr.prompt_table(res, "quality_prompt_h100")


def test_prompt_table_takes_the_real_text_ceiling_from_another_call():
    from benchmarks import quality_report as qr
    res = {"rows": [], "runs": {}, "reference_by_L": {"256": {"judge_ppl": 55.0}}}
    other = {"commands": ["python -m benchmarks.quality_study --study prompt --runs ar"],
             "reference_by_L": {"256": {"judge_ppl": 54.8, "prompted": {
                 "ppl_prompted": 51.0, "ppl_unprompted": 54.0, "ratio": 51.0 / 54.0,
                 "prompt_len": 32}}}}
    table = qr.prompt_table(res, "quality_prompt2_h100", (other, "quality_prompt_ar_h100"))
    assert ("Real text after its own 32-token prompt: judge ppl 51.0 against 54.0 without it "
            "(0.94x)") in table
    assert "comes from `quality_prompt_ar_h100.json`" in table and "--runs ar`" in table
    assert "agree within 0.4% on the unprompted real-text reference" in table  # 55 / 54.8: 0.36%
    assert "real text itself scores 0.94x, above the target's 0.8x" in table
    # a call holding its own entry keeps it; neither holding one: no sentence
    res["reference_by_L"]["256"]["prompted"] = dict(other["reference_by_L"]["256"]["prompted"])
    assert "comes from" not in qr.prompt_table(res, "x", (other, "quality_prompt_ar_h100"))
    del res["reference_by_L"]["256"]["prompted"], other["reference_by_L"]["256"]["prompted"]
    assert "Real text after" not in qr.prompt_table(res, "x", (other, "quality_prompt_ar_h100"))


def test_the_coordinator_asks_for_the_prompted_real_text_reference(tmp_path, monkeypatch):
    """main passes the study's prompt_len to harness.ensure_reference (its "prompted" entry)."""
    import types

    from dimba_jax.evaluate import harness
    from dimba_jax.evaluate import judge as judge_lib
    from dimba_jax.evaluate import results as results_lib
    from dimba_jax.train import inference

    class Stop(Exception):
        pass

    calls = []

    def ensure_reference(*args):
        calls.append(args)
        raise Stop

    run = types.SimpleNamespace(model=None, config=types.SimpleNamespace(
        data=types.SimpleNamespace(seq_len=256)), task=types.SimpleNamespace(tokenizer=None))
    monkeypatch.setattr(qs, "train_all", lambda *a, **k: {})
    monkeypatch.setattr(qs, "validation_texts", lambda args: [])
    monkeypatch.setattr(inference, "load_run", lambda *a, **k: run)
    monkeypatch.setattr(judge_lib, "Judge", lambda *a, **k: None)
    monkeypatch.setattr(results_lib, "device_label", lambda: "cpu: x1")
    monkeypatch.setattr(harness, "ensure_reference", ensure_reference)
    with pytest.raises(Stop):
        qs.main(["--study", "prompt", "--workdir", str(tmp_path),
                 "--out", str(tmp_path / "q.json")])
    assert calls[0][3:] == (256, 32, 2000, 256, qs.STUDIES["prompt"]["prompt_len"])


def test_ar_runs_table_lists_every_ar_run_with_its_nll_and_samples():
    """The AR-only study's page (quality_tiny_ar_head_cpu.json): one row per run with its
    held-out NLL and judged samples, tokens marked equal, the overrides named."""
    from benchmarks import quality_report as qr
    with open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                           "quality_tiny_ar_head_cpu.json")) as f:
        res = json.load(f)
    table = qr.ar_runs_table(res, "x.json")
    for name, info in res["runs"].items():
        assert f"| {name} | {info['nll_bits']:.4f} | " in table
    assert "(equal)" in table and "`ar_f32` (model.head_dtype=float32)" in table
    res["runs"]["ar_seed1"] = dict(res["runs"]["ar_seed1"], tokens_seen=1)
    assert "(UNEQUAL)" in qr.ar_runs_table(res, "x.json")
