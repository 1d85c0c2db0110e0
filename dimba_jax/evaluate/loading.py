"""Evaluated models with random weights, and their size.

``fresh_model(config)`` builds the task's model (DIMBA or the AR LM, per ``config.task``) with
random weights (smoke tests, the long-context study). A trained model comes from
``dimba_jax.train.inference.load_run(workdir)``.
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


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars of `model`."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
