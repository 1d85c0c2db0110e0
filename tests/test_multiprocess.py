"""`launch/local.sh 2`: two localhost processes joined by jax.distributed train, checkpoint (with
each process's data-iterator state) and resume. The model is the toy task (fast to compile) on
the real data pipeline of configs/tiny.py; the DIMBA model itself is exercised by test_cli.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dimba_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/tiny.py", "--config.task=train_toy:ToyTask",
         "--config.data.seq_len=16", "--config.train.batch_size=4", "--config.train.eval_batches=1",
         "--config.sample.num_samples=1", "--config.train.log_every=1",
         "--config.train.checkpoint_every=3"]


def _local(workdir, steps, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", *SMALL,
                           "--workdir", str(workdir), f"--config.train.steps={steps}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    return proc


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    work = tmp_path / "run"
    first = _local(work, 6, tmp_path)
    assert "'data': 2" in first.stderr and "2 processes" in first.stderr  # one global mesh
    ck = work / "checkpoints"
    assert sorted(int(p.name) for p in ck.iterdir()) == [3, 6]
    states = [json.loads((ck / "6" / "data" / f"process_{i}-of-2.json").read_text()) for i in (0, 1)]
    assert all(s["kind"] == "json" for s in states)

    second = _local(work, 10, tmp_path)
    assert "resumed from step 6" in second.stderr
    steps = [r["step"] for r in read_metrics(str(work))]
    assert steps == list(range(1, 11))  # process 0 logged every step once, across both runs
    assert 10 in [int(p.name) for p in ck.iterdir()]
    assert json.loads((work / "config.json").read_text())["train"]["steps"] == 6  # kept
