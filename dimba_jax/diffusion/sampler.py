"""Reverse diffusion: DDPM and DDIM with respacing, classifier-free guidance, clamping, self-conditioning.

`sample(...)` runs the whole reverse process as ONE `jax.jit` whose body is a `lax.scan` over the
kept timesteps (the number of steps is static through the shapes of the timestep arrays), so the
model is traced once per compilation whatever the number of steps. `make_sample_fn` validates
and splits the model once and returns a callable for repeated low-overhead calls (benchmarks).

Grids (`noise_grid`): the model is told each step's noise level as a log-SNR. "uniform" keeps
`steps` strided timesteps of the schedule; "warp" puts the steps at the quantiles of the model's
learned noise warp (diffusion/warp.py). Either way each step goes from alpha_bar at its level to
alpha_bar at the next, as below. With a wavefront (`wavefront` W > 0, grid "warp", a model with
`position_levels`), each generated position has its own level: at step k of S the clock is
s = 1 - k/S and position i sits at the warp's quantile u_i(s) (diffusion/wavefront.py), so the
left of the span is denoised before the right; a position whose level does not change in a step
keeps its x (both posteriors are the identity there), and the last step takes every position to
clean data. W = 0 is exactly the "warp" grid.

Respacing: `steps` (1..T) kept timesteps tau_S = T > ... > tau_1 = 1 (CosineSchedule.respaced_timesteps);
each step goes from tau_i to tau_{i-1} using alpha_bar at both (for DDPM the per-step beta is
1 - alpha_bar(tau_i)/alpha_bar(tau_{i-1}), the respaced-DDPM rule of Nichol & Dhariwal). The step
after tau_1 goes to "time 0", treated as clean data (alpha_bar = 1): its posterior has zero
variance and mean x0_hat, so the final state *is* the last x0 estimate.

Per step, with x0_hat the model's estimate:
* CFG: x0_hat = uncond + w (cond - uncond), w = `guidance` (1 = conditional only, one forward;
  0 = unconditional only, one forward; otherwise both branches in one batched forward). The
  unconditional branch is the same layout with the prompt dropped (DimbaModel `drop_prompt`).
* prior weight w_p (`prior_weight`): the output prior enters the logits times w_p (1 = the
  trained model; < 1 trusts each position's own noisy evidence less and the context more);
  constant, or with `prior_weight_final` >= 0 linear in the step index to that value at the last.
* score temperature tau: x0_hat <- softmax(logits / tau) @ E (tau < 1 sharpens the estimate);
  constant, or with `score_temperature_final` > 0 linear in the step index from
  `score_temperature` at the noisiest step to `score_temperature_final` at the last.
* score min-p m (`score_min_p` > 0): that softmax keeps, at each position, the tokens whose
  probability is at least m times the position's largest (the rest get weight 0), so the long
  tail of unlikely rows stops pulling x0_hat toward the table's mean; confident positions keep
  few tokens, uncertain ones many.
* clamp (switch): x0_hat <- softmax(head(x0_hat)) @ E, the softmax-weighted embedding.
* known positions are re-imposed (clean embeddings) in x0_hat and in x_{t-1} at every step.
* self-conditioning (switch): the previous step's final x0_hat is fed to the next step.
* DDPM: x_{t-1} ~ N(mu_post, var_post) of q(x_{t-1} | x_t, x0_hat).
  DDIM: x_{t-1} = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z,
  eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t),
  sigma = eta sqrt((1 - ab_prev)/(1 - ab_t)) sqrt(1 - ab_t/ab_prev); eta = 1 equals DDPM.
Read-out: argmax of the last step's logits (or a sample at `temperature` > 0); known positions
return their given tokens exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.diffusion import wavefront as wavefront_lib
from dimba_jax.diffusion.schedule import CosineSchedule
from dimba_jax.layers.bound import PACK_MAX_ELEMENTS, bind
from dimba_jax.layers.precision import cast_linears_to_compute_dtype, cast_state_linears

SAMPLERS = ("ddpm", "ddim")
GEMMS = ("auto", "xla", "cublas")  # `sample.gemm` values (`program_options`)


def program_options(gemm: str) -> dict:
    """XLA compile options of the sampling program for the knob `sample.gemm`.

    "cublas": XLA's Triton GEMM emitter off (`xla_gpu_enable_triton_gemm`), so the GEMMs that
    XLA would fuse with their operands' elementwise producers run as cuBLAS calls, the
    producers as separate kernels; "xla": XLA's default choice; "auto": "cublas" on a GPU
    (batch-1 DIMBA base T = 64 on an H100: 138.52 against 141.97 ms for "xla", the same
    tokens, benchmarks/results/latency_levers_gemm_h100.md), else "xla". The option changes nothing
    off GPU. Returns {} for XLA's defaults. ValueError (one line) for an unknown value.
    """
    if gemm not in GEMMS:
        raise ValueError(f"sample.gemm must be one of {GEMMS}, got {gemm!r}")
    if gemm == "cublas" or (gemm == "auto" and jax.default_backend() == "gpu"):
        return {"xla_gpu_enable_triton_gemm": False}
    return {}


def ddpm_posterior(x_t: jax.Array, x0_hat: jax.Array, ab_t, ab_prev) -> tuple[jax.Array, jax.Array]:
    """Mean and std of q(x_prev | x_t, x0_hat) between timesteps with alpha_bar ab_t < ab_prev.

    x_t, x0_hat: float (..., d); ab_t, ab_prev: scalars or arrays broadcastable to them.
    Returns (mean float32 like x_t, std float32 scalar/broadcastable).
    """
    ab_t = jnp.asarray(ab_t, jnp.float32)
    ab_prev = jnp.asarray(ab_prev, jnp.float32)
    beta = 1.0 - ab_t / ab_prev
    coef_x0 = jnp.sqrt(ab_prev) * beta / (1.0 - ab_t)
    coef_xt = jnp.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab_t)
    var = beta * (1.0 - ab_prev) / (1.0 - ab_t)
    return coef_x0 * x0_hat + coef_xt * x_t, jnp.sqrt(jnp.maximum(var, 0.0))


def ddim_posterior(x_t: jax.Array, x0_hat: jax.Array, ab_t, ab_prev, eta) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the DDIM(eta) step from alpha_bar ab_t to ab_prev (see the module docstring).

    Shapes as in `ddpm_posterior`; eta: float scalar >= 0.
    """
    ab_t = jnp.asarray(ab_t, jnp.float32)
    ab_prev = jnp.asarray(ab_prev, jnp.float32)
    eps_hat = (x_t - jnp.sqrt(ab_t) * x0_hat) / jnp.sqrt(1.0 - ab_t)
    sigma = eta * jnp.sqrt(jnp.maximum((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev), 0.0))
    mean = jnp.sqrt(ab_prev) * x0_hat + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma ** 2, 0.0)) * eps_hat
    return mean, sigma


