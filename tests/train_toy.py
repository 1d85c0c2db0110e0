"""A toy Task and data stream for the trainer's tests (fast to compile, exercises every path).

ToyTask: a bigram LM with a hidden MLP and SSM-like 1-D parameters (A_log, D), all annotated
with logical axes, and a loss that uses its rng (random token dropout), so resume tests see the
per-step randomness. A batch may carry "scale" (float32 (b,)); the loss is multiplied by its
mean, so a NaN scale makes that step's loss non-finite (the NaN-abort test).

ToyData: a deterministic stream of {"tokens": int32 (local_batch, seq_len)} with
get_state()/set_state(); `nan_at` makes the batch of that (1-based) call carry scale = NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB = 24


class ToyModel(nnx.Module):
    def __init__(self, d: int, vocab: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.1)
        self.embed = nnx.Param(nnx.with_partitioning(init, ("vocab", "embed"))(rngs.params(), (vocab, d)))
        self.w1 = nnx.Param(nnx.with_partitioning(init, ("embed", "mlp"))(rngs.params(), (d, 2 * d)))
        self.w2 = nnx.Param(nnx.with_partitioning(init, ("mlp", "embed"))(rngs.params(), (2 * d, d)))
        self.A_log = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("heads",))(rngs.params(), (4,)))
        self.D = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("heads",))(rngs.params(), (4,)))
        self.norm = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("embed",))(rngs.params(), (d,)))

    def __call__(self, ids):
        h = self.embed[...][ids]
        h = h + jnp.tanh(h @ self.w1[...]) @ self.w2[...] * jnp.mean(self.D[...] * jnp.exp(-jnp.exp(self.A_log[...])))
        h = h * self.norm[...]
        return h @ self.embed[...].T


class ToyTask:
    """Task interface (init_model / loss / sample_text / flops_per_token) for tests."""

    def __init__(self, config, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.d = int(config.model.d_model)
        self.vocab = VOCAB if tokenizer is None else int(tokenizer.vocab_size)
        self.dropout = 0.1  # fraction of input tokens zeroed at random (uses the step rng)

    def init_model(self, rngs):
        return ToyModel(self.d, self.vocab, rngs)

    def loss(self, model, batch, rng):
        tokens = batch["tokens"]
        keep = jax.random.bernoulli(rng, 1.0 - self.dropout, tokens[:, :-1].shape)
        inputs = jnp.where(keep, tokens[:, :-1], 0)
        logits = model(inputs).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, -1)
        picked = jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        ce = jnp.mean(logz - picked)
        loss = ce * (jnp.mean(batch["scale"]) if "scale" in batch else 1.0)
        return loss, {"ce": ce, "keep": jnp.mean(keep.astype(jnp.float32))}

    def sample_text(self, model, rng, num):
        ids = jax.random.randint(rng, (num, 4), 0, self.vocab)
        nxt = jnp.argmax(model(ids), -1)
        return [" ".join(str(int(i)) for i in row) for row in np.asarray(nxt)]

    def flops_per_token(self, seq_len):
        d = self.d
        return 3.0 * (2 * d * 2 * d * 2 + 2 * d * self.vocab)


class ToyData:
    """Deterministic token windows: call n gives rows derived from (seed, n, process)."""

    def __init__(self, local_batch: int, seq_len: int, seed: int = 0, process_index: int = 0,
                 nan_at: int | None = None):
        self.local_batch, self.seq_len, self.seed = local_batch, seq_len, seed
        self.process_index, self.nan_at = process_index, nan_at
        self.calls = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        rng = np.random.default_rng([self.seed, self.calls, self.process_index])
        start = rng.integers(0, VOCAB, (self.local_batch, 1))
        tokens = (start + np.arange(self.seq_len)[None] * rng.integers(1, 3, (self.local_batch, 1))) % VOCAB
        scale = np.full((self.local_batch,), np.nan if self.calls == self.nan_at else 1.0, np.float32)
        return {"tokens": tokens.astype(np.int32), "scale": scale}

    def get_state(self):
        return {"calls": self.calls}

    def set_state(self, state):
        self.calls = int(state["calls"])


def toy_config(steps: int = 8, **train):
    """A default config shrunk for the toy task."""
    from dimba_jax.config import default_config
    c = default_config()
    c.task = "train_toy:ToyTask"
    c.model.d_model = 16
    c.data.seq_len = 12
    c.train.steps = steps
    c.train.batch_size = 8
    c.train.warmup_steps = 2
    c.train.lr = 1e-2
    c.train.log_every = 1
    c.train.checkpoint_every = 0
    c.train.eval_batches = 0  # no eval / samples by default: each costs a compilation
    c.train.async_checkpointing = True
    c.sample.num_samples = 0
    for k, v in train.items():
        c.train[k] = v
    return c


def toy_factories(nan_at: int | None = None):
    """(data_factory, eval_factory) for `train_and_evaluate` using ToyData."""
    def data(config, tokenizer, pid, nproc):
        return ToyData(int(config.train.batch_size) // nproc, int(config.data.seq_len),
                       int(config.seed), pid, nan_at)

    def evals(config, tokenizer, pid, nproc):
        it = ToyData(int(config.train.batch_size) // nproc, int(config.data.seq_len), 999, pid)
        return [next(it) for _ in range(int(config.train.eval_batches))]
    return data, evals
