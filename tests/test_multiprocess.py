"""`launch/local.sh 2`: two localhost processes joined by jax.distributed train with a periodic
checkpoint, are stopped by SIGTERM (both save the same step, each with its own data-iterator
state, and exit 0), and a second launch resumes from that step. The model is the toy task (fast
to compile) on the real data pipeline of configs/tiny.py; DIMBA itself runs in test_cli.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from dimba_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/tiny.py", "--config.task=train_toy:ToyTask",
         "--config.data.seq_len=16", "--config.train.batch_size=4", "--config.train.eval_batches=1",
         "--config.sample.num_samples=1", "--config.train.log_every=1",
         "--config.train.checkpoint_every=3"]


def _launch(workdir, steps, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one CPU device each, compiled fast
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", *SMALL,
                             "--workdir", str(workdir), f"--config.train.steps={steps}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:] + out[-2000:]
    return out, err


def test_two_processes_train_checkpoint_sigterm_and_resume(tmp_path):
    work = tmp_path / "run"
    proc = _launch(work, 100000, tmp_path)
    deadline = time.time() + 300
    while len(read_metrics(str(work))) < 4:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # local.sh forwards it to both processes
    out, err = _finish(proc)
    assert "'data': 2" in err and "2 processes" in err  # one global mesh over both processes
    assert "preempted; checkpoint saved" in out
    assert "train:" in err  # the progress bar: on process 0 only
    assert "train:" not in (tmp_path / "logs" / "process_1.log").read_text()
    ck = work / "checkpoints"
    saved = sorted(int(p.name) for p in ck.iterdir())
    stop = saved[-1]
    assert stop >= 4 and saved[:-1] and all(s % 3 == 0 for s in saved[:-1])  # interval saves
    for i in (0, 1):  # each process saved its own data-iterator state for that step
        state = json.loads((ck / str(stop) / "data" / f"process_{i}-of-2.json").read_text())
        assert state["kind"] == "json"

    out, err = _finish(_launch(work, stop + 3, tmp_path))
    assert f"resumed from step {stop}" in err and f"done: step {stop + 3}" in out
    assert [r["step"] for r in read_metrics(str(work))] == list(range(1, stop + 4))
    assert json.loads((work / "config.json").read_text())["train"]["steps"] == stop + 3  # recorded
