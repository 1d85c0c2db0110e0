"""A task's model with the weights of a training workdir, on the first local device.

`restore_model(workdir, task, config)` builds the task's model structure (no initialisation
work beyond `jax.eval_shape`), restores the newest readable checkpoint (or `step`) into it,
EMA weights when present, and returns it. The run loader (`dimba_jax.train.inference.load_run`)
and the frozen prompt encoder's donor run (`dimba_jax.train.tasks`) both come through here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class RestoredModel:
    """model: the nnx module with the checkpoint's weights; step: the checkpoint's training step;
    uses_ema: whether the weights are the EMA of the parameters."""
    model: Any
    step: int
    uses_ema: bool


def restore_model(workdir: str, task, config, step: int | None = None,
                  prefer_ema: bool = True) -> RestoredModel:
    """`task`'s model with the parameters of `workdir`'s checkpoint.

    Args:
      workdir: a training workdir (checkpoints/).
      task: the run's Task (builds the model structure).
      config: the run's config (seed, train.param_dtype).
      step: checkpoint step; None = the newest readable one (an unreadable newer one is skipped
        with a one-line warning).
      prefer_ema: the EMA weights when the checkpoint has them.
    Raises:
      FileNotFoundError: no workdir, no checkpoint, no readable checkpoint or no such step (one
        line naming the workdir).
    """
    parts = state_lib.model_parts(task, jax.random.PRNGKey(int(config.seed)))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = state_lib.cast_floats(parts.abstract_params, jnp.dtype(config.train.param_dtype))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            abstract)
    loaded = ckpt_lib.load_params_for_inference(workdir, step, prefer_ema, abstract)
    rest_shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(parts.rest_template))
    rest = state_lib.init_rest(task, parts, int(config.seed), rest_shardings)
    return RestoredModel(model=parts.merge(loaded.params, rest), step=loaded.step,
                         uses_ema=loaded.uses_ema)
