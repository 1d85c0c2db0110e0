"""`DimbaTask`: the DIMBA model seen through the trainer's `Task` interface, plus text generation.

    task = DimbaTask(config)                       # tokenizer from config.data.tokenizer
    model = task.init_model(nnx.Rngs(0))
    loss, metrics = task.loss(model, {"tokens": tokens}, rng)          # pure; jit/grad it
    task.generate(model, ["Once upon a time"], length=64, steps=32)    # prompted continuations
    task.infill(model, "The [MASK] sat on the mat.", span_length=8)    # fill the gaps
    task.eval_metrics(model, {"tokens": tokens}, ts=(100, 500, 900))   # validation numbers

Prompts are a known prefix of the one sequence [prompt | generation]; a prompt must fit the
training context (config.data.seq_len tokens), the generation length is free (the Mamba-2 denoiser
handles any length; quality is best up to seq_len). Generated text is cut at the first EOS.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.diffusion import sampler as sampling
from dimba_jax.diffusion.losses import (SELF_COND_COINS, denoise_terms, diffusion_loss,
                                       host_self_cond_coin)
from dimba_jax.diffusion.schedule import add_noise_logsnr, schedule_from_config
from dimba_jax.diffusion.warp import NoiseWarp
from dimba_jax.diffusion.wavefront import ORDERS as WAVEFRONT_ORDERS
from dimba_jax.layers.conditioning import frozen_prompt_encoder
from dimba_jax.models import flops as flops_lib
from dimba_jax.models.dimba import DimbaModel, output_prior_logits, resolve_dtype


def check_wavefront(config) -> None:
    """ValueError (one line, naming the keys) for a wavefront the model or the levels cannot carry:
    diffusion.wavefront / sample.wavefront > 0 need model.position_levels and the warp's levels
    (noise_sampling / grid "warp"); negative widths are refused."""
    d, s, m = config.diffusion, config.sample, config.model
    if d.wavefront_order not in WAVEFRONT_ORDERS or s.wavefront_order not in WAVEFRONT_ORDERS:
        raise ValueError(f"diffusion.wavefront_order ({d.wavefront_order!r}) and sample.wavefront_order "
                         f"({s.wavefront_order!r}) must be one of {WAVEFRONT_ORDERS}")
    if float(d.wavefront) < 0 or float(s.wavefront) < 0 or not 0.0 <= float(d.wavefront_prob) <= 1.0:
        raise ValueError(f"diffusion.wavefront ({d.wavefront}) and sample.wavefront ({s.wavefront}) must be "
                         f">= 0 and diffusion.wavefront_prob ({d.wavefront_prob}) in [0, 1]")
    if float(d.wavefront) > 0 and (d.noise_sampling != "warp" or not m.position_levels):
        raise ValueError("diffusion.wavefront > 0 needs diffusion.noise_sampling='warp' and model.position_levels=True")
    if float(s.wavefront) > 0 and (s.grid != "warp" or not m.position_levels):
        raise ValueError("sample.wavefront > 0 needs sample.grid='warp' and model.position_levels=True")


class DimbaTask:
    """DIMBA as a `dimba_jax.tasks.Task` (init_model / loss / sample_text / flops_per_token)
    plus `generate`, `infill` and `eval_metrics`.

    Args:
      config: the full config (sections model, diffusion, sample, data, train).
      tokenizer: an object with encode/decode/vocab_size/eos_id; None = get_tokenizer(config.data.tokenizer).
      prompt_stack: the donor run's `FrozenStack` when model.prompt_encoder is "frozen"
        (`dimba_jax.train.tasks.make_task` reads it from model.prompt_encoder_checkpoint).
    """

    def __init__(self, config, tokenizer=None, prompt_stack=None):
        if tokenizer is None:
            from dimba_jax.data.tokenizers import get_tokenizer
            tokenizer = get_tokenizer(config.data.tokenizer)
        self.config = config
        self.tokenizer = tokenizer
        self.schedule = schedule_from_config(config.diffusion)
        check_wavefront(config)
        if getattr(config.diffusion, "self_cond_coin", "host") not in SELF_COND_COINS:
            raise ValueError(f"diffusion.self_cond_coin must be one of {SELF_COND_COINS}, got "
                             f"{config.diffusion.self_cond_coin!r}")
        self.prompt_stack = prompt_stack  # FrozenStack of the donor run (prompt_encoder="frozen")
        self._eval_at = nnx.jit(self._eval_terms)
        self._loss_jit = nnx.jit(lambda m, tk, r: self.loss(m, {"tokens": tk}, r))

    # ------------------------------------------------------------------ Task interface
    def init_model(self, rngs: nnx.Rngs) -> DimbaModel:
        """A fresh `DimbaModel` (vocabulary of the tokenizer, params in config.train.param_dtype),
        with the frozen prompt encoder when the task holds a donor stack, and a `NoiseWarp` over
        diffusion.logsnr_range when the noise sampling or the sampling grid uses one."""
        encoder = None if self.prompt_stack is None else frozen_prompt_encoder(
            self.prompt_stack, int(self.config.model.d_model),
            param_dtype=resolve_dtype(self.config.train.param_dtype), rngs=rngs)
        d = self.config.diffusion
        warp = None
        if d.noise_sampling == "warp" or self.config.sample.grid == "warp":
            lo, hi = (float(v) for v in d.logsnr_range)
            warp = NoiseWarp(lo, hi, bins=int(d.warp_bins), max_loss=math.log(self.tokenizer.vocab_size),
                             floor=float(d.warp_floor))
        model = DimbaModel(self.config.model, self.tokenizer.vocab_size, prompt_encoder=encoder,
                           param_dtype=self.config.train.param_dtype, noise_warp=warp, rngs=rngs)
        if self.config.model.init_from_mamba_ssm:
            # Warm start from a pretrained mamba_ssm / HF-layout Mamba-2: block i <- layer i (both
            # directions get the causal mixer), embedding <- its rows (see interop/warm_start.py).
            from dimba_jax.interop.warm_start import warm_start_denoiser
            table = model.embedding if model.embed_dim == model.d_model else None  # only at e = d_model
            warm_start_denoiser(model.blocks, table, self.config.model.init_from_mamba_ssm,
                                final_norm=model.final_norm)
        return model

    def loss(self, model: DimbaModel, batch: dict, rng: jax.Array,
             self_cond: bool | None = None) -> tuple[jax.Array, dict]:
        """batch {"tokens": int32 (b, L)} -> (float32 loss, metrics: loss, mse, ce, acc, embed_norm,
        embed_mean_dir, known_frac). Pure in (model state, batch, rng); self_cond: the host's
        self-conditioning coin (`step_options`), None = tossed from rng. See diffusion/losses.py."""
        if "tokens" not in batch:
            raise ValueError(f"batch needs a 'tokens' entry, got keys {sorted(batch)}")
        return diffusion_loss(model, self.schedule, jnp.asarray(batch["tokens"], jnp.int32), rng,
                              self.config.diffusion, self_cond=self_cond)

    def _host_coin(self) -> bool:
        """Whether the host tosses the self-conditioning coin (diffusion.self_cond_coin "host"
        and a model with self-conditioning)."""
        return (getattr(self.config.diffusion, "self_cond_coin", "host") == "host"
                and bool(self.config.model.self_condition))

    def step_options(self, step: int) -> tuple:
        """The static loss options of train step `step` (`loss`'s keywords as (name, value)
        pairs; the train step is compiled once per distinct value): (("self_cond", coin),)
        with the host's coin (`diffusion.losses.host_self_cond_coin`), else ()."""
        if not self._host_coin():
            return ()
        return (("self_cond", host_self_cond_coin(int(self.config.seed), step,
                                                  float(self.config.diffusion.self_cond_prob))),)

    def step_option_sets(self) -> list[tuple]:
        """Every value `step_options` can return (what a benchmark compiles before timing): one
        per coin side its probability reaches."""
        if not self._host_coin():
            return [()]
        prob = float(self.config.diffusion.self_cond_prob)
        return [(("self_cond", coin),) for coin in (False, True)
                if (prob < 1.0 if not coin else prob > 0.0)]

    def sample_text(self, model: DimbaModel, rng: jax.Array, num: int) -> list[str]:
        """`num` unprompted samples of config.sample.length tokens with the config.sample settings."""
        s = self.config.sample
        tokens = jnp.zeros((num, int(s.length)), jnp.int32)
        out = sampling.sample(model, self.schedule, tokens, jnp.zeros_like(tokens, bool), rng,
                              **self._sampler_kwargs())
        return [self._decode(row) for row in np.asarray(out)]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (matmul multiply-adds x 2; see dimba_jax/models/flops.py).

        forward = the Mamba-2 blocks (in/out projections once; conv + SSD twice when bidirectional,
                  since the two directions share their projections) + the tied head (2 e V, e the
                  diffusion width model.embed_dim) + 2 e V each for the score interpolation
                  (softmax @ E) and the output prior (x_t @ E^T) where it runs alone (with the
                  posterior input, or an untied head; a tied head folds it into its own GEMM,
                  `DimbaModel.folds_prior`), and 2 e V for the posterior input's softmax @ E
                  (model.posterior_input; it shares the prior's x_t @ E^T)
                + the stem: input projection 2 (2e+1) d (or (e+1) d without self-conditioning,
                  e d more with the posterior input),
                  output projection 2 d e, prompt MLP 2 (e 2d + 2d d) (counted at every position),
                  with model.position_levels the per-position level embedding 2 (t_dim d + 2 d d);
        training = 3 x forward (forward + backward) + self_cond_prob x forward (the no-grad
                   self-conditioning pass). Per-sequence work (timestep MLP, FiLM) is ignored.
        """
        m, d = self.config.model, int(self.config.model.d_model)
        e = int(getattr(m, "embed_dim", 0) or d)
        v = self.tokenizer.vocab_size
        post = bool(getattr(m, "posterior_input", False))
        n_in = e * (1 + bool(m.self_condition) + post) + 1
        stem = 2.0 * n_in * d + 2.0 * d * e + (2.0 * (e * 2 * d + 2 * d * d) if m.prompt_encoder == "mlp" else 0.0)
        prior_alone = post or (bool(m.skip_logits) and not bool(m.tie_embeddings))
        stem += 2.0 * e * v * ((m.readout == "score_interp") + prior_alone + post)
        if getattr(m, "position_levels", False):  # each position's level: timestep MLP + level_proj
            stem += 2.0 * (int(m.time_embed_dim) * d + 2 * d * d)
        # A bidirectional block shares in_proj / out_proj between its directions and computes
        # them once (layers/mamba2.py); only the conv, SSD and gated norm run per direction.
        fwd = flops_lib.mamba2_lm_forward_flops(m, vocab_size=v, seq_len=seq_len,
                                                directions=2 if m.bidirectional else 1,
                                                shared_projections=True, extra_per_token=stem,
                                                head_width=e)
        extra = float(self.config.diffusion.self_cond_prob) * fwd if m.self_condition else 0.0
        return flops_lib.training_flops(fwd) + extra

    # ------------------------------------------------------------------ generation
    def _sampler_kwargs(self, steps=None, sampler=None, eta=None, guidance=None, clamp=None,
                        temperature=None) -> dict:
        """config.sample's sampler arguments (`sampling.sampler_options`), the given ones replaced."""
        opts = sampling.sampler_options(self.config.sample)
        given = dict(steps=steps, sampler=sampler, eta=eta, guidance=guidance, clamp=clamp,
                     temperature=temperature)
        opts.update({k: type(opts[k])(v) for k, v in given.items() if v is not None})
        return opts

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(sampling.cut_at_eos(ids, self.tokenizer.eos_id))

    def generate(self, model: DimbaModel, prompts: list[str], length: int | None = None,
                 steps: int | None = None, sampler: str | None = None, eta: float | None = None,
                 guidance: float | None = None, clamp: bool | None = None, seed: int = 0,
                 temperature: float | None = None) -> list[str]:
        """Continues each prompt by `length` tokens (default config.sample.length).

        Each prompt's tokens are the known prefix; prompts of different lengths share one batch
        of length max_prompt + length. Returns the continuations only (decoded, cut at the first
        EOS), one string per prompt. An empty prompt gives an unconditional sample.
        Raises ValueError: no prompts, length <= 0, a prompt longer than config.data.seq_len,
        steps outside 1..T, unknown sampler.
        """
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        length = int(self.config.sample.length if length is None else length)
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        ids = [self.tokenizer.encode(p) for p in prompts]
        context = int(self.config.data.seq_len)
        for i, row in enumerate(ids):
            if len(row) > context:
                raise ValueError(f"prompt {i} has {len(row)} tokens but the context (data.seq_len) is "
                                 f"{context} tokens")
        max_prompt = max(len(r) for r in ids)
        total = max_prompt + length
        tokens = np.zeros((len(ids), total), np.int32)
        mask = np.zeros((len(ids), total), bool)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = row
            mask[i, :len(row)] = True
        out = np.asarray(sampling.sample(
            model, self.schedule, tokens, mask, jax.random.key(seed),
            **self._sampler_kwargs(steps, sampler, eta, guidance, clamp, temperature)))
        return [self._decode(out[i, len(row):len(row) + length]) for i, row in enumerate(ids)]

    def infill(self, model: DimbaModel, text: str, mask_token: str = "[MASK]", span_length: int = 16,
               steps: int | None = None, sampler: str | None = None, eta: float | None = None,
               guidance: float | None = None, clamp: bool | None = None, seed: int = 0,
               temperature: float | None = None) -> str:
        """Replaces every `mask_token` in `text` by `span_length` generated tokens (each span cut at
        its first EOS) and returns the completed text. ValueError if `mask_token` does not occur
        or span_length <= 0."""
        if not mask_token or mask_token not in text:
            raise ValueError(f"infill: mask token {mask_token!r} does not occur in the text")
        if span_length <= 0:
            raise ValueError(f"span_length must be > 0, got {span_length}")
        parts = [self.tokenizer.encode(p) for p in text.split(mask_token)]
        tokens, mask, spans = [], [], []
        for j, part in enumerate(parts):
            tokens += part
            mask += [True] * len(part)
            if j < len(parts) - 1:
                spans.append(len(tokens))
                tokens += [0] * span_length
                mask += [False] * span_length
        out = np.asarray(sampling.sample(
            model, self.schedule, np.asarray([tokens], np.int32), np.asarray([mask]), jax.random.key(seed),
            **self._sampler_kwargs(steps, sampler, eta, guidance, clamp, temperature)))[0]
        pieces = []
        for j, part in enumerate(parts):
            pieces.append(self.tokenizer.decode(part))
            if j < len(spans):
                pieces.append(self._decode(out[spans[j]:spans[j] + span_length]))
        return "".join(pieces)

    # ------------------------------------------------------------------ evaluation
    def _eval_terms(self, model, tokens, logsnr, noise, cond_mask):
        """Loss terms at given levels logsnr (b,), layout cond_mask (b, L), prompt kept,
        self-conditioning pass on when the model has it."""
        d = self.config.diffusion
        terms = denoise_terms(model, tokens, logsnr, cond_mask, jnp.zeros((tokens.shape[0],), bool),
                              noise, True, float(d.mse_weight), float(d.ce_weight))
        terms.pop("x0_hat")
        terms.pop("ce_example")
        terms.pop("nll")
        logits = terms.pop("logits")
        terms["correct"] = (jnp.argmax(logits, -1) == tokens)  # (b, L) bool
        return terms

    def terms_at(self, model, tokens, logsnr: float, noise, cond_mask=None) -> dict:
        """The denoiser's loss terms at one log-SNR for given noise: tokens int32 (b, L), noise
        float (b, L, e), cond_mask bool (b, L) (None = every position generated), prompt kept,
        self-conditioning pass on when the model has it. Returns float32 scalars loss, mse, ce,
        acc and `correct` bool (b, L) (the head's argmax is the token)."""
        b = tokens.shape[0]
        cond_mask = jnp.zeros(tokens.shape, bool) if cond_mask is None else cond_mask
        return self._eval_at(model, tokens, jnp.full((b,), logsnr, jnp.float32), noise, cond_mask)

    def default_eval_logsnrs(self, num: int = 9) -> tuple[float, ...]:
        """`num` evenly spaced log-SNR levels over diffusion.logsnr_range, noisiest first."""
        lo, hi = (float(v) for v in self.config.diffusion.logsnr_range)
        return tuple(float(v) for v in np.round(np.linspace(lo, hi, num), 3))

    def eval_metrics(self, model: DimbaModel, batch: dict, ts=None, rng: jax.Array | None = None,
                     logsnrs=None) -> dict[str, float]:
        """Validation numbers on one batch {"tokens": int32 (b, L)}.

        Returns floats: loss, mse, ce, acc (the training loss with its random draws from `rng`,
        default key 0); for each log-SNR level in `logsnrs` (default `default_eval_logsnrs()`)
        loss/mse/ce/acc_lam{level:g}; with `ts`, the same for those timesteps of the schedule as
        loss/mse/ce/acc_t{t}. Unconditional layout (every position generated), fixed noise,
        self-conditioning pass on when the model has it. acc is the head's token accuracy.
        """
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        rng = jax.random.key(0) if rng is None else rng
        r_loss, r_noise = jax.random.split(rng)
        _, metrics = self._loss_jit(model, tokens, r_loss)
        out = {k: float(metrics[k]) for k in ("loss", "mse", "ce", "acc")}
        noise = jax.random.normal(r_noise, (*tokens.shape, model.embed_dim), jnp.float32)
        points = []
        for t in (ts or ()):
            t = int(t)
            if not 1 <= t <= self.schedule.timesteps:
                raise ValueError(f"eval timestep {t} outside 1..{self.schedule.timesteps}")
            points.append((f"t{t}", float(self.schedule.logsnr_table()[t])))
        if ts is None:
            points += [(f"lam{lam:g}", lam) for lam in (logsnrs or self.default_eval_logsnrs())]
        for name, lam in points:
            terms = self.terms_at(model, tokens, lam, noise)
            out.update({f"{k}_{name}": float(terms[k]) for k in ("loss", "mse", "ce", "acc")})
        return out

    def nll_bound(self, model: DimbaModel, batch: dict, levels: int = 128,
                  rng: jax.Array | None = None) -> dict[str, float]:
        """A variational upper bound on -log p(tokens), in bits per token, on one batch.

        The continuous-time bound of VDM (Kingma et al. 2021) for x0 = the tokens' embeddings E[w]
        over the log-SNR range [lo, hi] = diffusion.logsnr_range:
            -log p(w) <= E[-log p(w | z_hi)]                         reconstruction (head's CE at hi)
                       + 1/2 int_lo^hi e^lambda E||x0 - x0_hat(z_lambda)||^2 dlambda   diffusion
                       + KL(q(z_lo | x0) || N(0, I))                                      prior
        with KL = 1/2 (ab ||x0||^2 - e ab - e log(1 - ab)) per token at ab = sigmoid(lo), e the
        width of the diffusion space (model.embed_dim). The
        diffusion integral is estimated by stratified sampling: one level in each of `levels`
        equal strata of [lo, hi], fresh noise per level (unbiased; the integrand is peaked over a
        few units of lambda, so use >= 64 levels: with 16 the estimate scatters by ~10%). Unconditional layout (every position
        generated); the self-conditioning pass (a function of the same z) is on when the model
        has it. Returns floats: bound_bits (per token), and its parts recon_bits, diffusion_bits,
        prior_bits.
        """
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        e = model.embed_dim

        def terms(lam, noise):
            out = self.terms_at(model, tokens, lam, noise)
            return float(out["mse"]) * e, float(out["ce"])  # squared error per token, summed over e

        return self._vdm_bound(model, tokens, terms, levels, rng)

    def unigram_bound(self, model: DimbaModel, batch: dict, log_prior, levels: int = 128,
                      rng: jax.Array | None = None) -> dict[str, float]:
        """`nll_bound` of the denoiser that knows no context: each position's exact posterior
        under a unigram prior, softmax(log_prior + prior_logits(x_t)), read out as x0_hat =
        posterior @ E, over the model's own embedding table (same strata and noise as
        `nll_bound` with the same rng). A trained denoiser's bound below this one is what it has
        learned from context; the two differ by the information the neighbours carry.
        log_prior: float (V,) log unigram probabilities (e.g. of the training tokens). Returns the
        keys of `nll_bound`."""
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        table = model.embedding_table()

        def terms(lam, noise):
            out = self.context_free_terms(table, tokens, log_prior, lam, noise)
            return float(out["sq_err"]), float(out["ce"])

        return self._vdm_bound(model, tokens, terms, levels, rng)

    def context_free_terms(self, table: jax.Array, tokens: jax.Array, log_prior, logsnr: float,
                           noise: jax.Array) -> dict[str, jax.Array]:
        """The context-free denoiser at one log-SNR: each position's exact posterior under the
        prior `log_prior` (float (V,)) given its own x_t = add_noise_logsnr(table[tokens], logsnr,
        noise). table: float32 (V, e) the embedding table (`DimbaModel.embedding_table()`, rows of
        equal norm); tokens int32 (b, L); noise float (b, L, e). Returns float32 scalars: sq_err
        (||x0 - posterior @ E||^2 per token, summed over e) and ce (the posterior's cross-entropy
        on the tokens, nats)."""
        log_prior = jnp.asarray(log_prior, jnp.float32)
        if log_prior.shape != (table.shape[0],):
            raise ValueError(f"context-free denoiser: log_prior must have shape ({table.shape[0]},), got {log_prior.shape}")
        return self._context_free_jit(table, jnp.asarray(tokens, jnp.int32), log_prior,
                                      jnp.float32(logsnr), jnp.asarray(noise, jnp.float32))

    @staticmethod
    @jax.jit
    def _context_free_jit(table, tokens, log_prior, lam, noise):
        x0 = table[tokens]
        lam = jnp.full((tokens.shape[0],), lam)
        x_t = add_noise_logsnr(x0, lam, noise)
        logp = jax.nn.log_softmax(log_prior + output_prior_logits(x_t, lam, table), -1)
        x0_hat = jnp.einsum("blv,vd->bld", jnp.exp(logp), table)
        ce = -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))
        return {"sq_err": jnp.mean(jnp.sum(jnp.square(x0_hat - x0), -1)), "ce": ce}

    def _vdm_bound(self, model: DimbaModel, tokens: jax.Array, terms, levels: int,
                   rng: jax.Array | None) -> dict[str, float]:
        """The bound of `nll_bound` for a denoiser given as terms(lam, noise) -> (squared x0 error
        per token summed over e, head cross-entropy), both floats, at log-SNR lam."""
        lo, hi = (float(v) for v in self.config.diffusion.logsnr_range)
        rng = jax.random.key(0) if rng is None else rng
        r_u, r_noise = jax.random.split(rng)
        u = np.asarray(jax.random.uniform(r_u, (levels,)))
        width = (hi - lo) / levels
        e = model.embed_dim
        diffusion = 0.0
        for i in range(levels):
            lam = lo + (i + float(u[i])) * width
            noise = jax.random.normal(jax.random.fold_in(r_noise, i), (*tokens.shape, e), jnp.float32)
            diffusion += 0.5 * math.exp(lam) * terms(lam, noise)[0] * width
        noise = jax.random.normal(jax.random.fold_in(r_noise, levels), (*tokens.shape, e), jnp.float32)
        recon = terms(hi, noise)[1]
        ab = 1.0 / (1.0 + math.exp(-lo))
        norm2 = float(model.embed_norm) ** 2
        prior = 0.5 * (ab * norm2 - e * ab - e * math.log1p(-ab))
        bits = 1.0 / math.log(2.0)
        return {"bound_bits": (recon + diffusion + prior) * bits, "recon_bits": recon * bits,
                "diffusion_bits": diffusion * bits, "prior_bits": prior * bits}

    def context_use(self, model: DimbaModel, batch: dict, prompt_len: int = 32, positions: int = 8,
                    logsnrs=None, rng: jax.Array | None = None) -> dict[str, float]:
        """How much the denoiser uses a prompt: the head's accuracy on the `positions` tokens right
        after a clean `prompt_len`-token prefix, with the prefix known (acc_prompt_lam{level}) and
        with it noised like the rest (acc_noprompt_lam{level}), at each log-SNR level (default:
        the noisy half of `default_eval_logsnrs()`); a denoiser that reads context gains.
        Needs seq_len > prompt_len + positions."""
        out = {}
        for lam, (with_p, without) in self.context_use_by_position(model, [batch], prompt_len, positions,
                                                                    logsnrs, rng).items():
            out[f"acc_prompt_lam{lam:g}"] = float(np.mean(with_p))
            out[f"acc_noprompt_lam{lam:g}"] = float(np.mean(without))
        return out

    def context_use_by_position(self, model: DimbaModel, batches: list[dict], prompt_len: int = 32,
                                positions: int = 8, logsnrs=None, rng: jax.Array | None = None
                                ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """`context_use` position by position over the windows of `batches` (each {"tokens": int32
        (b, L)}, the same noise key for each): {level: (accuracy with the prompt known, without
        it)}, each float64 (positions,), the first entry the token right after the prompt."""
        rng = jax.random.key(1) if rng is None else rng
        if logsnrs is None:
            levels = self.default_eval_logsnrs()
            logsnrs = levels[:len(levels) // 2 + 1]
        window = slice(prompt_len, prompt_len + positions)
        hits = {float(lam): ([], []) for lam in logsnrs}
        for batch in batches:
            tokens = jnp.asarray(batch["tokens"], jnp.int32)
            b, length = tokens.shape
            if length < prompt_len + positions:
                raise ValueError(f"context_use needs windows of at least {prompt_len + positions} tokens, got {length}")
            noise = jax.random.normal(rng, (b, length, model.embed_dim), jnp.float32)
            prefix = jnp.broadcast_to(jnp.arange(length)[None, :] < prompt_len, (b, length))
            for lam, (with_p, without) in hits.items():
                with_p.append(np.asarray(self.terms_at(model, tokens, lam, noise, prefix)["correct"][:, window]))
                without.append(np.asarray(self.terms_at(model, tokens, lam, noise)["correct"][:, window]))
        return {lam: (np.mean(np.concatenate(w), 0, dtype=np.float64), np.mean(np.concatenate(wo), 0, dtype=np.float64))
                for lam, (w, wo) in hits.items()}
