"""Building the evaluated models: from a training workdir, or fresh (random weights) from a config.

``load_model(workdir)`` reads the run's ``config.json``, builds its task's model (DIMBA or the
AR LM, per ``config.task``) with the checkpoint's parameters (the EMA when present), via
``dimba_jax.train.inference.load_model_for_inference``. ``fresh_model(config)`` builds the
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


def load_model(workdir: str, step: int | None = None, *, prefer_ema: bool = True
               ) -> tuple[nnx.Module, Any, Any, Any, int]:
    """Loads a trained model from a workdir (``dimba_jax.train.inference``; EMA when present).

    Returns (model, task, config, tokenizer, step). FileNotFoundError when the workdir, its
    config.json or a finished checkpoint is missing.
    """
    from dimba_jax.train.inference import load_model_for_inference

    bundle = load_model_for_inference(workdir, step=step, prefer_ema=prefer_ema)
    return bundle.model, bundle.task, bundle.config, bundle.task.tokenizer, int(bundle.step)


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars of `model`."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
