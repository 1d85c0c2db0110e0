"""Warm-start a DIMBA denoiser from a pretrained causal Mamba-2 LM checkpoint (mamba_ssm layout).

What each part receives (`warm_start_denoiser`):

* Block i of the denoiser receives layer i of the checkpoint (the first len(blocks) layers when
  the denoiser is shallower; more blocks than checkpoint layers is an error).
  - A `BidirectionalMamba2` mixer: **both** directions receive layer i's mixer weights
    verbatim. `.fwd` then computes exactly the pretrained causal mixer; `.bwd` starts as the
    same mixer applied right-to-left (the pretrained dynamics are a reasonable prior for either
    reading direction, and fine-tuning lets the two diverge). With shared projections the
    (shared) in_proj/out_proj are written once with the same values.
  - A causal `Mamba2` mixer (the `model.bidirectional=False` ablation) receives layer i's mixer.
  - A block with a `norm` (RMSNorm over d_model, pre-norm as in mamba_ssm) receives
    `backbone.layers.i.norm.weight`. Conditioning layers (FiLM / additive) keep their init.
* The embedding table (V_ours, d_model) receives the checkpoint's rows 0..min(V_ours, V_ckpt)-1
  (truncation to our vocabulary; the checkpoint's padding rows are never used). Rows beyond the
  checkpoint's vocabulary keep their initialisation. This is only meaningful when our tokenizer
  shares the checkpoint's ids (e.g. the GPT-NeoX tokenizer of the published Mamba-2 models): with
  a different tokenizer pass `embedding=None` and let only the blocks warm-start. d_model must
  match (no projection is learned or guessed): a mismatch is a ValueError.
* `final_norm`, if given (an RMSNorm over d_model), receives `backbone.norm_f.weight`.

The mixer sizes (d_model, d_state, expand, headdim, ngroups, d_conv) must equal the
checkpoint's; chunk_size and the SSD implementation are free.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dimba_jax.interop import mamba_ssm as names
from dimba_jax.interop.checkpoint import read_checkpoint
from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2


def _mixer_directions(block) -> list[Mamba2]:
    mixer = getattr(block, "mixer", block)
    if isinstance(mixer, BidirectionalMamba2):
        return [mixer.fwd, mixer.bwd]
    if isinstance(mixer, Mamba2):
        return [mixer]
    raise ValueError(f"warm start: block {type(block).__name__} has no Mamba2 / "
                     f"BidirectionalMamba2 mixer")


def _check_sizes(mixer: Mamba2, arch: dict, i: int) -> None:
    have = dict(d_model=mixer.d_model, d_state=mixer.d_state, expand=mixer.expand,
                headdim=mixer.headdim, ngroups=mixer.ngroups, d_conv=mixer.d_conv)
    diff = {k: (v, arch[k]) for k, v in have.items() if v != arch[k]}
    if diff:
        raise ValueError(f"warm start: block {i} does not match the checkpoint (block, "
                         f"checkpoint): {diff}")


def warm_start_denoiser(blocks: Sequence, embedding, ckpt_dir: str | os.PathLike, *,
                        final_norm=None) -> dict:
    """Copies a causal Mamba-2 checkpoint into denoiser blocks and an embedding (in place).

    Args:
      blocks: sequence of blocks, each a `BidirectionalMamba2` / `Mamba2` or a module with a
        `.mixer` of those types (and optionally a `.norm` RMSNorm over d_model).
      embedding: an nnx.Param (V_ours, d_model) to fill, or None to leave it alone.
      ckpt_dir: mamba_ssm-layout checkpoint directory (see dimba_jax.interop.checkpoint).
      final_norm: optional RMSNorm over d_model that receives backbone.norm_f.weight.
    Returns:
      dict(layers=number of layers copied, embedding_rows=rows copied (0 if embedding None),
           checkpoint_layers=n_layer of the checkpoint).
    Raises:
      FileNotFoundError for a missing checkpoint; ValueError for any size mismatch.
    """
    config, state = read_checkpoint(ckpt_dir)
    arch = names.lm_kwargs_from_config(config)
    if len(blocks) > arch["n_layers"]:
        raise ValueError(f"warm start: {len(blocks)} blocks but the checkpoint has only "
                         f"{arch['n_layers']} layers")
    d_model = arch["d_model"]
    for i, block in enumerate(blocks):
        for mixer in _mixer_directions(block):
            _check_sizes(mixer, arch, i)
            names.load_mixer(mixer, state, prefix=f"backbone.layers.{i}.mixer.")
        norm = getattr(block, "norm", None)
        if norm is not None and getattr(norm, "dim", None) == d_model:
            weight = names.get_array(state, f"backbone.layers.{i}.norm.weight", (d_model,))
            names.assign_param(norm.weight, weight)
    rows = 0
    if embedding is not None:
        table = np.asarray(state["backbone.embedding.weight"])
        ours = embedding[...]
        if ours.ndim != 2 or ours.shape[1] != table.shape[1]:
            raise ValueError(f"warm start: embedding {ours.shape} vs checkpoint "
                             f"{table.shape}: d_model must match")
        rows = min(ours.shape[0], arch["vocab_size"])
        embedding[...] = ours.at[:rows].set(jnp.asarray(table[:rows], ours.dtype))
    if final_norm is not None:
        weight = names.get_array(state, "backbone.norm_f.weight", (d_model,))
        names.assign_param(final_norm.weight, weight)
    return dict(layers=len(blocks), embedding_rows=rows, checkpoint_layers=arch["n_layers"])