def cut_at_eos(ids, eos_id: int) -> list[int]:
    """Token ids up to (not including) the first `eos_id`: any 1-D int sequence -> list[int]."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i == eos_id:
            break
        out.append(int(i))
    return out


def sampler_options(sample_config) -> dict:
    """The sampler keyword arguments a `config.sample` names, typed: sampler (str), steps (int),
    eta, guidance (float), clamp (bool), temperature (float), grid (str), score_temperature,
    score_temperature_final (float), wavefront (float), wavefront_order (str), prior_weight,
    prior_weight_final (float), score_min_p (float), draw_x0 (bool), gemm (str; "auto" where a
    config saved before the knob lacks it), unroll (int; 1 likewise). The one place a sample
    setting becomes a sampler argument."""
    s = sample_config
    return dict(sampler=str(s.sampler), steps=int(s.steps), eta=float(s.eta), guidance=float(s.guidance),
                clamp=bool(s.clamp), temperature=float(s.temperature), grid=str(s.grid),
                score_temperature=float(s.score_temperature),
                score_temperature_final=float(s.score_temperature_final), wavefront=float(s.wavefront),
                wavefront_order=str(s.wavefront_order), prior_weight=float(s.prior_weight),
                prior_weight_final=float(s.prior_weight_final), score_min_p=float(s.score_min_p),
                draw_x0=bool(s.draw_x0), gemm=str(getattr(s, "gemm", "auto")),
                unroll=int(getattr(s, "unroll", 1)))


def respaced_alphas(schedule: CosineSchedule, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps int32 (S,), alpha_bar at them (S,), alpha_bar at the next-kept (S,)), descending;
    the last "previous" alpha_bar is 1 (clean data). ValueError for steps outside 1..T."""
    ts = schedule.respaced_timesteps(steps)
    ab = schedule.alpha_bar.astype(np.float32)
    ab_t = ab[ts]
    ab_prev = np.concatenate([ab[ts[1:]], np.ones((1,), np.float32)])
    return ts, ab_t, ab_prev


