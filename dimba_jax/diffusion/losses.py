"""Masked losses of DIMBA and the one training-loss function built from them.

Loss = mse_weight * MSE(x0_hat, x0) averaged over generated positions and the d channels
     + ce_weight * CE(logits, tokens) averaged over generated positions.
With the default score-interpolation read-out (models/dimba.py) the cross-entropy alone trains
the denoiser (CDCD; mse_weight 0); with the "direct" read-out the MSE is the paper's x0
regression and the CE the "rounding" loss of Diffusion-LM / DiffuSeq. Known (prompt) positions
carry no loss.

`diffusion_loss` draws per example: a noise level (log-SNR; `sample_logsnr`; with a wavefront,
`diffusion.wavefront` > 0, one level per position, diffusion/wavefront.py), a prompt layout (layout.py), a prompt-dropout
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
import numpy as np
from flax import nnx

from dimba_jax.diffusion import wavefront
from dimba_jax.diffusion.layout import sample_layout
from dimba_jax.diffusion.schedule import CosineSchedule, add_noise_logsnr


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


def _token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """-log softmax(logits)[token] per position: logits (b, L, V), tokens int (b, L) -> float32 (b, L)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def masked_cross_entropy(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token cross-entropy over positions where mask. logits (b, L, V); tokens int (b, L)."""
    w, n = _weights(mask)
    return jnp.sum(_token_nll(logits, tokens) * w) / n


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


def _no_tangent(tree):
    """`tree` with every floating-point leaf under stop_gradient (keys and integers as they are)."""
    return jax.tree.map(lambda a: jax.lax.stop_gradient(a)
                        if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact) else a, tree)


def self_cond_estimate(model, x_t: jax.Array, logsnr: jax.Array, tokens: jax.Array,
                       cond_mask: jax.Array, drop_prompt: jax.Array) -> jax.Array:
    """The self-conditioning pass: x0_hat float32 (b, L, e) of `model` without self-conditioning,
    carrying no gradient. Its parameters and inputs enter under stop_gradient (not only its
    output), so under jax.grad no tangent reaches it: its custom-VJP kernels run their primal
    (inference) programs and keep no residuals for a backward that never comes."""
    graphdef, state = nnx.split(model)
    frozen = nnx.merge(graphdef, _no_tangent(state))
    return frozen(*_no_tangent((x_t, logsnr)), tokens, cond_mask, self_cond=None,
                  drop_prompt=drop_prompt)


def denoise_terms(model, tokens: jax.Array, logsnr: jax.Array, cond_mask: jax.Array,
                  drop_prompt: jax.Array, noise: jax.Array, use_self_cond: jax.Array | bool,
                  mse_weight: float, ce_weight: float) -> dict[str, jax.Array]:
    """Loss terms for given draws (noise level, layout, dropout, noise, self-conditioning coin).

    tokens: int32 (b, L); logsnr: float (b,) the log-SNR lambda of each example, or (b, L) one per
    position; cond_mask: bool (b, L); drop_prompt: bool (b,); noise: float (b, L, e) (e =
    model.embed_dim); use_self_cond: bool scalar (ignored if the model has no self-conditioning).
    Returns dict: float32 scalars loss (= mse_weight mse + ce_weight ce), mse, ce, acc; and
    "x0_hat" (b, L, e), "logits" (b, L, V), "ce_example" (b,) (each example's mean cross-entropy
    over its generated positions), "nll" (b, L) (each position's cross-entropy).
    """
    x0 = model.embed(tokens)
    x_t = add_noise_logsnr(x0, logsnr, noise)
    self_cond = None
    if model.self_condition:
        def first_pass():
            return self_cond_estimate(model, x_t, logsnr, tokens, cond_mask, drop_prompt)
        if isinstance(use_self_cond, bool):
            self_cond = first_pass() if use_self_cond else jnp.zeros_like(x0)
        else:
            self_cond = jax.lax.cond(use_self_cond, first_pass, lambda: jnp.zeros_like(x0))
    x0_hat, logits = model.predict(x_t, logsnr, tokens, cond_mask, self_cond=self_cond, drop_prompt=drop_prompt)
    generated = ~cond_mask
    mse = masked_mse(x0_hat, x0, generated)
    nll = _token_nll(logits, tokens)
    w, n = _weights(generated)
    ce = jnp.sum(nll * w) / n  # masked_cross_entropy's, from the nll computed once
    ce_example = jnp.sum(nll * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return {"loss": mse_weight * mse + ce_weight * ce, "mse": mse, "ce": ce,
            "acc": masked_accuracy(logits, tokens, generated), "x0_hat": x0_hat, "logits": logits,
            "ce_example": ce_example, "nll": nll}


# The warp's regression loss enters the total with this weight: its gradients reach only the warp
# (Adam is invariant to the scale), and a small weight keeps them out of the global-norm clip.
WARP_LOSS_WEIGHT = 1e-3


def sample_logsnr(model, schedule: CosineSchedule, rng: jax.Array, batch: int, diffusion_cfg) -> jax.Array:
    """Training noise levels lambda: float32 (batch,).

    diffusion.noise_sampling "uniform": t ~ the schedule's training draw (t_power), lambda = lambda(t);
    "warp": lambda from the model's learned noise warp (diffusion/warp.py).
    """
    if diffusion_cfg.noise_sampling == "warp":
        if model.noise_warp is None:
            raise ValueError("diffusion.noise_sampling='warp' needs a model built with a noise warp")
        return model.noise_warp.sample(rng, (batch,))
    if diffusion_cfg.noise_sampling != "uniform":
        raise ValueError(f"diffusion.noise_sampling must be 'uniform' or 'warp', got {diffusion_cfg.noise_sampling!r}")
    return schedule.logsnr_at(schedule.sample_t(rng, (batch,), power=float(diffusion_cfg.t_power)))


def sample_wavefront_logsnr(model, rng: jax.Array, cond_mask: jax.Array, diffusion_cfg) -> jax.Array:
    """Training levels with a wavefront (diffusion/wavefront.py): clock s ~ U(0, 1) and width
    W ~ U(0, diffusion.wavefront) with probability diffusion.wavefront_prob (else 0) per example,
    ranks in diffusion.wavefront_order, lambda_i = the warp's level at u_i(s). cond_mask bool (b, L) -> float32 (b, L). At W = 0 the
    level is the one `sample_logsnr` draws from the same key."""
    if diffusion_cfg.noise_sampling != "warp" or model.noise_warp is None:
        raise ValueError("diffusion.wavefront > 0 needs diffusion.noise_sampling='warp' (its levels are the warp's quantiles)")
    if not getattr(model, "position_levels", False):
        raise ValueError("diffusion.wavefront > 0 needs model.position_levels=True (the denoiser must see each position's level)")
    b = cond_mask.shape[0]
    clock = jax.random.uniform(rng, (b,), jnp.float32)
    widths = wavefront.sample_widths(jax.random.fold_in(rng, 1), b, float(diffusion_cfg.wavefront),
                                     float(diffusion_cfg.wavefront_prob))
    rank = wavefront.order_rank(str(diffusion_cfg.wavefront_order), jax.random.fold_in(rng, 2), cond_mask)
    u = wavefront.progress(clock, rank, widths)
    return model.noise_warp.inverse_cdf(u)


SELF_COND_COINS = ("device", "host")  # diffusion.self_cond_coin


def host_self_cond_coin(seed: int, step: int, prob: float) -> bool:
    """The host's self-conditioning coin of train step `step` (diffusion.self_cond_coin "host"):
    True with probability `prob`, a function of (seed, step) alone, so every process of a run
    and a resumed run toss the same coins."""
    return bool(np.random.default_rng((int(seed), int(step), 0x5C)).random() < float(prob))


def diffusion_loss(model, schedule: CosineSchedule, tokens: jax.Array, rng: jax.Array, diffusion_cfg,
                   self_cond: bool | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DIMBA training loss of one batch.

    model: a `DimbaModel`; tokens: int32 (b, L); rng: a PRNG key; diffusion_cfg: `config.diffusion`
    (mse_weight, ce_weight, self_cond_prob, prompt_drop_prob, layout_probs, max_prompt_frac,
    noise_sampling, t_power, wavefront, wavefront_prob); self_cond: None = the self-conditioning
    coin is tossed from `rng` (with probability self_cond_prob, a `lax.cond`), or the host's coin
    as a Python bool (the pass is traced in or out). With a noise warp on the model, its
    regression on the observed cross-entropy is added (weight WARP_LOSS_WEIGHT; metric
    warp_mse): per example at one level per example, per generated position with a wavefront.
    Returns (float32 scalar loss, metrics dict of float32 scalars: loss, mse, ce, acc,
    embed_norm, embed_mean_dir, known_frac[, warp_mse]).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq_len), got shape {tokens.shape}")
    b, length = tokens.shape
    r_t, r_noise, r_layout, r_drop, r_sc = jax.random.split(rng, 5)
    cond_mask, _ = sample_layout(r_layout, b, length, diffusion_cfg.layout_probs, diffusion_cfg.max_prompt_frac)
    per_position = float(diffusion_cfg.wavefront) > 0
    if per_position:
        logsnr = sample_wavefront_logsnr(model, r_t, cond_mask, diffusion_cfg)
    else:
        logsnr = sample_logsnr(model, schedule, r_t, b, diffusion_cfg)
    drop = jax.random.bernoulli(r_drop, float(diffusion_cfg.prompt_drop_prob), (b,))
    noise = jax.random.normal(r_noise, (b, length, model.embed_dim), jnp.float32)
    use_sc = (jax.random.bernoulli(r_sc, float(diffusion_cfg.self_cond_prob)) if self_cond is None
              else bool(self_cond))
    terms = denoise_terms(model, tokens, logsnr, cond_mask, drop, noise, use_sc,
                          float(diffusion_cfg.mse_weight), float(diffusion_cfg.ce_weight))
    ce_example = terms.pop("ce_example")
    nll = terms.pop("nll")
    terms.pop("x0_hat")
    terms.pop("logits")
    if model.noise_warp is not None:
        terms["warp_mse"] = (model.noise_warp.regression_loss(logsnr, nll, weight=~cond_mask) if per_position
                             else model.noise_warp.regression_loss(logsnr, ce_example))
        terms["loss"] = terms["loss"] + WARP_LOSS_WEIGHT * terms["warp_mse"]
    terms.update(embedding_stats(model.embedding_table()))
    terms["known_frac"] = jnp.mean(cond_mask.astype(jnp.float32))
    return terms["loss"], terms
