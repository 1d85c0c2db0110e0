"""Masked losses of DIMBA and the one training-loss function built from them.

Loss = MSE(x0_hat, x0) averaged over generated positions and the d channels
     + ce_weight * CE(head(x0_hat), tokens) averaged over generated positions
(the "rounding" cross-entropy of Diffusion-LM / DiffuSeq). Known (prompt) positions carry no loss.

`diffusion_loss` draws per example: t ~ U{1..T}, a prompt layout (layout.py), a prompt-dropout
flag (probability prompt_drop_prob) and the noise; with probability self_cond_prob (one coin per
batch, `lax.cond`, so the extra forward is only paid when used) it first runs the model without
self-conditioning, stops the gradient and feeds that x0 estimate back as input (Chen et al.,
"Analog Bits"; Plaid; CDCD). The x0 target is the model's normalised embedding and gradients flow
into it (Diffusion-LM); its rows have a fixed norm, so this cannot shrink it, and the CE term keeps
the rows apart (`embed_mean_dir` monitors their spread: 1 = all rows equal, ~1/sqrt(V) = spread).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dimba_jax.diffusion.layout import sample_layout
from dimba_jax.diffusion.schedule import CosineSchedule, add_noise


def _weights(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = mask.astype(jnp.float32)
    return w, jnp.maximum(jnp.sum(w), 1.0)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of (pred - target)^2 over positions where mask and over the last axis.

    pred, target: float (b, L, d); mask: bool (b, L). Returns float32 scalar (0 if mask is empty).
    """
    w, n = _weights(mask)
    se = jnp.sum(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return jnp.sum(se * w) / (n * pred.shape[-1])


def masked_cross_entropy(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token cross-entropy over positions where mask. logits (b, L, V); tokens int (b, L)."""
    w, n = _weights(mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * w) / n


def masked_accuracy(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Fraction of masked positions where argmax(logits) == tokens (float32 scalar)."""
    w, n = _weights(mask)
    return jnp.sum((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32) * w) / n


def embedding_stats(table: jax.Array) -> dict[str, jax.Array]:
    """Health of an embedding table (V, d): mean row norm and the norm of the mean unit row."""
    table = table.astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jnp.square(table), -1))
    unit = table / jnp.maximum(norms[:, None], 1e-12)
    return {"embed_norm": jnp.mean(norms), "embed_mean_dir": jnp.linalg.norm(jnp.mean(unit, 0))}


def denoise_terms(model, schedule: CosineSchedule, tokens: jax.Array, t: jax.Array, cond_mask: jax.Array,
                  drop_prompt: jax.Array, noise: jax.Array, use_self_cond: jax.Array | bool,
                  ce_weight: float) -> dict[str, jax.Array]:
    """Loss terms for given draws (t, layout, dropout, noise, self-conditioning coin).

    tokens: int32 (b, L); t: int (b,); cond_mask: bool (b, L); drop_prompt: bool (b,);
    noise: float (b, L, d); use_self_cond: bool scalar (ignored if the model has no self-cond).
    Returns dict of float32 scalars: loss, mse, ce, acc, and x0_hat (b, L, d) under "x0_hat".
    """
    x0 = model.embed(tokens)
    x_t = add_noise(schedule, x0, t, noise)
    self_cond = None
    if model.self_condition:
        def first_pass():
            return jax.lax.stop_gradient(model(x_t, t, tokens, cond_mask, self_cond=None, drop_prompt=drop_prompt))
        if isinstance(use_self_cond, bool):
            self_cond = first_pass() if use_self_cond else jnp.zeros_like(x0)
        else:
            self_cond = jax.lax.cond(use_self_cond, first_pass, lambda: jnp.zeros_like(x0))
    x0_hat = model(x_t, t, tokens, cond_mask, self_cond=self_cond, drop_prompt=drop_prompt)
    generated = ~cond_mask
    mse = masked_mse(x0_hat, x0, generated)
    logits = model.logits(x0_hat)
    ce = masked_cross_entropy(logits, tokens, generated)
    return {"loss": mse + ce_weight * ce, "mse": mse, "ce": ce,
            "acc": masked_accuracy(logits, tokens, generated), "x0_hat": x0_hat}


def diffusion_loss(model, schedule: CosineSchedule, tokens: jax.Array, rng: jax.Array, diffusion_cfg
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DIMBA training loss of one batch.

    model: a `DimbaModel`; tokens: int32 (b, L); rng: a PRNG key; diffusion_cfg: `config.diffusion`
    (ce_weight, self_cond_prob, prompt_drop_prob, layout_probs, max_prompt_frac, t_power).
    Returns (float32 scalar loss, metrics dict of float32 scalars: loss, mse, ce, acc,
    embed_norm, embed_mean_dir, known_frac).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq_len), got shape {tokens.shape}")
    b, length = tokens.shape
    r_t, r_noise, r_layout, r_drop, r_sc = jax.random.split(rng, 5)
    t = schedule.sample_t(r_t, (b,), power=float(diffusion_cfg.get("t_power", 1.0)))
    cond_mask, _ = sample_layout(r_layout, b, length, diffusion_cfg.layout_probs, diffusion_cfg.max_prompt_frac)
    drop = jax.random.bernoulli(r_drop, float(diffusion_cfg.prompt_drop_prob), (b,))
    noise = jax.random.normal(r_noise, (b, length, model.d_model), jnp.float32)
    use_sc = jax.random.bernoulli(r_sc, float(diffusion_cfg.self_cond_prob))
    terms = denoise_terms(model, schedule, tokens, t, cond_mask, drop, noise, use_sc,
                          float(diffusion_cfg.ce_weight))
    terms.pop("x0_hat")
    terms.update(embedding_stats(model.embedding_table()))
    terms["known_frac"] = jnp.mean(cond_mask.astype(jnp.float32))
    return terms["loss"], terms
