"""The tasks: what the trainer trains, each behind the `Task` interface (`base.Task`).

  base.py   the Task protocol (init_model / loss / sample_text / flops_per_token)
  dimba.py  DimbaTask: the diffusion denoiser, its generation, noise-level metrics, the bound
  ar.py     ArTask: the causal Mamba-2 LM baseline

`task_class(name)` maps config.task to its class: "dimba", "ar", or "package.module:Class" (any
class implementing `Task`, built as Class(config, tokenizer)). Building a task from a config,
including the donor run of a frozen prompt encoder, is `dimba_jax.train.tasks.make_task`.
"""

from __future__ import annotations

import difflib
import importlib

from dimba_jax.tasks.base import Task

KNOWN_TASKS = ("dimba", "ar")


def task_class(name: str) -> type:
    """The class of config.task `name`. ValueError for an unknown name (with the nearest valid
    ones) or an import path that does not resolve."""
    if name == "dimba":
        from dimba_jax.tasks.dimba import DimbaTask
        return DimbaTask
    if name == "ar":
        from dimba_jax.tasks.ar import ArTask
        return ArTask
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"config.task={name!r}: cannot import {attr} from {module_name} ({e})")
    near = difflib.get_close_matches(name, KNOWN_TASKS, n=2)
    raise ValueError(f"unknown config.task={name!r}; valid: {', '.join(KNOWN_TASKS)} or "
                     f"'package.module:Class'{'; did you mean ' + ' or '.join(near) + '?' if near else ''}")


__all__ = ["KNOWN_TASKS", "Task", "task_class"]
