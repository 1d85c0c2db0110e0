"""Using a trained workdir: load the model (EMA weights), generate text, evaluate.

    bundle = load_model_for_inference("runs/tiny")           # config.json + latest checkpoint
    texts = generate_text(bundle, ["Once upon a time"], steps=32, sampler="ddim")
    numbers = evaluate_model(bundle)                          # validation loss, accuracy at t

Single-process (the model lives on the first local device).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import state as state_lib
from dimba_jax.train.tasks import make_task, make_tokenizer


@dataclasses.dataclass
class InferenceBundle:
    """A trained model ready for use.

    config: the run's config (from workdir/config.json, with any overrides).
    task: the Task (DimbaTask / ArTask) built from it.
    model: the nnx module with the loaded weights (EMA when available).
    step: the checkpoint step the weights come from.
    """
    config: Any
    task: Any
    model: Any
    step: int


def load_model_for_inference(workdir: str, step: int | None = None, prefer_ema: bool = True,
                             config=None) -> InferenceBundle:
    """Builds the model of `workdir` and loads a checkpoint into it.

    Args:
      workdir: a training workdir (config.json + checkpoints/).
      step: checkpoint step (None = latest).
      prefer_ema: load the EMA weights when the checkpoint has them.
      config: use this config instead of workdir/config.json (e.g. with sampling overrides);
        its architecture must match the checkpoint.
    Raises:
      FileNotFoundError: no workdir, config.json or checkpoint.
    """
    config = ckpt_lib.load_config(workdir) if config is None else config
    tokenizer = make_tokenizer(config)
    task = make_task(config, tokenizer)
    parts = state_lib.model_parts(task, jax.random.PRNGKey(int(config.seed)))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = state_lib.cast_floats(parts.abstract_params, jnp.dtype(config.train.param_dtype))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            abstract)
    params, loaded_step = ckpt_lib.load_params_for_inference(workdir, step, prefer_ema, abstract)
    rest_shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(parts.rest_template))
    rest = state_lib.init_rest(task, parts, int(config.seed), rest_shardings)
    return InferenceBundle(config=config, task=task, model=parts.merge(params, rest),
                           step=loaded_step)


def check_prompts(bundle: InferenceBundle, prompts: list[str]) -> None:
    """Raises ValueError if a prompt has more tokens than the context (config.data.seq_len)."""
    context = int(bundle.config.data.seq_len)
    tokenizer = bundle.task.tokenizer
    for i, p in enumerate(prompts):
        n = len(tokenizer.encode(p))
        if n > context:
            raise ValueError(f"prompt {i} is {n} tokens long, longer than the model's context of "
                             f"{context} tokens (data.seq_len)")


def generate_text(bundle: InferenceBundle, prompts: list[str] | None = None, *,
                  steps: int | None = None, sampler: str | None = None,
                  length: int | None = None, seed: int = 0) -> list[str]:
    """Continuations of `prompts` (or config.sample.num_samples unprompted samples if None/empty).

    DIMBA: `steps` reverse-diffusion steps with `sampler` ("ddim"/"ddpm"), defaults from
    config.sample. AR: recurrent decoding of `length` tokens (steps/sampler do not apply).
    Returns one string per prompt (the continuation only).
    """
    cfg = bundle.config
    if steps is not None and int(steps) <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    prompts = list(prompts) if prompts else [""] * int(cfg.sample.num_samples)
    check_prompts(bundle, prompts)
    task = bundle.task
    length = int(cfg.sample.length if length is None else length)
    if hasattr(task, "generate"):
        return task.generate(bundle.model, prompts, length=length, steps=steps, sampler=sampler,
                             seed=seed)
    # The autoregressive baseline: recurrent decoding with its own sampler settings.
    from dimba_jax.models import ar
    tok = task.tokenizer
    out = []
    for p in prompts:
        ids = np.asarray([[tok.eos_id] + tok.encode(p)], np.int32)
        new = np.asarray(ar.generate(bundle.model, ids, length, jax.random.PRNGKey(seed),
                                     temperature=float(ar._ar_field(cfg, "temperature", 1.0)),
                                     top_p=float(ar._ar_field(cfg, "top_p", 0.95))))[0]
        stop = np.flatnonzero(new == tok.eos_id)
        out.append(tok.decode(new[:stop[0]] if stop.size else new))
    return out


def evaluate_model(bundle: InferenceBundle, num_batches: int | None = None,
                   ts: tuple[int, ...] | None = None) -> dict[str, float]:
    """Validation numbers averaged over `num_batches` (default config.train.eval_batches)
    batches of the validation split: the task's loss parts, and for DIMBA the loss and the
    head's token accuracy at several t (DimbaTask.eval_metrics)."""
    from dimba_jax.data.pipeline import make_eval_batches
    cfg = bundle.config
    n = int(cfg.train.eval_batches if num_batches is None else num_batches)
    if n <= 0:
        raise ValueError(f"number of eval batches must be > 0, got {n}")
    batches = make_eval_batches(cfg.data, bundle.task.tokenizer, int(cfg.train.batch_size), n,
                                int(cfg.data.seq_len))
    task = bundle.task
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if hasattr(task, "eval_metrics"):
            out = task.eval_metrics(bundle.model, batch, ts)
        else:
            loss, metrics = nnx.jit(task.loss)(
                bundle.model, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(i))
            out = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in sums.items()}
