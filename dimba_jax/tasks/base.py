"""The only thing the trainer knows about a model: the `Task` interface.

A task builds its model and computes its loss; the trainer owns sharding, optimisation,
checkpoints and the loop. DIMBA (`dimba_jax.tasks.dimba.DimbaTask`) and the autoregressive
baseline (`dimba_jax.tasks.ar.ArTask`) both implement it.
"""

from __future__ import annotations

from typing import Protocol

import jax
from flax import nnx


class Task(Protocol):
    """Model-agnostic training interface.

    Batches are dicts of arrays; every task accepts at least
    ``{"tokens": int32 (batch, seq_len)}`` (windows of token ids, documents separated by EOS).
    """

    def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """Builds the model with freshly initialised parameters (float32)."""
        ...

    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (scalar float32 loss to minimise, dict of scalar metrics for logging).

        Must be a pure function of (model state, batch, rng) so it can be jitted and
        differentiated with `nnx.value_and_grad`.
        """
        ...

    # Optional: `step_options(step) -> tuple` of (name, value) pairs, static keywords of `loss`
    # for train step `step` (the step is compiled once per distinct tuple; absent: ()), and
    # `step_option_sets() -> list[tuple]`, every tuple it can return (`train.step`'s helpers).

    def sample_text(self, model: nnx.Module, rng: jax.Array, num: int) -> list[str]:
        """Generates `num` short unprompted samples as strings (for logs at an interval)."""
        ...

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of a batch, for MFU (documented count)."""
        ...
