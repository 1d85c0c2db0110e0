"""`ArTask`: the causal Mamba-2 LM baseline (`dimba_jax.models.ar.MambaLM`) as a `Task`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.interop.checkpoint import load_into_lm
from dimba_jax.interop.mamba_ssm import padded_vocab
from dimba_jax.models import flops
from dimba_jax.models.ar import MambaLM, ar_setting, generate, lm_from_config, next_token_metrics


class ArTask:
    """`Task` for the causal Mamba-2 LM baseline (same blocks, data and trainer as DIMBA).

    Args:
      config: the full config (`dimba_jax.config.default_config()` shape); uses config.model,
        config.train.param_dtype, config.sample.length and config.ar.*.
      tokenizer: provides vocab_size, eos_id and decode(ids) (dimba_jax.data.tokenizers).
      vocab_size: overrides tokenizer.vocab_size (then tokenizer may be None; no sample_text).

    Batches: {"tokens": int32 (batch, seq_len)}; the loss predicts tokens[:, 1:] from the
    prefixes before them (documents are EOS-separated windows; every position counts). The
    model reads all seq_len tokens and the last position's logits are dropped: causal, so the
    same predictions as reading tokens[:, :-1], at the batch's own length (a power of two, as
    the fused mixer kernels' row blocks and the SSD chunks want; seq_len - 1 is odd).
    If config.model.init_from_mamba_ssm is set, `init_model` loads that checkpoint's weights.
    """

    def __init__(self, config, tokenizer=None, *, vocab_size: int | None = None):
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("ArTask needs a tokenizer or an explicit vocab_size")
            vocab_size = tokenizer.vocab_size
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.pad_multiple = int(ar_setting(config, "pad_vocab_size_multiple", 16))

    def init_model(self, rngs: nnx.Rngs) -> MambaLM:
        """A freshly initialised MambaLM (or one loaded from config.model.init_from_mamba_ssm)."""
        model = lm_from_config(self.config.model, self.vocab_size,
                               param_dtype=self.config.train.param_dtype, rngs=rngs,
                               pad_vocab_size_multiple=self.pad_multiple)
        ckpt = self.config.model.init_from_mamba_ssm
        if ckpt:
            load_into_lm(model, ckpt)
        return model

    def loss(self, model: MambaLM, batch, rng):
        """Next-token cross-entropy. Returns (ce float32, {"ce", "accuracy"})."""
        del rng
        tokens = batch["tokens"]
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"ArTask.loss: tokens must be (batch, seq_len >= 2), got "
                             f"{tokens.shape}")
        logits = model(tokens)[:, :-1]
        ce, accuracy = next_token_metrics(logits, tokens[:, 1:])
        return ce, {"ce": ce, "accuracy": accuracy}

    def _write(self, model: MambaLM, prompt_ids, num_new: int, rng: jax.Array) -> list[str]:
        """prompt_ids int (batch, P) -> `num_new` new tokens per row at the config.ar sampling
        settings, decoded and cut at the first EOS (one string per row)."""
        if self.tokenizer is None:
            raise ValueError("ArTask needs the tokenizer given to the constructor to write text")
        eos = self.tokenizer.eos_id
        ids = np.asarray(generate(model, prompt_ids, num_new, rng,
                                  temperature=float(ar_setting(self.config, "temperature", 1.0)),
                                  top_p=float(ar_setting(self.config, "top_p", 0.95))))
        texts = []
        for row in ids:
            stop = np.flatnonzero(row == eos)
            texts.append(self.tokenizer.decode(row[:stop[0]] if stop.size else row))
        return texts

    def sample_text(self, model: MambaLM, rng: jax.Array, num: int) -> list[str]:
        """`num` unprompted samples (start token EOS) of config.sample.length tokens, cut at EOS."""
        if self.tokenizer is None:
            raise ValueError("ArTask.sample_text needs the tokenizer given to the constructor")
        prompt = jnp.full((num, 1), self.tokenizer.eos_id, jnp.int32)
        return self._write(model, prompt, int(self.config.sample.length), rng)

    def generate(self, model: MambaLM, prompts: list[str], length: int | None = None,
                 seed: int = 0, **unused) -> list[str]:
        """Continues each prompt (after a start token EOS) by `length` tokens (default
        config.sample.length), one recurrent decode per prompt at key PRNGKey(seed); returns the
        continuations cut at the first EOS. `unused` takes the diffusion sampler's settings
        (steps, sampler, ...), which do not apply to the AR model."""
        del unused
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        length = int(self.config.sample.length if length is None else length)
        out = []
        for p in prompts:
            ids = np.asarray([[self.tokenizer.eos_id] + self.tokenizer.encode(p)], np.int32)
            out += self._write(model, ids, length, jax.random.PRNGKey(seed))
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 3 x (n_layers causal Mamba-2 blocks + the V_pad x d head),
        counted by `dimba_jax.models.flops` (matmul multiply-adds as 2 FLOPs)."""
        v_pad = padded_vocab(self.vocab_size, self.pad_multiple)
        fwd = flops.mamba2_lm_forward_flops(self.config.model, vocab_size=v_pad, seq_len=seq_len)
        return flops.training_flops(fwd)