GRIDS = ("uniform", "warp")


def noise_grid(model, schedule: CosineSchedule, steps: int, grid: str = "uniform"
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The reverse process's levels, noisiest first: (logsnr (S,), alpha_bar there (S,), alpha_bar
    at the next level (S,), the last 1 = clean data), all float32.

    grid "uniform": the schedule's respaced timesteps (`respaced_alphas`, steps in 1..T);
    "warp": the quantiles u = 1, (S-1)/S, ..., 1/S of the model's learned noise warp
    (`NoiseWarp.quantile_grid`), so the steps sit where the training loss says tokens are decided.
    ValueError for an unknown grid, "warp" without a warp, or steps out of range.
    """
    if grid == "uniform":
        ts, ab_t, ab_prev = respaced_alphas(schedule, steps)
        return (jnp.asarray(schedule.logsnr_table()[ts]), jnp.asarray(ab_t), jnp.asarray(ab_prev))
    if grid != "warp":
        raise ValueError(f"unknown sampling grid {grid!r}; expected one of {GRIDS}")
    if getattr(model, "noise_warp", None) is None:
        raise ValueError("grid='warp' needs a model trained with a noise warp (diffusion.noise_sampling='warp')")
    if not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    lam = model.noise_warp.quantile_grid(int(steps))
    ab_t = jax.nn.sigmoid(lam)
    ab_prev = jnp.concatenate([ab_t[1:], jnp.ones((1,), jnp.float32)])
    return lam, ab_t, ab_prev


def sample(model, schedule: CosineSchedule, tokens_known: jax.Array, cond_mask: jax.Array, rng: jax.Array, *,
           steps: int, sampler: str = "ddim", eta: float = 0.0, guidance: float = 1.0, clamp: bool = True,
           self_condition: bool | None = None, temperature: float = 0.0, return_x0: bool = False,
           grid: str = "uniform", score_temperature: float = 1.0, wavefront: float = 0.0,
           score_temperature_final: float = 0.0, wavefront_order: str = "left_to_right",
           prior_weight: float = 1.0, prior_weight_final: float = -1.0, score_min_p: float = 0.0,
           draw_x0: bool = False, gemm: str = "auto", unroll: int = 1):
    """Generates the unknown positions of token sequences.

    Args:
      model: a `DimbaModel`.
      schedule: the training schedule.
      tokens_known: int32 (b, L) — ids at known positions (anything elsewhere).
      cond_mask: bool (b, L) — True = known position (kept exactly), False = generate.
      rng: PRNG key (same key -> same output).
      steps: reverse steps, 1..T (respaced when < T).
      sampler: "ddim" or "ddpm".
      eta: DDIM noise scale (0 deterministic, 1 = DDPM's variance); ignored by "ddpm".
      guidance: CFG scale w (1 conditional, 0 unconditional).
      clamp: snap x0_hat to the softmax-weighted embedding each step.
      self_condition: feed back the previous x0_hat (None = the model's setting; needs a
        self-conditioned model).
      temperature: 0 = argmax read-out, > 0 = sample from softmax(logits / temperature).
      return_x0: also return the final x0 estimate.
      grid: where the steps sit, "uniform" or "warp" (`noise_grid`).
      score_temperature: tau; x0_hat <- softmax(logits / tau) @ E at every step (1 = the model's
        own estimate; < 1 sharpens it toward its most likely tokens).
      wavefront: W >= 0, the width of the wavefront of levels (0 = one level for all positions;
        > 0 needs grid "warp" and a model with position_levels).
      score_temperature_final: > 0: the score temperature of the last step, reached linearly in
        the step index from `score_temperature` at the first (0 = constant).
      wavefront_order: "left_to_right" or "random" (a permutation of each row's generated
        positions drawn from rng).
      prior_weight: >= 0, the weight of the model's output prior in the logits (1 = as trained).
      prior_weight_final: >= 0: the prior weight of the last step, reached linearly in the step
        index from `prior_weight` at the first; < 0: constant.
      score_min_p: in [0, 1): the score-temperature softmax keeps the tokens whose probability is
        at least this fraction of the position's largest (0 = all).
      draw_x0: each step moves toward the embedding of one token per position drawn from that
        step's re-weighted scores (ancestral sampling with "ddpm"), not toward their mean.
      gemm: how the program's GEMMs compile, "auto" | "xla" | "cublas" (`program_options`;
        the same computation either way).
      unroll: the step loop's `lax.scan` unroll factor (>= 1; the same computation and results,
        fewer loop iterations).
    Returns:
      int32 (b, L) token ids (known positions equal tokens_known there); with return_x0, the
      pair (ids, x0 float32 (b, L, e)).
    Raises:
      ValueError: steps outside 1..T, unknown sampler, grid or gemm, bad shapes, negative
        eta/temperature.
    """
    tokens_known = jnp.asarray(tokens_known, jnp.int32)
    cond_mask = jnp.asarray(cond_mask, bool)
    if tokens_known.ndim != 2 or cond_mask.shape != tokens_known.shape:
        raise ValueError(f"tokens_known {tokens_known.shape} and cond_mask {cond_mask.shape} must both be (batch, L)")
    fn = make_sample_fn(model, schedule, steps=steps, sampler=sampler, eta=eta, guidance=guidance, clamp=clamp,
                        self_condition=self_condition, temperature=temperature, grid=grid,
                        score_temperature=score_temperature, wavefront=wavefront,
                        score_temperature_final=score_temperature_final, wavefront_order=wavefront_order,
                        prior_weight=prior_weight, prior_weight_final=prior_weight_final,
                        score_min_p=score_min_p, draw_x0=draw_x0, gemm=gemm, unroll=unroll)
    ids, x0 = fn(tokens_known, cond_mask, rng)
    return (ids, x0) if return_x0 else ids


class SamplerParts(NamedTuple):
    """A validated sampler, split once: `run(params, tokens, known, rng, *consts)` is the bound
    sampling program (`bound_program`); consts = (ts, ab_t, ab_prev, eta, taus, pws), its
    per-setting arrays; static its static settings, so that
    `sample_program(gemm)(graphdef, state, tokens, known, rng, *consts, **static)` is the same
    program unbound."""
    run: Callable
    params: Any
    consts: tuple
    static: dict


def make_sample_fn(model, schedule: CosineSchedule, **options):
    """A low-overhead sampler for repeated calls (latency benchmarks, serving).

    options: `sampler_parts`' keywords. Validates the settings and splits the model once;
    returns `fn(tokens_known int32 (b, L), cond_mask bool (b, L), rng) -> (ids int32 (b, L),
    x0 float32 (b, L, e))`, the same computation as `sample` (same results for the same
    arguments). The model's weights are captured at this call: build a new function after
    updating them.
    """
    parts = sampler_parts(model, schedule, **options)

    def fn(tokens_known, cond_mask, rng):
        return parts.run(parts.params, tokens_known, cond_mask, rng, *parts.consts)
    return fn


def sampler_parts(model, schedule: CosineSchedule, *, steps: int, sampler: str = "ddim", eta: float = 0.0,
                  guidance: float = 1.0, clamp: bool = True, self_condition: bool | None = None,
                  temperature: float = 0.0, unroll: int = 1, grid: str = "uniform",
                  score_temperature: float = 1.0, wavefront: float = 0.0,
                  score_temperature_final: float = 0.0, wavefront_order: str = "left_to_right",
                  prior_weight: float = 1.0, prior_weight_final: float = -1.0, score_min_p: float = 0.0,
                  draw_x0: bool = False, gemm: str = "auto") -> SamplerParts:
    """The program `make_sample_fn` calls, with its arguments (`SamplerParts`), for callers
    that lower or time it themselves (benchmarks/latency_levers.py).

    `unroll` (>= 1) is the `lax.scan` unroll factor of the step loop: the same computation and
    results, fewer loop iterations. `gemm` picks the compiled program's GEMMs
    (`program_options`, `sample_program`); the other arguments are `sample`'s.
    Raises ValueError for an unknown sampler or gemm and for settings out of range.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    program_options(gemm)  # validates gemm
    if eta < 0 or temperature < 0:
        raise ValueError(f"eta ({eta}) and temperature ({temperature}) must be >= 0")
    if not score_temperature > 0 or score_temperature_final < 0:
        raise ValueError(f"score_temperature must be > 0 and score_temperature_final >= 0, got "
                         f"{score_temperature}, {score_temperature_final}")
    if int(unroll) < 1:
        raise ValueError(f"unroll must be >= 1, got {unroll}")
    if not prior_weight >= 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    if not 0 <= score_min_p < 1:
        raise ValueError(f"score_min_p must be in [0, 1), got {score_min_p}")
    if wavefront < 0 or wavefront_order not in wavefront_lib.ORDERS:
        raise ValueError(f"wavefront must be >= 0 and wavefront_order one of {wavefront_lib.ORDERS}, "
                         f"got {wavefront}, {wavefront_order!r}")
    if wavefront > 0 and (grid != "warp" or not getattr(model, "position_levels", False)):
        raise ValueError("wavefront > 0 needs grid='warp' and a model trained with model.position_levels=True "
                         f"(got grid={grid!r}, position_levels={getattr(model, 'position_levels', False)})")
    if self_condition is None:
        self_condition = model.self_condition
    if self_condition and not model.self_condition:
        raise ValueError("self_condition=True needs a model built with model.self_condition=True")
    if wavefront > 0:  # per-position levels are made inside the program from the clock
        clock, clock_next = wavefront_lib.clock_grid(int(steps))
        ts, ab_t, ab_prev = clock, clock_next, (jnp.arange(int(steps)) == int(steps) - 1).astype(jnp.float32)
    else:
        ts, ab_t, ab_prev = noise_grid(model, schedule, steps, grid)
    graphdef, state = nnx.split(model)
    taus = step_values(float(score_temperature), float(score_temperature_final), int(steps),
                       float(score_temperature_final) > 0)
    pws = step_values(float(prior_weight), float(prior_weight_final), int(steps), float(prior_weight_final) >= 0)
    static = dict(sampler=sampler, guidance=float(guidance), clamp=bool(clamp),
                  self_condition=bool(self_condition), temperature=float(temperature), unroll=int(unroll),
                  reweight=bool(np.any(taus != 1.0)), wavefront=float(wavefront),
                  wavefront_order=str(wavefront_order), score_min_p=float(score_min_p),
                  draw_x0=bool(draw_x0), noise=bool(sampler != "ddim" or eta > 0))
    run, params = bound_program(graphdef, state, gemm, **static)
    consts = (ts, ab_t, ab_prev, jnp.float32(eta), jnp.asarray(taus), jnp.asarray(pws))
    return SamplerParts(run, params, consts, static)


