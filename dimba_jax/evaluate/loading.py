"""Building the evaluated models: from a training workdir, or fresh (random weights) from a config.

``load_model(workdir)`` reads the run's ``config.json``, builds its task's model (DIMBA or the
AR LM, per ``config.task``) and copies in the checkpoint's parameters (the EMA when present),
via ``dimba_jax.train.checkpoint.load_params_for_inference``. ``fresh_model(config)`` builds the
same model with random weights (smoke tests, the long-context study).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def fresh_model(config: Any, tokenizer: Any | None = None, seed: int = 0) -> tuple[nnx.Module, Any, Any]:
    """(model with random weights, task, tokenizer) for `config` (tokenizer from config.data)."""
    from dimba_jax.data.tokenizers import get_tokenizer
    from dimba_jax.train.tasks import make_task

    tokenizer = tokenizer or get_tokenizer(config.data.tokenizer)
    task = make_task(config, tokenizer)
    return task.init_model(nnx.Rngs(seed)), task, tokenizer


def _lookup(tree: Any, path: tuple) -> Any:
    node = tree
    for key in path:
        if isinstance(node, dict):
            if key in node:
                node = node[key]
            elif str(key) in node:
                node = node[str(key)]
            else:
                raise KeyError(key)
        else:
            node = node[int(key)]
    return node


def copy_params_into(model: nnx.Module, params: Any) -> None:
    """Overwrites every nnx.Param of `model` with the same-path leaf of the nested dict `params`.

    Dict keys may be strings where the model's path has ints (orbax restores keys as strings).
    Raises ValueError naming the first missing path or shape mismatch.
    """
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        try:
            value = _lookup(params, tuple(path))
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"checkpoint lacks parameter {'/'.join(map(str, path))}") from None
        current = var[...] if hasattr(var, "__getitem__") else var.value
        if tuple(np.shape(value)) != tuple(current.shape):
            raise ValueError(f"parameter {'/'.join(map(str, path))}: checkpoint shape "
                             f"{np.shape(value)} != model shape {current.shape}")
        var.value = jax.numpy.asarray(value, current.dtype)


def load_model(workdir: str, step: int | None = None, *, prefer_ema: bool = True
               ) -> tuple[nnx.Module, Any, Any, Any, int]:
    """Loads a trained model from a workdir.

    Returns (model, task, config, tokenizer, step). FileNotFoundError when the workdir, its
    config.json or a finished checkpoint is missing.
    """
    from dimba_jax.train.checkpoint import load_config, load_params_for_inference

    config = load_config(workdir)
    model, task, tokenizer = fresh_model(config)
    params, step = load_params_for_inference(workdir, step=step, prefer_ema=prefer_ema)
    copy_params_into(model, params)
    return model, task, config, tokenizer, step


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars of `model`."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
