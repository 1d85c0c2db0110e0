"""Sharding on 8 fake CPU devices (subprocesses: the pytest process already has 1 device).

* DIMBA's loss and gradients on a (data=2, fsdp=2, tensor=2) mesh equal those on one device;
* the toy task trains to the same losses on the mesh as on one device;
* a checkpoint written on 8 devices restores onto 4 devices (another mesh, or 4-way data
  parallelism with the flat parameter layout) and training continues with the losses of the
  uninterrupted 8-device run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dimba_jax.train.loop import train_and_evaluate
from dimba_jax.train.metrics import read_metrics
from train_toy import ToyTask, toy_config, toy_factories

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(devices: int, *args: str) -> object:
    env = dict(os.environ)
    # Optimisation level 0 only shortens XLA:CPU compilation; results are compared with tolerances.
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train_sharded_worker.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_dimba_loss_and_grads_on_a_2x2x2_mesh_equal_one_device():
    out = _worker(8, "equivalence")
    assert out["devices"] == 8
    assert out["loss_mesh"] == pytest.approx(out["loss_one"], rel=1e-5)
    assert out["grad_rel_diff"] < 1e-4
    specs = " ".join(out["mesh_specs"])  # parameters really are split over fsdp and tensor
    assert "'fsdp'" in specs and "'tensor'" in specs


def test_mesh_training_matches_one_device_and_restores_onto_fewer_devices(tmp_path):
    ref8, cut = str(tmp_path / "ref8"), str(tmp_path / "cut")
    runs = _worker(8, "train", ref8, "6", "2", "2", "2", "tree", cut, "3", "2", "2", "2", "tree")
    assert [r["step"] for r in runs] == [6, 3] and runs[0]["devices"] == 8
    flat = str(tmp_path / "flat")
    shutil.copytree(cut, flat)
    resumed = _worker(4, "train", cut, "6", "2", "2", "1", "tree", flat, "6", "4", "1", "1", "flat")
    assert resumed == [{"devices": 4, "start_step": 3, "step": 6}] * 2

    config = toy_config(6, checkpoint_every=3, warmup_steps=0, final_lr_frac=1.0)
    config.model.d_model = 32
    data, evals = toy_factories()
    train_and_evaluate(config, str(tmp_path / "ref1"), task=ToyTask(config), data_factory=data,
                       eval_factory=evals)

    one = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "ref1"))}
    eight = {r["step"]: r["loss"] for r in read_metrics(ref8)}
    moved = {r["step"]: r["loss"] for r in read_metrics(cut)}
    data4 = {r["step"]: r["loss"] for r in read_metrics(flat)}  # data-parallel, flat params
    assert sorted(moved) == sorted(data4) == list(range(1, 7))
    for s in range(1, 7):
        assert eight[s] == pytest.approx(one[s], rel=1e-5)
        assert moved[s] == pytest.approx(eight[s], rel=1e-5)
        assert data4[s] == pytest.approx(eight[s], rel=1e-5)
    assert all(moved[s] == eight[s] for s in (1, 2, 3))  # same mesh, same program: bitwise
