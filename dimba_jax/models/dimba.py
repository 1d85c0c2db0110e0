"""The DIMBA denoiser: D(x_t, known prompt, tau(t)) -> x0_hat over one sequence [prompt | generation].

Decisions:

* **The diffusion space.** Tokens diffuse in a space of width e = `model.embed_dim` (0 means
  d_model): the embedding table, the noise, x_t, self-conditioning and x0_hat are all (.., e). The
  stem projects [x_in | self_cond | mask] from 2e + 1 (3e + 1 with `posterior_input`) to d_model and the output projection maps
  d_model back to e. A small e (Plaid uses 16) packs the vocabulary closely, so noise removes
  coarse information (which cluster of similar tokens) before fine, and context decides between
  the near neighbours; at e = d_model random rows are nearly orthogonal and every token resolves
  at once from its own position.
* **Embeddings at a fixed scale.** The table's rows are L2-normalised and multiplied by
  `embed_scale * sqrt(e)`, so every entry has ~unit variance, matching the N(0, I) noise.
  The x0 MSE therefore cannot shrink the embeddings (the classic collapse of learned-embedding
  diffusion). The output head is weight-tied to this normalised table:
  logits = exp(logit_scale) * (x @ E^T) / (embed_scale * sqrt(e)), a cosine-like score
  with a learned temperature (`logit_scale`, init 0 so an exact embedding scores
  sqrt(e) * embed_scale). `tie_embeddings=False` uses a separate Linear head instead.
* **One sequence with a mask.** `cond_mask` (b, L) is True at known (clean) positions. The input
  per position is [x_in | self_cond | posterior | mask], projected to d_model, where x_in is x_t at generated
  positions and the clean embedding at known positions (re-imposed inside the model, so callers
  may pass anything there). The self-conditioning channel (the previous x0 estimate, zeros when
  absent) is overwritten at known positions by the same clean value, so it never carries more
  than the model is allowed to see. The output x0_hat has the clean embeddings re-imposed at known
  positions. With `model.posterior_input` the stem also reads each position's posterior mean
  under the output prior alone, softmax(prior_logits(x_t)) @ E (the exact E[x0 | its own x_t]
  under a uniform prior over the vocabulary; clean embeddings at known positions): a denoised
  view of every neighbour that the blocks would otherwise have to compute from x_t through the
  whole vocabulary, given at every step, where self-conditioning gives the previous estimate on
  half the training steps. `model.posterior_grad` False stops the gradient at that channel (it
  is then a constant of the input, as x_t is): the embedding table learns only through the
  other paths, and the channel costs less than half as much to train.
* **Prompt conditioning.** The prompt encoder turns the visible prompt positions into c (b, L, d):
  added to the hidden state there, and its mean over visible positions (zero when none), through
  a linear map, joins tau(t): cond = silu(tau(t) + W_pool mean(c)). `cond` modulates every block
  by FiLM (scale/shift of the normalised block input) or additively (shift), per
  `model.conditioning`.
* **Classifier-free guidance (prompt dropout).** A dropped example (`drop_prompt`) keeps the same
  layout — the same positions are generated, so the conditional and unconditional x0 estimates
  can be combined position by position — but every known position shows a learned, fixed-norm
  "null" embedding instead of its token (input and self-conditioning channels), the mask channel
  still says "known" (these positions are not to be generated), and the prompt encoder sees
  nothing (c = 0). We rejected "mask = 0 at dropped positions": it would make the null positions
  look like generated positions with an odd x_t, conflating two roles.
* **Noise level and read-out.** The denoiser is told the noise level as the log-SNR lambda
  (`noise_time` maps it to the timestep embedding's input), so any schedule, shift or learned warp
  of the levels can drive it. lambda is one level per sequence (b,) or one per position (b, L)
  (a wavefront, diffusion/wavefront.py): the blocks' FiLM then reads the mean level over the
  generated positions, and with `model.position_levels` the stem also adds each position's own
  level embedding, Linear(tau(lambda_i)), so the network knows which neighbours are cleaner. `model.readout` "score_interp" (default) makes the network predict
  token logits and x0_hat = softmax(logits) @ E, the softmax-weighted mean of embedding rows
  (CDCD's score interpolation: x0_hat stays on the vocabulary's hull, trained by cross-entropy);
  "direct" regresses x0_hat itself (the paper's x0-MSE) and reads logits off it through the head.
  `model.skip_logits` adds the output prior (`prior_logits`: the exact per-token Gaussian
  likelihood of x_t under each row) to the logits, so the network only adds what context tells;
  both are linear in E, so with a tied head one GEMM computes their sum (`logits_with_prior`).
* **Blocks.** Pre-norm residual blocks h <- h + Mamba2(cond(RMSNorm(h))), bidirectional
  (`BidirectionalMamba2`: forward scan plus flipped scan) by default, causal `Mamba2` when
  `model.bidirectional` is False; then a final RMSNorm and a linear map to width e (the head's input; x0_hat itself with
  the direct read-out). The residual
  stream runs in float32; the mixers compute in `model.compute_dtype`.
* **Head precision.** The vocabulary-sized GEMMs (the tied head x @ E^T, the output prior
  x_t @ E^T and every softmax @ E) take their operands in `model.head_dtype` ("float32" or
  "bfloat16") and accumulate in float32 (`layers.precision.head_einsum`, forward and backward); logits,
  softmaxes and x0_hat are float32 either way. A config without the key (a run saved before
  it existed) keeps "float32", the precision it was trained at. The diffusion-space
  projections (the stem, [x_t | self-cond | ...] -> d, `out_proj`, d -> e, and the "mlp"
  prompt encoder's two GEMMs, e -> 2 d -> d) likewise take
  their operands and parameters in `model.io_dtype` (`layers.precision.affine`), float32 out;
  "float32" where the key is absent.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dimba_jax.layers.conditioning import (MlpPromptEncoder, TimestepEmbedding, dense,
                                           make_block_conditioning)
from dimba_jax.layers.fused_softmax import (numerator_size_error, softmax_numerator_pallas,
                                            softmax_numerator_xla)
from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2
from dimba_jax.layers.norms import RMSNorm, partitioned, prenorm
from dimba_jax.layers.precision import affine, head_einsum
from dimba_jax.layers.triton_common import check_impl, default_interpret, use_fused
from dimba_jax.ssd import KernelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


READOUTS = ("score_interp", "direct")
HEAD_DTYPES = ("float32", "bfloat16")
# The timestep embedding reads lambda through t_in = (LOGSNR_TOP - lambda) * TIME_PER_LOGSNR, so
# lambda in [-28, 12] spans t_in in [0, 1000], the range its sinusoidal features are made for.
LOGSNR_TOP = 12.0
TIME_PER_LOGSNR = 25.0


def output_prior_logits(x_t: jax.Array, logsnr: jax.Array, table: jax.Array,
                        dtype=jnp.float32) -> jax.Array:
    """The output prior ("skip logits"): log N(x_t; sqrt(ab) e_v, (1 - ab) I) per row v of
    `table`, up to a constant per position (every row has the same norm, so ||e_v||^2 drops out):
    sqrt(ab) / (1 - ab) * x_t . e_v with ab = sigmoid(logsnr). It is the exact posterior over
    tokens of a position seen alone under a uniform prior; the head learns what context adds.
    lambda is clipped to the range the timestep embedding covers ([-28, 12]).
    x_t float (b, L, e), logsnr float (b,) or (b, L), table float (V, e) -> float32 (b, L, V);
    dtype: the GEMM's operand dtype (`head_einsum`)."""
    return head_einsum("bld,vd->blv", x_t.astype(jnp.float32), table, dtype) * prior_coef(logsnr)


