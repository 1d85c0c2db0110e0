"""`config.task` -> a `Task` object (the only place that knows the concrete tasks).

  "dimba"            dimba_jax.diffusion.task.DimbaTask (the diffusion denoiser)
  "ar"               dimba_jax.models.ar.ArTask (the causal Mamba-2 LM baseline)
  "package.module:Class"   any class implementing `dimba_jax.train.task.Task`, built as
                     Class(config, tokenizer) — for experiments and the trainer's own tests.

A DIMBA run with model.prompt_encoder="frozen" gets the donor run named by
model.prompt_encoder_checkpoint here: its model is restored (`dimba_jax.train.restore`) and its
frozen stack handed to `DimbaTask`, which hands the encoder to `DimbaModel`.
"""

from __future__ import annotations

import difflib
import importlib

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train.restore import restore_model

KNOWN_TASKS = ("dimba", "ar")


def make_tokenizer(config):
    """The tokenizer named by config.data.tokenizer."""
    from dimba_jax.data.tokenizers import get_tokenizer
    return get_tokenizer(config.data.tokenizer)


def make_task(config, tokenizer=None):
    """Builds the Task named by `config.task` with `tokenizer` (default: from the config).

    Raises:
      ValueError: an unknown task name (with the nearest valid names) or a bad import path.
    """
    name = str(config.task)
    if tokenizer is None:
        tokenizer = make_tokenizer(config)
    if name == "dimba":
        from dimba_jax.diffusion.task import DimbaTask
        return DimbaTask(config, tokenizer, prompt_stack=frozen_prompt_stack(config))
    if name == "ar":
        from dimba_jax.models.ar import ArTask
        return ArTask(config, tokenizer)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"config.task={name!r}: cannot import {attr} from {module_name} ({e})")
        return cls(config, tokenizer)
    near = difflib.get_close_matches(name, KNOWN_TASKS, n=2)
    raise ValueError(f"unknown config.task={name!r}; valid: {', '.join(KNOWN_TASKS)} or "
                     f"'package.module:Class'{'; did you mean ' + ' or '.join(near) + '?' if near else ''}")


def frozen_prompt_stack(config):
    """The `FrozenStack` of the run in config.model.prompt_encoder_checkpoint when
    config.model.prompt_encoder is "frozen" (EMA weights when present), else None.

    Raises FileNotFoundError for an empty path or a workdir without a readable checkpoint.
    """
    if config.model.prompt_encoder != "frozen":
        return None
    from dimba_jax.layers.conditioning import frozen_stack
    workdir = str(config.model.prompt_encoder_checkpoint)
    if not workdir:
        raise FileNotFoundError("model.prompt_encoder='frozen' needs model.prompt_encoder_checkpoint "
                                "(a workdir)")
    donor_config = ckpt_lib.load_config(workdir)
    return frozen_stack(restore_model(workdir, make_task(donor_config), donor_config).model)
