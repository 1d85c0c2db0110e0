"""Using a trained workdir: load the run (EMA weights), generate text, evaluate.

    run = load_run("runs/tiny")                           # config.json + newest readable checkpoint
    run = load_run("tiny.npz")                            # or a one-file export (train/export.py)
    texts = generate_text(run, ["Once upon a time"], steps=32, sampler="ddim")
    numbers = evaluate_model(run)                         # validation loss, accuracy at t

`load_run` is the one way to load a trained model: `dimba_jax.load`, the command line
(`--mode sample / eval`), evaluation and the benchmarks all come through it. With an
unreadable newest checkpoint it uses the newest readable one (a one-line warning); with none it
raises FileNotFoundError, one line naming the workdir. Single-process (the model lives on the
first local device).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import export as export_lib
from dimba_jax.train.restore import restore_model
from dimba_jax.train.tasks import make_task, make_tokenizer


@dataclasses.dataclass
class LoadedRun:
    """A trained model ready for use.

    config: the run's config (from workdir/config.json, with any overrides).
    task: the Task (DimbaTask / ArTask) built from it; task.tokenizer is the run's tokenizer.
    model: the nnx module with the loaded weights (EMA when available).
    step: the checkpoint step the weights come from.
    uses_ema: whether the weights are the EMA of the parameters.
    workdir: the run folder.
    """
    config: Any
    task: Any
    model: Any
    step: int
    uses_ema: bool = False
    workdir: str = ""


def load_run(workdir: str, step: int | None = None, prefer_ema: bool = True,
             config=None) -> LoadedRun:
    """Builds the model of `workdir` and loads a checkpoint into it.

    Args:
      workdir: a training workdir (config.json + checkpoints/), or a one-file export
        (`dimba_jax.train.export`; it holds one set of weights: step must stay None and
        prefer_ema does not apply, `uses_ema` of the result says which weights they are).
      step: checkpoint step (None = the newest readable one).
      prefer_ema: load the EMA weights when the checkpoint has them.
      config: use this config instead of workdir/config.json (e.g. with sampling overrides);
        its architecture must match the checkpoint.
    Raises:
      FileNotFoundError: no workdir, config.json or readable checkpoint (one line naming the
        workdir).
    """
    if os.path.isfile(workdir):
        if step is not None:
            raise ValueError(f"{workdir!r} is an exported model with one set of weights; no checkpoint step to choose")
        config = export_lib.read_config(workdir) if config is None else config
        task = make_task(config, make_tokenizer(config))
        model, meta = export_lib.load(workdir, task, config)
        return LoadedRun(config=config, task=task, model=model, step=int(meta["step"]),
                         uses_ema=bool(meta["uses_ema"]), workdir=str(workdir))
    config = ckpt_lib.load_config(workdir) if config is None else config
    task = make_task(config, make_tokenizer(config))
    restored = restore_model(workdir, task, config, step, prefer_ema)
    return LoadedRun(config=config, task=task, model=restored.model, step=restored.step,
                     uses_ema=restored.uses_ema, workdir=str(workdir))


def load_config(workdir: str):
    """The config of a workdir (its config.json) or of a one-file export."""
    return export_lib.read_config(workdir) if os.path.isfile(workdir) else ckpt_lib.load_config(workdir)


def export_run(run: LoadedRun, path: str, dtype: str = "bfloat16") -> str:
    """Writes `run`'s model (its weights as loaded: EMA or raw) as a one-file export; returns path."""
    return export_lib.save(path, run.config, run.model, run.step, run.uses_ema, dtype)


def check_prompts(run: LoadedRun, prompts: list[str]) -> None:
    """Raises ValueError if a prompt has more tokens than the context (config.data.seq_len)."""
    context = int(run.config.data.seq_len)
    tokenizer = run.task.tokenizer
    for i, p in enumerate(prompts):
        n = len(tokenizer.encode(p))
        if n > context:
            raise ValueError(f"prompt {i} is {n} tokens long, longer than the model's context of "
                             f"{context} tokens (data.seq_len)")


def generate_text(run: LoadedRun, prompts: list[str] | None = None, *,
                  steps: int | None = None, sampler: str | None = None,
                  length: int | None = None, seed: int = 0) -> list[str]:
    """Continuations of `prompts` (or config.sample.num_samples unprompted samples if None/empty).

    DIMBA: `steps` reverse-diffusion steps with `sampler` ("ddim"/"ddpm"), defaults from
    config.sample. AR: recurrent decoding of `length` tokens (steps/sampler do not apply).
    Returns one string per prompt (the continuation only).
    """
    cfg = run.config
    if steps is not None and int(steps) <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    prompts = list(prompts) if prompts else [""] * int(cfg.sample.num_samples)
    check_prompts(run, prompts)
    task = run.task
    length = int(cfg.sample.length if length is None else length)
    return task.generate(run.model, prompts, length=length, steps=steps, sampler=sampler, seed=seed)


def evaluate_model(run: LoadedRun, num_batches: int | None = None,
                   ts: tuple[int, ...] | None = None, log_prior=None) -> dict[str, float]:
    """Validation numbers averaged over `num_batches` (default config.train.eval_batches)
    batches of the validation split: the task's loss parts; for DIMBA the loss and the head's
    token accuracy at several noise levels (DimbaTask.eval_metrics) and the likelihood bound in
    bits per token (DimbaTask.nll_bound: bound_bits and its parts), with `log_prior` (float (V,),
    e.g. `data.pipeline.unigram_log_prior`) also the bound of the denoiser without context on
    the same strata and noise (DimbaTask.unigram_bound: context_free_bits); for the AR model its
    exact NLL in bits per token (nll_bits)."""
    from dimba_jax.data.pipeline import make_eval_batches
    cfg = run.config
    n = int(cfg.train.eval_batches if num_batches is None else num_batches)
    if n <= 0:
        raise ValueError(f"number of eval batches must be > 0, got {n}")
    batches = make_eval_batches(cfg.data, run.task.tokenizer, int(cfg.train.batch_size), n,
                                int(cfg.data.seq_len))
    task = run.task
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if hasattr(task, "eval_metrics"):
            out = task.eval_metrics(run.model, batch, ts)
            out.update(task.nll_bound(run.model, batch, rng=jax.random.PRNGKey(i)))
            if log_prior is not None and hasattr(task, "unigram_bound"):
                ref = task.unigram_bound(run.model, batch, log_prior, rng=jax.random.PRNGKey(i))
                out["context_free_bits"] = ref["bound_bits"]
        else:
            loss, metrics = nnx.jit(task.loss)(
                run.model, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(i))
            out = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
            if "ce" in out:
                out["nll_bits"] = out["ce"] / math.log(2.0)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in sums.items()}