def prior_coef(logsnr: jax.Array) -> jax.Array:
    """The output prior's factor sqrt(ab) / (1 - ab), lambda clipped as `output_prior_logits`:
    logsnr (b,) or (b, L) -> float32 (b, 1, 1) or (b, L, 1)."""
    lam = jnp.clip(logsnr.astype(jnp.float32), LOGSNR_TOP - 1000.0 / TIME_PER_LOGSNR, LOGSNR_TOP)
    coef = jnp.sqrt(jax.nn.sigmoid(lam)) / jax.nn.sigmoid(-lam)
    return coef[:, :, None] if coef.ndim == 2 else coef[:, None, None]


def noise_time(logsnr: jax.Array) -> jax.Array:
    """The timestep embedding's input for log-SNR levels: float (b,) -> float32 (b,)."""
    return (LOGSNR_TOP - logsnr.astype(jnp.float32)) * TIME_PER_LOGSNR


def resolve_dtype(name) -> jnp.dtype:
    """"float32" | "bfloat16" | "float16" (or a dtype) -> jnp dtype; anything else -> ValueError."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def normalize_rows(table: jax.Array, scale: float) -> jax.Array:
    """Each row of (V, d) L2-normalised then multiplied by `scale` (float32)."""
    table = table.astype(jnp.float32)
    return table * (scale * jax.lax.rsqrt(jnp.sum(jnp.square(table), -1, keepdims=True) + 1e-12))


class PromptContext(NamedTuple):
    """What the denoiser reads from the prompt alone (`DimbaModel.prompt_context`).

    known: bool (b, L) the known positions; shown float32 (b, L, e) what each known position
    shows (its clean embedding, or the null embedding where the prompt is dropped); c_pos
    float32 (b, L, d) the prompt encoder's output (zero where not visible); pooled float32
    (b, d) its mean over the visible positions.
    """

    known: jax.Array
    shown: jax.Array
    c_pos: jax.Array
    pooled: jax.Array


class DimbaBlock(nnx.Module):
    """Pre-norm residual Mamba-2 block with FiLM / additive conditioning.

    __call__(h float32 (b, L, d), c float32 (b, cond_dim) or None) -> float32 (b, L, d):
    h + mixer(cond(norm(h), c)). With c=None the conditioning is skipped (used when a trained
    stack serves as a frozen encoder). A stack runs `prenorm` and `mixer` itself so that each
    block's pre-norm also adds the previous block's mixer output.
    """

    def __init__(self, model_cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        m = model_cfg
        self.norm = RMSNorm(m.d_model, param_dtype=param_dtype, rngs=rngs)
        self.cond = make_block_conditioning(m.conditioning, m.d_model, m.d_model,
                                            param_dtype=param_dtype, rngs=rngs)
        mixer_cls = BidirectionalMamba2 if m.bidirectional else Mamba2
        self.mixer = mixer_cls(m.d_model, d_state=m.d_state, expand=m.expand, headdim=m.headdim,
                               ngroups=m.ngroups, d_conv=m.d_conv, chunk_size=m.chunk_size,
                               ssd_impl=m.ssd_impl, ssd_kernels=KernelConfig.from_config(m),
                               norm_impl=getattr(m, "norm_impl", "auto"),
                               conv_impl=getattr(m, "conv_impl", "auto"),
                               conv_forward=getattr(m, "conv_forward", "triton"),
                               conv_backward=getattr(m, "conv_backward", "triton"),
                               core_vjp=bool(getattr(m, "mixer_core_vjp", False)),
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def prenorm(self, h: jax.Array, delta: jax.Array | None,
                mod: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(u, x): u = h + delta (h's dtype; h itself for delta None), x = norm(u) * (1 + scale)
        + shift in the blocks' dtype, the mixer's input (`norms.prenorm`). h (b, L, d) float32;
        delta (b, L, d) (the previous block's mixer output) or None; mod float32 (b, 2, d) =
        [scale; shift] (`self.cond.modulation(c)`) or None (no conditioning)."""
        return prenorm(h, delta, self.norm.weight[...], mod, eps=self.norm.eps, dtype=self.dtype)

    def __call__(self, h: jax.Array, c: jax.Array | None = None) -> jax.Array:
        h, x = self.prenorm(h, None, None if c is None else self.cond.modulation(c))
        return h + self.mixer(x).astype(h.dtype)


