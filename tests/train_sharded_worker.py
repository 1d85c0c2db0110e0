"""Runs inside a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N (see
tests/test_train_sharding.py); prints one JSON line with its results.

  python train_sharded_worker.py equivalence          loss+grads+1 step on (2,2,2) vs 1 device
  python train_sharded_worker.py train WORKDIR STEPS DATA FSDP TENSOR LAYOUT [...]   toy runs
                                                  on meshes, LAYOUT tree or flat
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _dimba_config():
    from dimba_jax.config import default_config
    c = default_config()
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.headdim = 8
    c.model.d_state = 8
    c.model.chunk_size = 8
    c.model.time_embed_dim = 16
    c.model.ssd_impl = "xla"
    c.data.seq_len = 16
    c.train.batch_size = 8
    c.train.warmup_steps = 0
    return c


def equivalence() -> dict:
    """Same batch, same rng: loss, grads and the updated params on a (2,2,2) mesh vs 1 device."""
    from dimba_jax.train import mesh as mesh_lib
    from dimba_jax.train import optim
    from dimba_jax.train import state as state_lib
    from dimba_jax.train import step as step_lib
    from dimba_jax.train.tasks import make_task

    config = _dimba_config()
    task = make_task(config)
    parts = state_lib.model_parts(task, jax.random.PRNGKey(0))
    tx = optim.make_optimizer(config.train, parts.abstract_params, parts.logical_axes)
    tokens = np.random.default_rng(0).integers(0, 256, (8, 16)).astype(np.int32)
    results = {}
    for name, (d, f, t, devices) in {"one": (1, 1, 1, jax.devices()[:1]),
                                     "mesh": (2, 2, 2, jax.devices())}.items():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = d, f, t
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        sh, rsh = state_lib.state_shardings(parts, tx, mesh, config.mesh.axis_rules, jnp.float32, True)
        st, rest = state_lib.create_train_state(task, parts, tx, 0, sh, rsh, jnp.float32, True)
        ds = step_lib.batch_sharding(mesh, config.mesh.axis_rules)
        batch = step_lib.global_batch({"tokens": tokens}, ds)
        loss_fn = step_lib.make_loss_fn(task, parts)
        rng = jax.random.PRNGKey(7)
        grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                       in_shardings=(sh.params, rsh, ds, mesh_lib.replicated(mesh)))
        (loss, _), grads = grad(st.params, rest, batch, rng)
        sharded = sorted({str(x.sharding.spec) for x in jax.tree.leaves(st.params)})
        results[name] = (float(loss), jax.device_get(grads), sharded)
    (l1, g1, _), (l8, g8, specs) = results["one"], results["mesh"]
    gdiff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
                for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)))
    return {"devices": jax.device_count(), "loss_one": l1, "loss_mesh": l8,
            "grad_rel_diff": gdiff, "mesh_specs": specs}


def train(workdir: str, steps: int, data: int, fsdp: int, tensor: int, layout: str) -> dict:
    """The toy task on a given mesh and parameter layout (constant lr so runs of different
    lengths agree)."""
    from train_toy import ToyTask, toy_config, toy_factories
    from dimba_jax.train.loop import train_and_evaluate
    config = toy_config(steps, checkpoint_every=3, warmup_steps=0, final_lr_frac=1.0,
                        param_layout=layout)
    config.model.d_model = 32
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    dfac, efac = toy_factories()
    out = train_and_evaluate(config, workdir, task=ToyTask(config), data_factory=dfac,
                             eval_factory=efac)
    return {"devices": jax.device_count(), "start_step": out["start_step"], "step": out["step"]}


if __name__ == "__main__":
    if sys.argv[1] == "equivalence":
        result = equivalence()
    else:  # train WORKDIR STEPS DATA FSDP TENSOR LAYOUT [WORKDIR STEPS ...]
        args = sys.argv[2:]
        result = [train(args[i], *map(int, args[i + 1:i + 5]), args[i + 5])
                  for i in range(0, len(args), 6)]
    print("RESULT " + json.dumps(result))
