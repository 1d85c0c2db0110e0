"""`python -m dimba_jax.main`: train a few steps, sample, eval in a temp dir; and the errors
(unknown key with suggestions, missing workdir/checkpoint, prompt too long, steps <= 0,
an incompatible workdir) exit non-zero and leave the workdir untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dimba_jax.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/tiny.py", "--config.model.d_model=32", "--config.model.n_layers=1",
        "--config.data.seq_len=32", "--config.train.batch_size=4", "--config.train.steps=3",
        "--config.train.checkpoint_every=2", "--config.train.log_every=1",
        "--config.sample.length=16", "--config.sample.steps=4", "--config.sample.num_samples=1",
        "--config.train.eval_batches=1"]


def _snapshot(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("cli") / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "dimba_jax.main", *TINY, "--workdir", work],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done: step 3" in proc.stdout
    return work


def test_train_writes_config_metrics_samples_and_checkpoints(trained):
    cfg = json.load(open(os.path.join(trained, "config.json")))
    assert cfg["model"]["d_model"] == 32 and cfg["train"]["steps"] == 3
    steps = [json.loads(l)["step"] for l in open(os.path.join(trained, "metrics.jsonl"))
             if json.loads(l)["split"] == "train"]
    assert steps == [1, 2, 3]
    assert "=== step 3" in open(os.path.join(trained, "samples.txt")).read()
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["2", "3"]
    assert any(f.startswith("events") for f in os.listdir(os.path.join(trained, "tensorboard")))


def test_sample_and_eval_print_results_and_write_nothing(trained, capsys):
    before = _snapshot(trained)
    assert main(["--workdir", trained, "--mode", "sample", "--prompt", "The sea", "--steps", "3",
                 "--sampler", "ddpm", "--length", "8"]) == 0
    out = capsys.readouterr().out
    assert "--- sample 0 (step 3) ---" in out and "\nThe sea" in out
    assert main(["--workdir", trained, "--mode", "sample", "--config.sample.num_samples=2",
                 "--steps", "2"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2
    assert main(["--workdir", trained, "--mode", "eval"]) == 0
    out = capsys.readouterr().out
    assert "eval at step 3" in out and " loss = " in out and "acc_lam" in out and "bound_bits" in out
    assert _snapshot(trained) == before


def test_errors_are_clear_nonzero_and_overwrite_nothing(trained, tmp_path, capsys):
    before = _snapshot(trained)
    assert main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "x"),
                 "--config.train.stpes=3"]) == 2
    assert "unknown config key --config.train.stpes; did you mean --config.train.steps" \
        in capsys.readouterr().err
    assert main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "x"),
                 "--config.model.d_modle=3"]) == 2
    assert "--config.model.d_model" in capsys.readouterr().err
    assert main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "x"),
                 "--config.train.steps=many"]) == 2
    assert "expected int" in capsys.readouterr().err
    assert main([*TINY, "--workdir", str(tmp_path / "x"), "--config.train.steps=0"]) == 2
    assert "train.steps must be > 0" in capsys.readouterr().err
    assert main(["--workdir", str(tmp_path / "missing"), "--mode", "sample"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--workdir", str(tmp_path / "empty"), "--mode", "eval"]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert main(["--workdir", trained, "--mode", "sample", "--prompt", "word " * 40]) == 2
    assert "longer than the model's context of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--workdir", trained, "--mode", "sample", "--steps", "0"])
    assert e.value.code == 2 and "--steps must be > 0" in capsys.readouterr().err
    assert main([*TINY, "--workdir", trained, "--config.model.d_model=48"]) == 2
    assert "different architecture" in capsys.readouterr().err
    assert _snapshot(trained) == before
    assert not (tmp_path / "x").exists()


def test_help_lists_modes_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "sample", "eval", "--prompt", "--steps", "--sampler", "--config.SECTION.FIELD"):
        assert word in out


def test_a_start_that_fails_before_its_first_step_leaves_nothing(tmp_path, capsys):
    """A bad data source fails while the data pipeline is built, before anything is written: the
    workdir is not created, so a corrected rerun starts a fresh run."""
    work = tmp_path / "bad_source"
    assert main([*TINY, "--workdir", str(work), "--config.data.source=tfds:nonexistent_ds"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "nonexistent_ds" in err
    assert not work.exists()


def test_config_json_records_the_settings_a_run_trains_with(tmp_path, caplog):
    from dimba_jax.config import default_config
    from dimba_jax.train import checkpoint as ckpt_lib

    work = str(tmp_path / "run")
    config = default_config()
    ckpt_lib.check_config(work, config)
    ckpt_lib.write_config(work, config)
    saved = lambda: json.load(open(os.path.join(work, "config.json")))  # noqa: E731
    assert saved()["train"]["steps"] == config.train.steps
    # a changed setting (resume with more steps, or a corrected rerun) is recorded and logged
    config.train.steps = 12345
    config.data.source = "files:other/*.txt"
    caplog.set_level("INFO")
    ckpt_lib.check_config(work, config)
    ckpt_lib.write_config(work, config)
    assert saved()["train"]["steps"] == 12345 and saved()["data"]["source"] == "files:other/*.txt"
    assert "config.json updated" in caplog.text and "12345" in caplog.text
    # without a checkpoint another architecture simply replaces a leftover config.json ...
    config.model.d_model = 48
    ckpt_lib.check_config(work, config)
    # ... with one, resuming it is refused
    os.makedirs(os.path.join(work, "checkpoints", "5"))
    config.model.d_model = 64
    with pytest.raises(ValueError, match="different architecture"):
        ckpt_lib.check_config(work, config)


def test_export_round_trip_and_bad_files(trained, tmp_path, capsys):
    import numpy as np

    from dimba_jax.train import inference

    before = _snapshot(trained)
    f32, bf16 = str(tmp_path / "m32.npz"), str(tmp_path / "m16.npz")
    assert main(["--workdir", trained, "--mode", "export", "--out", f32, "--export-dtype", "float32"]) == 0
    assert "exported step 3 (EMA weights, float32)" in capsys.readouterr().out
    assert main(["--workdir", trained, "--mode", "export", "--out", bf16]) == 0
    capsys.readouterr()
    assert _snapshot(trained) == before
    ref = inference.load_run(trained)
    for path, tol in ((f32, 0.0), (bf16, 2 ** -8)):
        run = inference.load_run(path)
        assert run.step == 3 and run.uses_ema and run.config.model.d_model == 32
        a = {k: np.asarray(v) for k, v in _flat_params(ref.model).items()}
        b = {k: np.asarray(v) for k, v in _flat_params(run.model).items()}
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            assert b[k].dtype == a[k].dtype
            np.testing.assert_allclose(b[k], a[k], rtol=tol, atol=1e-30 if tol == 0 else 1e-6, err_msg=k)
    # the exported file samples and evaluates like a workdir; the float32 one gives the same text
    assert main(["--workdir", f32, "--mode", "sample", "--prompt", "The sea", "--steps", "3", "--length", "8"]) == 0
    from_file = capsys.readouterr().out
    assert main(["--workdir", trained, "--mode", "sample", "--prompt", "The sea", "--steps", "3", "--length", "8"]) == 0
    assert capsys.readouterr().out == from_file
    assert main(["--workdir", bf16, "--mode", "eval"]) == 0
    assert "bound_bits" in capsys.readouterr().out
    # bad files: one line each, non-zero
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["--workdir", str(tmp_path / "junk.npz"), "--mode", "sample"]) == 2
    assert "damaged or not a dimba_jax export" in capsys.readouterr().err
    assert main(["--workdir", bf16, "--mode", "sample", "--config.model.d_model=48"]) == 2
    assert "shape" in capsys.readouterr().err
    assert main(["--workdir", bf16, "--mode", "eval", "--checkpoint-step", "2"]) == 2
    assert "no checkpoint step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--workdir", trained, "--mode", "export"])
    assert "--out" in capsys.readouterr().err


def _flat_params(model):
    from flax import nnx
    return {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_the_api_loads_an_export(trained, tmp_path):
    import dimba_jax

    path = str(tmp_path / "m.npz")
    assert main(["--workdir", trained, "--mode", "export", "--out", path, "--export-dtype", "float32"]) == 0
    a = dimba_jax.load(path).generate("The sea", length=8, steps=3)
    b = dimba_jax.load(trained).generate("The sea", length=8, steps=3)
    assert a == b and len(a) == 1
