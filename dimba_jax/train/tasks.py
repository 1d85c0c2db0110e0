"""`config.task` -> a `Task` object, built from its class (`dimba_jax.tasks.task_class`:
"dimba", "ar" or "package.module:Class") with the run's tokenizer.

A DIMBA run with model.prompt_encoder="frozen" gets the donor run named by
model.prompt_encoder_checkpoint here: its model is restored (`dimba_jax.train.restore`) and its
frozen stack handed to `DimbaTask`, which hands the encoder to `DimbaModel`.
"""

from __future__ import annotations

from dimba_jax.tasks import task_class
from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train.restore import restore_model


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
    cls = task_class(name)
    if tokenizer is None:
        tokenizer = make_tokenizer(config)
    if name == "dimba":
        return cls(config, tokenizer, prompt_stack=frozen_prompt_stack(config))
    return cls(config, tokenizer)


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
