"""The Python API: load a trained DIMBA run and write text with it.

    import dimba_jax

    model = dimba_jax.load("runs/tiny")                 # latest checkpoint, EMA weights
    model.generate("The old man", length=64, steps=32)  # -> ["<continuation>"]
    model.generate(["", "It was", "Call me"], length=32, steps=16, sampler="ddpm")
    model.infill("The [MASK] sat on the [MASK].", span_length=4)

`load` reads the run's `config.json`, builds its tokenizer and task (`DimbaTask`), and restores
a checkpoint through `dimba_jax.train.inference.load_run` (the one loader). The returned
`Pipeline` only validates arguments and fills in defaults from the run's `config.sample`; the
work is done by `DimbaTask.generate` / `DimbaTask.infill` and the jitted reverse process in
`dimba_jax.diffusion.sampler` (one compilation per (batch, length, steps, guidance, clamp)).
"""

from __future__ import annotations

import os
from typing import Sequence

from dimba_jax.diffusion.sampler import SAMPLERS


class Pipeline:
    """A trained DIMBA model with its tokenizer and sampling defaults (what `load` returns).

    Attributes:
      config: the run's full `ml_collections.ConfigDict` (from workdir/config.json).
      task: the `DimbaTask` built from it (tokenizer, noise schedule, generate / infill).
      model: the `DimbaModel` (flax nnx module) holding the restored weights.
      tokenizer: the run's tokenizer (`encode(str) -> list[int]`, `decode(ids) -> str`).
      step: the training step of the restored checkpoint.
      workdir: the run folder it was loaded from.
      uses_ema: whether the weights are the EMA of the parameters.
    """

    def __init__(self, config, task, model, step: int, workdir: str = "", uses_ema: bool = False):
        self.config = config
        self.task = task
        self.model = model
        self.tokenizer = task.tokenizer
        self.step = int(step)
        self.workdir = workdir
        self.uses_ema = bool(uses_ema)

    # ------------------------------------------------------------------ properties
    @property
    def context_length(self) -> int:
        """Tokens of known text (prompt / infill context) a call accepts: the training window
        `config.data.seq_len`. The generated length itself is not capped (the Mamba-2 denoiser runs
        at any length), but quality is best while prompt + generation stay within this window."""
        return int(self.config.data.seq_len)

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Pipeline(workdir={self.workdir!r}, step={self.step}, ema={self.uses_ema}, "
                f"d_model={m.d_model}, n_layers={m.n_layers}, "
                f"{'bidirectional' if m.bidirectional else 'causal'}, tokenizer={self.tokenizer.name!r}, "
                f"context={self.context_length})")

    # ------------------------------------------------------------------ checks
    def _sampling_args(self, steps, sampler, eta, guidance) -> dict:
        """Validates the sampler settings shared by generate and infill; fills config.sample defaults."""
        s = self.config.sample
        sampler = s.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        steps = int(s.steps if steps is None else steps)
        big_t = int(self.config.diffusion.timesteps)
        if not 1 <= steps <= big_t:
            raise ValueError(f"steps must be in 1..{big_t} (the training T, diffusion.timesteps), got {steps}")
        eta = float(s.eta if eta is None else eta)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        guidance = float(s.guidance if guidance is None else guidance)
        return dict(steps=steps, sampler=sampler, eta=eta, guidance=guidance)

    def _check_known_length(self, what: str, n_tokens: int) -> None:
        if n_tokens > self.context_length:
            raise ValueError(f"{what} is {n_tokens} tokens long, longer than the model's context of "
                             f"{self.context_length} tokens (data.seq_len of the run)")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: str | Sequence[str] = "", length: int | None = None, steps: int | None = None,
                 sampler: str | None = None, eta: float | None = None, guidance: float | None = None,
                 clamp: bool | None = None, seed: int = 0, temperature: float | None = None) -> list[str]:
        """Continues each prompt by `length` new tokens, all positions denoised in parallel.

        All prompts go through the model as ONE batch of shape (len(prompts), max_prompt + length):
        each prompt is a clean, left-aligned prefix marked known by a per-example mask; the rest of
        its row is generated and the first `length` tokens after its prompt are returned. An empty
        prompt ("") gives an unconditional sample. Each continuation is cut at the first EOS.

        Args:
          prompts: a str or a list of str (any mix of lengths, each <= `context_length` tokens).
          length: new tokens per prompt (default config.sample.length).
          steps: reverse-diffusion steps T' in 1..diffusion.timesteps (default config.sample.steps);
            fewer = faster. Each distinct (batch, length, steps) compiles once.
          sampler: "ddim" (default) or "ddpm".
          eta: DDIM noise scale (0 = deterministic); ignored by "ddpm".
          guidance: classifier-free guidance scale (1 = conditional only, 0 = unconditional).
          clamp: snap the x0 estimate toward the embedding table at each step.
          seed: the PRNG seed (same seed and arguments -> same text).
          temperature: 0 = argmax read-out of the head; > 0 = sample tokens at this temperature.
        Returns:
          list of str, one continuation per prompt (the prompt itself not included), even when a
          single str was given.
        Raises:
          ValueError: no prompts, a prompt longer than the context, length <= 0, steps outside
            1..T, an unknown sampler, eta < 0.

        Example:
          >>> model = dimba_jax.load("runs/tiny")
          >>> model.generate(["The old man", "It was a dark and stormy night"], length=48, steps=32)
          [' was sitting ...', ', and the wind ...']
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list:
            raise ValueError("generate needs at least one prompt (use \"\" for an unconditional sample)")
        for i, p in enumerate(prompt_list):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} must be a str, got {type(p).__name__}")
            self._check_known_length(f"prompt {i}", len(self.tokenizer.encode(p)))
        length = int(self.config.sample.length if length is None else length)
        if length <= 0:
            raise ValueError(f"length must be > 0 new tokens, got {length}")
        args = self._sampling_args(steps, sampler, eta, guidance)
        return self.task.generate(self.model, prompt_list, length=length, clamp=clamp, seed=int(seed),
                                  temperature=temperature, **args)

    def infill(self, text: str, mask_token: str = "[MASK]", span_length: int = 16, steps: int | None = None,
               sampler: str | None = None, eta: float | None = None, guidance: float | None = None,
               clamp: bool | None = None, seed: int = 0, temperature: float | None = None) -> str:
        """Fills every `mask_token` in `text` with generated tokens; the rest of the text is kept exactly.

        Span length: each occurrence of `mask_token` becomes exactly `span_length` positions to
        generate (tokens of the run's tokenizer: bytes for "byte", BPE pieces for "bpe"); a filled
        span is cut at its first EOS, so it may come out shorter. The known pieces of text on both
        sides condition the fill (the model sees the whole sequence, both directions).
        Layout: one sequence [piece_0 | span | piece_1 | span | ... | piece_n] with a known-mask.
        Training shows one gap per window (a known prefix and a known suffix); several gaps work,
        but lie outside the training layouts (see dimba_jax/diffusion/layout.py).

        Args:
          text: the text with one or more `mask_token`s; its known tokens must fit the context.
          mask_token: the marker of a gap (default "[MASK]").
          span_length: positions generated per gap (> 0).
          steps, sampler, eta, guidance, clamp, seed, temperature: as in `generate`.
        Returns:
          str: `text` with every gap filled.
        Raises:
          ValueError: the mask token does not occur, span_length <= 0, the known text is longer
            than the context, steps outside 1..T, an unknown sampler.

        Example:
          >>> model.infill("The [MASK] sat on the [MASK].", span_length=5, steps=32)
          'The cat w sat on the floor.'
        """
        if not isinstance(text, str):
            raise ValueError(f"infill text must be a str, got {type(text).__name__}")
        if not mask_token or mask_token not in text:
            raise ValueError(f"the mask token {mask_token!r} does not occur in the text to infill")
        if int(span_length) <= 0:
            raise ValueError(f"span_length must be > 0, got {span_length}")
        known = sum(len(self.tokenizer.encode(piece)) for piece in text.split(mask_token))
        self._check_known_length("the known text around the masks", known)
        args = self._sampling_args(steps, sampler, eta, guidance)
        return self.task.infill(self.model, text, mask_token=mask_token, span_length=int(span_length),
                                clamp=clamp, seed=int(seed), temperature=temperature, **args)


def load(workdir: str | os.PathLike, step: int | None = None, use_ema: bool = True) -> Pipeline:
    """Loads a trained DIMBA run for generation.

    Args:
      workdir: the run folder written by training (`python -m dimba_jax.main --workdir ...` or
        `train_and_evaluate(config, workdir)`): holds config.json and checkpoints/; or a one-file
        export of a run (`--mode export`: one set of weights, so step stays None and use_ema
        does not apply).
      step: which checkpoint (a training step); None = the latest.
      use_ema: load the EMA of the parameters when the checkpoint has one (it samples better);
        False = the raw parameters.
    Returns:
      a `Pipeline` with `generate(...)` and `infill(...)`.
    Raises:
      FileNotFoundError: the workdir, its config.json, or a (matching, readable) checkpoint does
        not exist. An unreadable newest checkpoint is skipped with a one-line warning.
      ValueError: the run is not a DIMBA run (config.task != "dimba").

    Example:
      >>> import dimba_jax
      >>> model = dimba_jax.load("runs/tiny")
      >>> model.generate("Once upon a time", length=64, steps=32)[0]
    """
    from dimba_jax.train.inference import load_config, load_run

    workdir = os.fspath(workdir)
    if not os.path.exists(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist (train a model there first)")
    config = load_config(workdir)
    if str(config.task) != "dimba":
        raise ValueError(f"{workdir!r} holds a {config.task!r} run; dimba_jax.load serves DIMBA runs "
                         "(use dimba_jax.train.inference.load_run for other tasks)")
    run = load_run(workdir, step=step, prefer_ema=use_ema, config=config)
    return Pipeline(run.config, run.task, run.model, run.step, workdir, uses_ema=run.uses_ema)