class DimbaModel(nnx.Module):
    """The DIMBA denoiser (see the module docstring for every design decision).

    Args:
      model_cfg: `config.model` (d_model, n_layers, d_state, expand, headdim, ngroups, d_conv,
        chunk_size, ssd_impl, norm_impl, conv_impl, conv_forward, conv_backward, mixer_core_vjp, bidirectional, conditioning,
        prompt_encoder, prompt_encoder_checkpoint, tie_embeddings, embed_scale, time_embed_dim,
        self_condition, compute_dtype, head_dtype, io_dtype, readout, skip_logits, posterior_input,
        posterior_grad, logit_bias, position_levels).
      vocab_size: number of token ids (embedding rows).
      param_dtype: parameter dtype (config.train.param_dtype).
      prompt_encoder: optional ready-made prompt encoder module (overrides model.prompt_encoder;
        e.g. a `FrozenPromptEncoder` built from given blocks).
      noise_warp: optional module the diffusion task keeps with the model (its learned noise
        warp), so that it is trained, averaged and checkpointed with the weights; unused here.
      rngs: parameter initialisation.
    """

    def __init__(self, model_cfg, vocab_size: int, *, param_dtype=jnp.float32,
                 prompt_encoder: nnx.Module | None = None, noise_warp: nnx.Module | None = None,
                 rngs: nnx.Rngs):
        m = model_cfg
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        param_dtype = resolve_dtype(param_dtype)
        d = int(m.d_model)
        e = int(getattr(m, "embed_dim", 0) or d)
        if e < 1:
            raise ValueError(f"model.embed_dim must be >= 0 (0 = d_model), got {m.embed_dim}")
        self.d_model = d
        self.embed_dim = e
        self.vocab_size = int(vocab_size)
        self.self_condition = bool(m.self_condition)
        self.tie_embeddings = bool(m.tie_embeddings)
        self.embed_norm = float(m.embed_scale) * math.sqrt(e)  # the fixed row norm
        self.compute_dtype = resolve_dtype(m.compute_dtype)
        self.readout = str(m.readout)
        if self.readout not in READOUTS:
            raise ValueError(f"model.readout must be one of {READOUTS}, got {m.readout!r}")
        head_dtype = str(getattr(m, "head_dtype", "float32"))
        if head_dtype not in HEAD_DTYPES:
            raise ValueError(f"model.head_dtype must be one of {HEAD_DTYPES}, got {head_dtype!r}")
        self.head_dtype = _DTYPES[head_dtype]
        io_dtype = str(getattr(m, "io_dtype", "float32"))
        if io_dtype not in HEAD_DTYPES:
            raise ValueError(f"model.io_dtype must be one of {HEAD_DTYPES}, got {io_dtype!r}")
        self.io_dtype = _DTYPES[io_dtype]
        self.softmax_impl = check_impl("model.softmax_impl",
                                       str(getattr(m, "softmax_impl", "xla")))
        self.skip_logits = bool(m.skip_logits)
        self.posterior_input = bool(getattr(m, "posterior_input", False))
        self.posterior_grad = bool(getattr(m, "posterior_grad", True))
        self.noise_warp = noise_warp

        normal = nnx.initializers.normal(1.0)
        self.embedding = nnx.Param(partitioned(normal, ("vocab", "embed"))(rngs.params(), (vocab_size, e), param_dtype))
        self.null_embedding = nnx.Param(partitioned(normal, ("embed",))(rngs.params(), (e,), param_dtype))
        if self.tie_embeddings:
            self.logit_scale = nnx.Param(partitioned(nnx.initializers.zeros_init(), ())(rngs.params(), (), param_dtype))
        else:
            self.head = dense(e, vocab_size, ("embed", "vocab"), rngs=rngs, param_dtype=param_dtype)
        self.use_logit_bias = bool(getattr(m, "logit_bias", False))
        if self.use_logit_bias:
            self.logit_bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), ("vocab",))(
                rngs.params(), (vocab_size,), param_dtype))

        n_in = e * (1 + self.self_condition + self.posterior_input) + 1
        io = None if self.io_dtype == jnp.float32 else self.io_dtype  # the samplers' pre-cast
        self.in_proj = dense(n_in, d, (None, "embed"), rngs=rngs, param_dtype=param_dtype, dtype=io)
        self.time_embed = TimestepEmbedding(int(m.time_embed_dim), d, param_dtype=param_dtype, rngs=rngs)
        self.pool_proj = dense(d, d, ("mlp", "embed"), rngs=rngs, param_dtype=param_dtype)
        self.position_levels = bool(getattr(m, "position_levels", False))
        if self.position_levels:
            self.level_proj = dense(d, d, ("mlp", "embed"), rngs=rngs, param_dtype=param_dtype)
        if prompt_encoder is not None:
            self.prompt_encoder = prompt_encoder
        elif m.prompt_encoder == "mlp":
            self.prompt_encoder = MlpPromptEncoder(d, d_in=e, param_dtype=param_dtype, dtype=io, rngs=rngs)
        elif m.prompt_encoder == "frozen":  # built from the donor run by the task (train/tasks.py)
            raise ValueError("model.prompt_encoder='frozen' needs prompt_encoder= (a FrozenPromptEncoder; "
                             "dimba_jax.train.tasks.make_task builds it from model.prompt_encoder_checkpoint)")
        else:
            raise ValueError(f"model.prompt_encoder must be 'mlp' or 'frozen', got {m.prompt_encoder!r}")
        if m.n_layers < 1:
            raise ValueError(f"model.n_layers must be >= 1, got {m.n_layers}")
        self.blocks = nnx.List([DimbaBlock(m, dtype=self.compute_dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(int(m.n_layers))])
        self.final_norm = RMSNorm(d, param_dtype=param_dtype, rngs=rngs)
        self.out_proj = dense(d, e, ("mlp", "embed"), rngs=rngs, param_dtype=param_dtype, dtype=io)

    # ------------------------------------------------------------------ embeddings and head
    def embedding_table(self) -> jax.Array:
        """The normalised embedding table E: float32 (V, e), every row of norm embed_scale*sqrt(e)."""
        return normalize_rows(self.embedding[...], self.embed_norm)

    def null_vector(self) -> jax.Array:
        """The "dropped prompt" embedding: float32 (e,), norm embed_scale*sqrt(e)."""
        return normalize_rows(self.null_embedding[...][None, :], self.embed_norm)[0]

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Clean embeddings x0 of token ids: int (b, L) -> float32 (b, L, e)."""
        return jnp.take(self.embedding_table(), tokens, axis=0)

    def logits(self, x: jax.Array) -> jax.Array:
        """Head: float (b, L, e) -> float32 logits (b, L, V) (tied: scaled x @ E^T; else Linear),
        plus the learned per-token bias (V,) with model.logit_bias."""
        x = x.astype(jnp.float32)
        if self.tie_embeddings:
            out = head_einsum("bld,vd->blv", x, self.embedding_table(),
                              self.head_dtype) * self._head_scale()
        else:
            out = self.head(x).astype(jnp.float32)
        return self._plus_logit_bias(out)

    def _head_scale(self) -> jax.Array:
        """The tied head's scale exp(logit_scale) / embed_norm, float32 ()."""
        return jnp.exp(self.logit_scale[...].astype(jnp.float32)) / self.embed_norm

    def _plus_logit_bias(self, out: jax.Array) -> jax.Array:
        """out float32 (b, L, V) plus the learned per-token bias where model.logit_bias."""
        return out + self.logit_bias[...].astype(jnp.float32) if self.use_logit_bias else out

    def folds_prior(self) -> bool:
        """Whether `predict` folds the output prior into the head's GEMM (`logits_with_prior`):
        with the prior on, a tied head and no posterior input (which needs the prior alone)."""
        return self.skip_logits and self.tie_embeddings and not self.posterior_input

    def logits_with_prior(self, x: jax.Array, x_t: jax.Array, logsnr: jax.Array,
                          weight=1.0) -> jax.Array:
        """logits(x) + weight * prior_logits(x_t, logsnr) as one GEMM over the tied table:
        (scale x + weight coef x_t) @ E^T (+ the logit bias), both terms being linear in E.
        x, x_t float (b, L, e); logsnr (b,) or (b, L); weight a float or float32 scalar ->
        float32 (b, L, V). Tied head only."""
        operand = (x.astype(jnp.float32) * self._head_scale()
                   + (weight * prior_coef(logsnr)) * x_t.astype(jnp.float32))
        return self._plus_logit_bias(
            head_einsum("bld,vd->blv", operand, self.embedding_table(), self.head_dtype))

    def expected_embedding(self, probs: jax.Array) -> jax.Array:
        """probs @ E: float32 weights over the vocabulary (b, L, V) -> float32 (b, L, e), the
        GEMM's operands in model.head_dtype (`head_einsum`)."""
        return head_einsum("blv,vd->bld", probs, self.embedding_table(), self.head_dtype)

    def softmax_embedding(self, scores: jax.Array, temperature=1.0) -> jax.Array:
        """softmax(scores / temperature) @ E, normalised after the GEMM: (exp(s - max) @ E) /
        sum of exp(s - max), s = scores / temperature, so the (b, L, V) probabilities are never
        written (the exponentials go to the GEMM, their sums are taken beside them). scores
        float32 (b, L, V) (entries may be -inf, not a whole row), temperature a float or
        float32 scalar -> float32 (b, L, e); the GEMM as `expected_embedding`. With
        model.softmax_impl the numerator is one Pallas kernel (`layers/fused_softmax.py`),
        whose e is in model.head_dtype, so its gradient arrives rounded to that dtype."""
        if use_fused(self.softmax_impl, True,
                     shape_supported=not numerator_size_error(scores.shape[-1])):
            e, total = softmax_numerator_pallas(scores, temperature, self.head_dtype,
                                                interpret=default_interpret())
        else:  # float32 e: the GEMM's VJP hands its gradient back unrounded
            e, total = softmax_numerator_xla(scores, temperature, jnp.float32)
        return self.expected_embedding(e) / total[..., None]

    def clamp_to_embeddings(self, x: jax.Array) -> jax.Array:
        """Softmax-weighted embedding: softmax(logits(x)) @ E. float (b, L, e) -> float32 (b, L, e)."""
        return self.softmax_embedding(self.logits(x))

    # ------------------------------------------------------------------ denoiser
    def prior_logits(self, x_t: jax.Array, logsnr: jax.Array) -> jax.Array:
        """`output_prior_logits` over this model's embedding table: x_t float (b, L, e), logsnr
        float (b,) or (b, L) -> float32 (b, L, V)."""
        return output_prior_logits(x_t, logsnr, self.embedding_table(), self.head_dtype)

    def stem_input(self, x_in: jax.Array, logsnr: jax.Array, known: jax.Array, shown: jax.Array,
                   self_cond: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """The stem's input per position and the output prior's logits.

        x_in float32 (b, L, e): x_t at generated positions, `shown` (b, L, e) at known ones
        (`known` bool (b, L)); logsnr (b,) or (b, L); self_cond (b, L, e) or None (= zeros).
        Returns ([x_in | self_cond | posterior | mask] float32 (b, L, in_proj's width), the
        self-conditioning and posterior channels only when on, both `shown` at known positions;
        prior_logits(x_in) float32 (b, L, V), or None where nothing needs it alone: the prior
        off, or folded into the head's GEMM, `folds_prior`).
        """
        feats = [x_in]
        if self.self_condition:
            sc = jnp.zeros_like(x_in) if self_cond is None else self_cond.astype(jnp.float32)
            feats.append(jnp.where(known[..., None], shown, sc))
        prior = (self.prior_logits(x_in, logsnr)
                 if self.posterior_input or (self.skip_logits and not self.folds_prior()) else None)
        if self.posterior_input:
            post = self.softmax_embedding(prior)
            if not self.posterior_grad:
                post = jax.lax.stop_gradient(post)
            feats.append(jnp.where(known[..., None], shown, post))
        feats.append(known[..., None].astype(jnp.float32))
        return jnp.concatenate(feats, axis=-1), prior

    def stem(self, stem_in: jax.Array) -> jax.Array:
        """The input projection of `stem_input`'s output: float32 (b, L, n_in) -> float32 (b, L, d).

        The same affine map as `in_proj`, with the mask column (the last) applied as a rank-1
        term: the GEMM then contracts the embedding channels only (2e or 3e, multiples of 8), not
        2e + 1, whose unaligned width GPUs run as a slower kernel. Operands and parameters in
        model.io_dtype, float32 sums (`affine`).
        """
        w = self.in_proj.kernel[...]
        mask_row = w[-1].astype(self.io_dtype).astype(jnp.float32)
        return (affine(stem_in[..., :-1], w[:-1], self.in_proj.bias[...], self.io_dtype)
                + stem_in[..., -1:] * mask_row)

    def project_out(self, h: jax.Array) -> jax.Array:
        """`out_proj` of the final norm of the residual stream: float (b, L, d) -> float32
        (b, L, e), operands and parameters in model.io_dtype, float32 sums (`affine`)."""
        return affine(self.final_norm(h), self.out_proj.kernel[...], self.out_proj.bias[...],
                      self.io_dtype)

    def prompt_context(self, tokens: jax.Array, cond_mask: jax.Array,
                       drop_prompt: jax.Array | None = None) -> PromptContext:
        """What `predict` computes from the prompt alone (not from x_t or the noise level), so a
        sampler computes it once for all its steps. tokens int (b, L), cond_mask bool (b, L),
        drop_prompt bool (b,) or None (see `predict`)."""
        b, length = tokens.shape
        if cond_mask.shape != (b, length):
            raise ValueError(f"DimbaModel: tokens {tokens.shape} and cond_mask {cond_mask.shape} "
                             "do not agree")
        known = cond_mask.astype(bool)
        if drop_prompt is None:
            drop_prompt = jnp.zeros((b,), bool)
        visible = known & ~drop_prompt.astype(bool)[:, None]
        clean = self.embed(tokens)
        shown = jnp.where(visible[..., None], clean, self.null_vector())  # what a known position shows
        c_pos = self.prompt_encoder(clean, tokens, visible).astype(jnp.float32)  # zero where not visible
        n_visible = jnp.maximum(jnp.sum(visible, axis=1, keepdims=True), 1).astype(jnp.float32)
        return PromptContext(known, shown, c_pos, jnp.sum(c_pos, axis=1) / n_visible)

    def block_conditioning(self, level: jax.Array, pooled: jax.Array) -> jax.Array:
        """The blocks' conditioning vector: level float (b,) log-SNR (see `predict`), pooled
        float32 (b, d) (`PromptContext.pooled`) -> float32 (b, d)."""
        return jax.nn.silu(self.time_embed(noise_time(level)) + self.pool_proj(pooled))

    def block_modulations(self, cond: jax.Array) -> jax.Array:
        """Every block's [scale; shift] of `cond` float32 (b, d): float32 (n_layers, b, 2, d)
        (FiLM; additive conditioning has scale 0). A sampler computes them for all its steps
        at once (one GEMM per block instead of one per block and step)."""
        return jnp.stack([block.cond.modulation(cond) for block in self.blocks])

    def mixer_constants(self) -> tuple:
        """Every block's mixer `ssm_constants()` (float32 A, D, dt_bias; `Mamba2.ssm_constants`):
        functions of the parameters alone, which a sampler computes once for all its steps."""
        return tuple(block.mixer.ssm_constants() for block in self.blocks)

    def predict(self, x_t: jax.Array, logsnr: jax.Array, tokens: jax.Array, cond_mask: jax.Array, *,
                self_cond: jax.Array | None = None, drop_prompt: jax.Array | None = None,
                prior_weight: float = 1.0, context: PromptContext | None = None,
                modulations: jax.Array | None = None,
                mixer_constants: tuple | None = None) -> tuple[jax.Array, jax.Array]:
        """Predicts x0 and the token logits.

        Args:
          x_t: float (b, L, e) noisy embeddings (values at known positions are ignored).
          logsnr: float (b,) or (b, L) the noise level as log-SNR lambda = log(ab / (1 - ab)), one
            per sequence or one per position (without `position_levels` the blocks see only
            the mean over generated positions; the prior logits always use each position's own).
          tokens: int32 (b, L) token ids; only the known positions are read.
          cond_mask: bool (b, L), True = known (clean) position.
          self_cond: float (b, L, e) previous x0 estimate, or None (= zeros).
          drop_prompt: bool (b,) — True replaces the prompt by the null embedding (CFG), or None.
          prior_weight: the weight of the output prior in the logits (1 = the trained model;
            a sampling knob, `sample.prior_weight`; ignored without `skip_logits`).
          context: `prompt_context(tokens, cond_mask, drop_prompt)` computed beforehand (a
            sampler's steps share it; tokens and cond_mask are then only checked for their
            shapes and drop_prompt is unused), or None (computed here).
          modulations: `block_modulations(block_conditioning(level, context.pooled))` computed
            beforehand, float32 (n_layers, b, 2, d), or None (computed here).
          mixer_constants: `mixer_constants()` computed beforehand, or None (each block's
            computed here).
        Returns:
          (x0_hat float32 (b, L, e) with the clean (or null, if dropped) embeddings at known
          positions, logits float32 (b, L, V)). `readout` "score_interp": logits = head(h)
          (+ the prior), x0_hat = softmax(logits) @ E; "direct": x0_hat = the network's output,
          logits = head(x0_hat) (+ the prior).
        """
        b, length, e = x_t.shape
        if e != self.embed_dim or tokens.shape != (b, length) or cond_mask.shape != (b, length):
            raise ValueError(f"DimbaModel: x_t {x_t.shape}, tokens {tokens.shape}, cond_mask "
                             f"{cond_mask.shape} do not agree (embed_dim {self.embed_dim})")
        ctx = context if context is not None else self.prompt_context(tokens, cond_mask, drop_prompt)
        known = ctx.known
        logsnr = jnp.asarray(logsnr, jnp.float32)
        if logsnr.ndim == 2:
            if logsnr.shape != (b, length):
                raise ValueError(f"DimbaModel: per-position logsnr {logsnr.shape}, expected {(b, length)}")
            gen = (~known).astype(jnp.float32)
            level = jnp.sum(logsnr * gen, 1) / jnp.maximum(jnp.sum(gen, 1), 1.0)  # FiLM's level
        else:
            logsnr = level = jnp.broadcast_to(logsnr, (b,))
        x_in = jnp.where(known[..., None], ctx.shown, x_t.astype(jnp.float32))
        stem_in, prior = self.stem_input(x_in, logsnr, known, ctx.shown, self_cond)
        h = self.stem(stem_in)
        if self.position_levels:
            lam_pos = jnp.broadcast_to(logsnr[:, None], (b, length)) if logsnr.ndim == 1 else logsnr
            tau = self.time_embed(noise_time(lam_pos.reshape(-1))).reshape(b, length, -1)
            h = h + self.level_proj(jax.nn.silu(tau))
        h = h + ctx.c_pos
        if modulations is None:
            modulations = self.block_modulations(self.block_conditioning(level, ctx.pooled))

        if mixer_constants is None:
            mixer_constants = (None,) * len(self.blocks)
        delta = None  # each block's mixer output, added to h by the next block's pre-norm
        for block, mod, ssm in zip(self.blocks, modulations, mixer_constants):
            h, x = block.prenorm(h, delta, mod)
            delta = block.mixer(x, ssm=ssm)
        h = h + delta.astype(h.dtype)
        out = self.project_out(h)
        if self.folds_prior():
            head = functools.partial(self.logits_with_prior, x_t=x_in, logsnr=logsnr,
                                     weight=prior_weight)
        else:
            prior = prior * prior_weight if self.skip_logits else 0.0
            head = lambda x: self.logits(x) + prior  # noqa: E731
        if self.readout == "score_interp":
            logits = head(out)
            x0 = self.softmax_embedding(logits)
        else:
            x0 = out
            logits = head(x0)
        return jnp.where(known[..., None], ctx.shown, x0), logits

    def __call__(self, x_t: jax.Array, logsnr: jax.Array, tokens: jax.Array, cond_mask: jax.Array, *,
                 self_cond: jax.Array | None = None, drop_prompt: jax.Array | None = None) -> jax.Array:
        """x0_hat alone: `predict(...)[0]`, float32 (b, L, e)."""
        return self.predict(x_t, logsnr, tokens, cond_mask, self_cond=self_cond, drop_prompt=drop_prompt)[0]