def _guided(a):
    """a twice along the batch axis (the prompted and the prompt-dropped half), None kept."""
    return None if a is None else jnp.concatenate([a, a], axis=0)


def guidance_batch(tokens, known, guidance: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, known, drop_prompt) of the batch the denoiser sees under `guidance`: the prompt
    (1.0), the dropped prompt (0.0), or both halves (else; batch 2b)."""
    b = tokens.shape[0]
    if guidance == 1.0:
        return tokens, known, jnp.zeros((b,), bool)
    if guidance == 0.0:
        return tokens, known, jnp.ones((b,), bool)
    drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    return _guided(tokens), _guided(known), drop


def predict_x0(model, x_t, logsnr, tokens, known, clean, self_cond, *, guidance: float, clamp: bool,
               score_temperature: float = 1.0, prior_weight: float = 1.0, score_min_p: float = 0.0,
               context=None, modulations=None, mixer_constants=None):
    """One guided, clamped, re-imposed estimate at one noise level.

    x_t (b, L, e); logsnr float scalar, or (b, L) one level per position; score_temperature a
    float (1.0 = the model's own estimate, skipped) or a float32 scalar array; prior_weight the
    output prior's weight in the logits (1.0 = as trained); score_min_p > 0 keeps in the
    re-weighting the tokens at least that fraction as likely as each position's most likely one
    (0 = all); context, modulations, mixer_constants: `model.prompt_context` of
    `guidance_batch`, the step's `model.block_modulations` and `model.mixer_constants()`
    computed beforehand, or None (see `DimbaModel.predict`).
    Returns (x0 float32 (b, L, e), logits float32 (b, L, V)).
    """
    b = x_t.shape[0]
    logsnr = jnp.asarray(logsnr, jnp.float32)
    lam = logsnr if logsnr.ndim == 2 else jnp.full((b,), logsnr, jnp.float32)
    g_tokens, g_known, drop = guidance_batch(tokens, known, guidance)
    kw = dict(drop_prompt=drop, prior_weight=prior_weight, context=context,
              modulations=modulations, mixer_constants=mixer_constants)
    if guidance in (0.0, 1.0):
        x0, logits = model.predict(x_t, lam, g_tokens, g_known, self_cond=self_cond, **kw)
    else:
        both_x0, both_logits = model.predict(_guided(x_t), _guided(lam), g_tokens, g_known,
                                             self_cond=_guided(self_cond), **kw)
        x0 = both_x0[b:] + guidance * (both_x0[:b] - both_x0[b:])
        logits = both_logits[b:] + guidance * (both_logits[:b] - both_logits[b:])
    if score_min_p:
        x0 = model.softmax_embedding(step_scores(logits, score_temperature, score_min_p))
    elif not (isinstance(score_temperature, float) and score_temperature == 1.0):
        x0 = model.softmax_embedding(logits, score_temperature)  # the division in its pass
    if clamp:
        x0 = model.clamp_to_embeddings(x0)
    return jnp.where(known[..., None], clean, x0), logits


def step_scores(logits: jax.Array, score_temperature, score_min_p: float = 0.0) -> jax.Array:
    """A step's re-weighted token scores: logits (b, L, V) / score_temperature, with the tokens
    less than score_min_p times as likely as each position's most likely one at -inf (0 = none).
    -> float32 (b, L, V)."""
    scores = logits / score_temperature
    if score_min_p:  # p_v >= m max_u p_u  <=>  s_v >= max_u s_u + log m
        floor = jnp.max(scores, axis=-1, keepdims=True) + math.log(score_min_p)
        scores = jnp.where(scores >= floor, scores, -jnp.inf)
    return scores


def read_out(logits: jax.Array, tokens_known: jax.Array, known: jax.Array, rng: jax.Array,
             temperature: float) -> jax.Array:
    """Token ids from the last step's logits (b, L, V): argmax (or a temperature sample); known
    positions keep their tokens. -> int32 (b, L)."""
    if temperature > 0:
        ids = jax.random.categorical(rng, logits / temperature, axis=-1)
    else:
        ids = jnp.argmax(logits, axis=-1)
    return jnp.where(known, tokens_known, ids.astype(jnp.int32))


def wavefront_levels(model, rank: jax.Array, width: float, clock, clock_next, last
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One reverse step's per-position levels under a wavefront: (logsnr (b, L), alpha_bar there
    (b, L, 1), alpha_bar at the next clock (b, L, 1), 1 everywhere at the `last` step), float32.
    rank (b, L) from `wavefront.generation_rank`; clock, clock_next, last float scalars."""
    lam = model.noise_warp.inverse_cdf(wavefront_lib.progress(clock, rank, width))
    lam_next = model.noise_warp.inverse_cdf(wavefront_lib.progress(clock_next, rank, width))
    a_t = jax.nn.sigmoid(lam)
    a_prev = jnp.where(last > 0, 1.0, jnp.maximum(jax.nn.sigmoid(lam_next), a_t))  # never noisier
    return lam, a_t[..., None], a_prev[..., None]


MAX_STEP_MODULATION_BYTES = 1 << 28  # larger (steps x layers x batch x d) tables: per step


def step_modulations(model, lams: jax.Array, pooled: jax.Array) -> jax.Array | None:
    """Every step's `model.block_modulations` at one level per sequence: lams float32 (S,) the
    steps' log-SNR, pooled float32 (B, d) (`PromptContext.pooled`) -> float32 (S, n_layers, B,
    2, d); None where that table would pass MAX_STEP_MODULATION_BYTES (each step then
    computes its own)."""
    n_steps, batch = lams.shape[0], pooled.shape[0]
    if n_steps * len(model.blocks) * batch * 2 * model.d_model * 4 > MAX_STEP_MODULATION_BYTES:
        return None
    level = jnp.repeat(lams.astype(jnp.float32), batch)  # (S * B,), step-major
    cond = model.block_conditioning(level, jnp.tile(pooled, (n_steps, 1)))
    mods = model.block_modulations(cond)  # (n_layers, S * B, 2, d)
    return jnp.moveaxis(mods.reshape(mods.shape[0], n_steps, batch, *mods.shape[2:]), 1, 0)


def step_values(first: float, last: float, steps: int, scheduled: bool) -> np.ndarray:
    """float32 (steps,): `first` at every step, or (when `scheduled` and last != first) linear in
    the step index from `first` at the noisiest step to `last` at the final one."""
    if scheduled and last != first:
        return np.linspace(first, last, steps, dtype=np.float32)
    return np.full((steps,), first, np.float32)


_STATIC_ARGNAMES = ("graphdef", "sampler", "guidance", "clamp", "self_condition", "temperature", "unroll",
                    "reweight", "wavefront", "wavefront_order", "score_min_p", "draw_x0", "noise")


def sample_program(gemm: str = "auto"):
    """The jitted reverse process (`_sample_program`) compiled with `program_options(gemm)`:
    `_sample_jit` itself where those are XLA's defaults, else one jitted function per option
    set (kept, so each compiles once per shape like `_sample_jit`)."""
    options = program_options(gemm)
    return _sample_jit if not options else _sample_jit_with(tuple(sorted(options.items())))


def bound_program(graphdef, state, gemm: str = "auto", *, pack_max: int = PACK_MAX_ELEMENTS,
                  **static):
    """`sample_program(gemm)` with the model's graph, its state's layout and the static settings
    bound (`layers.bound.bind`). Returns (run, params): `run(params, tokens, known, rng, ts,
    ab_t, ab_prev, eta, taus, pws)` is `_sample_program` on the model `nnx.merge(graphdef,
    state)`, the same program and results; a call hashes no GraphDef and passes few arrays
    (configs/base.py: 428 state arrays, 80 above 65536 elements, the rest packed into one).
    The bound weights are the state's with the compute-dtype linears cast once here
    (`precision.cast_state_linears`; the same bits), so a call casts no weights."""
    graphdef, state = cast_state_linears(graphdef, state)
    return bind(_sample_program, graphdef, state, pack_max=pack_max,
                compiler_options=tuple(sorted(program_options(gemm).items())), **static)


@functools.cache
def _sample_jit_with(options: tuple):
    """`_sample_program` jitted with the compile options ((name, value) pairs), once per set."""
    return jax.jit(_sample_program, static_argnames=_STATIC_ARGNAMES, compiler_options=dict(options))


def _sample_program(graphdef, state, tokens, known, rng, ts, ab_t, ab_prev, eta, taus, pws, *, sampler, guidance,
                    clamp, self_condition, temperature, unroll=1, reweight=False, wavefront=0.0,
                    wavefront_order="left_to_right", score_min_p=0.0, draw_x0=False, noise=True):
    """The reverse process as one program. taus, pws float32 (S,): each step's score temperature
    and prior weight (traced: a sweep over them compiles once); `reweight` False skips the
    score re-weighting (every tau is 1); `draw_x0` steps toward the embedding of a token drawn
    from each step's scores instead of their mean (self-conditioning still reads the mean);
    `noise` False (DDIM at eta 0, whose std is 0) skips each step's Gaussian draw: the same
    results without a (b, L, e) random normal per step."""
    model = nnx.merge(graphdef, state)
    cast_linears_to_compute_dtype(model)  # once, not at every step of the loop
    b, length = tokens.shape
    clean = model.embed(tokens)
    r_init, r_loop, r_read = jax.random.split(rng, 3)
    x = jax.random.normal(r_init, (b, length, model.embed_dim), jnp.float32)
    x = jnp.where(known[..., None], clean, x)
    rank = wavefront_lib.order_rank(wavefront_order, jax.random.fold_in(rng, 7), known)

    steps = int(ts.shape[0])
    # Loop invariants, computed once: the prompt's context, the mixers' SSM constants, and (one
    # level per sequence) every step's block modulations (one GEMM per block for all steps, not
    # one per block and step).
    context = model.prompt_context(*guidance_batch(tokens, known, guidance))
    mixer_constants = model.mixer_constants()
    mods = None if wavefront > 0 else step_modulations(model, ts, context.pooled)

    def body(carry, step):
        x_t, x0_prev, _, key = carry
        lam, a_t, a_prev, tau, pw, mod = step
        tau = tau if reweight else 1.0
        if wavefront > 0:  # the step's inputs are (clock, next clock, last-step flag)
            lam, a_t, a_prev = wavefront_levels(model, rank, wavefront, lam, a_t, a_prev)
        sc = x0_prev if self_condition else None
        x0, logits = predict_x0(model, x_t, lam, tokens, known, clean, sc, guidance=guidance, clamp=clamp,
                                score_temperature=tau, prior_weight=pw, score_min_p=score_min_p,
                                context=context, modulations=mod,
                                mixer_constants=mixer_constants)
        key, sub = jax.random.split(key)
        target = x0
        if draw_x0:
            draw_key = jax.random.fold_in(sub, 1)
            ids = jax.random.categorical(draw_key, step_scores(logits, tau, score_min_p), axis=-1)
            target = jnp.where(known[..., None], clean, model.embed(ids))
        if sampler == "ddpm":
            mean, std = ddpm_posterior(x_t, target, a_t, a_prev)
        else:
            mean, std = ddim_posterior(x_t, target, a_t, a_prev, eta)
        x_next = mean + std * jax.random.normal(sub, x_t.shape, jnp.float32) if noise else mean
        x_next = jnp.where(known[..., None], clean, x_next)
        return (x_next, x0, logits, key), None

    logits0 = jnp.zeros((b, length, model.vocab_size), jnp.float32)
    xs = (ts, ab_t, ab_prev, taus, pws, mods)
    (_, x0, logits, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x), logits0, r_loop), xs,
                                         unroll=min(int(unroll), steps))
    return read_out(logits, tokens, known, r_read, temperature), x0


_sample_jit = jax.jit(_sample_program, static_argnames=_STATIC_ARGNAMES)  # XLA's default options
