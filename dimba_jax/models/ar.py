"""The autoregressive baseline: a causal Mamba-2 language model and its sampler.

`MambaLM` has the structure of mamba_ssm's `MambaLMHeadModel` with Mamba-2 mixers, so that
pretrained checkpoints map onto it name for name (`dimba_jax.interop`):

    h = embedding[ids]                                   (vocab padded to a multiple)
    residual = 0
    for each layer:  residual = residual + h   (float32)
                     h = mixer(RMSNorm(residual))        (causal Mamba2, compute dtype)
    logits = RMSNorm_f(residual + h) @ W_head^T          (W_head = embedding when tied)

`generate` decodes with the recurrent `step` inside one jitted `lax.scan` after a parallel
prefill of the prompt: no Python loop per token. `dimba_jax.tasks.ar.ArTask` plugs the model into
the trainer.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.interop.mamba_ssm import padded_vocab
from dimba_jax.layers.bound import bind
from dimba_jax.layers.mamba2 import Mamba2
from dimba_jax.layers.norms import RMSNorm, partitioned, prenorm
from dimba_jax.layers.precision import cast_linears_to_compute_dtype, cast_state_linears, head_einsum
from dimba_jax.models import flops
from dimba_jax.ssd import KernelConfig

LMCache = tuple  # tuple[Mamba2Cache, ...], one per layer (a pytree)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype):
    """'float32' | 'bfloat16' | 'float16' | a dtype -> a jnp dtype (ValueError otherwise)."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {list(_DTYPES)}")
        return _DTYPES[name_or_dtype]
    return name_or_dtype


class ResidualBlock(nnx.Module):
    """Pre-norm residual layer of the LM: `norm` (RMSNorm over d_model) and `mixer` (Mamba2).

    The residual addition itself happens in `MambaLM` (mamba_ssm's fused add+norm order).
    """

    def __init__(self, d_model: int, *, norm_eps: float, dtype, param_dtype, rngs: nnx.Rngs,
                 **mixer_kwargs):
        self.norm = RMSNorm(d_model, norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mixer = Mamba2(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                            **mixer_kwargs)


class MambaLM(nnx.Module):
    """Causal Mamba-2 language model (mamba_ssm `MambaLMHeadModel` structure, Mamba-2 mixers).

    Args:
      vocab_size: number of real token ids; the embedding has `padded_vocab_size` rows.
      d_model, n_layers: width and depth.
      d_state, expand, headdim, ngroups, d_conv, chunk_size, ssd_impl, ssd_kernels, conv_impl,
        conv_forward, conv_backward, norm_impl, core_vjp: Mamba2 mixer settings (conv_impl / norm_impl: its fused prologue /
        epilogue kernels; core_vjp: both as one custom VJP; see `Mamba2`).
      tie_embeddings: output head = embedding table (True) or a separate `lm_head` Linear.
      pad_vocab_size_multiple: pad the vocabulary to this multiple (mamba_ssm default 16 for
        the published Mamba-2 checkpoints); `padded_vocab_size` overrides the padded size.
      norm_eps: RMSNorm epsilon (1e-5).
      dtype: compute dtype; param_dtype: parameter dtype. The residual stream is float32.
      head_dtype: operand dtype of the head's GEMM (forward and backward, float32 sums, float32
        logits; `layers.precision.head_einsum`); None: the compute dtype.

    Parameters (logical axes): embedding.embedding (V_pad, d_model) ("vocab", "embed");
    layers[i].norm.weight ("embed",); layers[i].mixer.* (see Mamba2); norm_f.weight ("embed",);
    lm_head.kernel (d_model, V_pad) ("embed", "vocab") when untied.
    Init as mamba_ssm: embedding N(0, 0.02); out_proj bound scaled by 1/sqrt(n_layers).
    """

    def __init__(self, vocab_size: int, *, d_model: int, n_layers: int, d_state: int = 128,
                 expand: int = 2, headdim: int = 64, ngroups: int = 1, d_conv: int = 4,
                 chunk_size: int = 256, ssd_impl: str = "auto",
                 ssd_kernels: KernelConfig | None = None, conv_impl: str = "auto",
                 conv_forward: str = "triton", conv_backward: str = "triton",
                 norm_impl: str = "auto", core_vjp: bool = False, tie_embeddings: bool = True,
                 pad_vocab_size_multiple: int = 16, padded_vocab_size: int | None = None,
                 norm_eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                 head_dtype=None, rngs: nnx.Rngs):
        if n_layers <= 0:
            raise ValueError(f"MambaLM: n_layers must be positive, got {n_layers}")
        v_pad = padded_vocab_size or padded_vocab(vocab_size, pad_vocab_size_multiple)
        if v_pad < vocab_size:
            raise ValueError(f"MambaLM: padded_vocab_size {v_pad} < vocab_size {vocab_size}")
        self.vocab_size, self.padded_vocab_size = vocab_size, v_pad
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.d_model, self.n_layers = d_model, n_layers
        self.tie_embeddings = tie_embeddings
        self.norm_eps = norm_eps
        self.dtype, self.param_dtype = dtype, param_dtype
        self.head_dtype = jnp.dtype(dtype if head_dtype is None else head_dtype)
        mixer_config = dict(d_state=d_state, expand=expand, headdim=headdim, ngroups=ngroups,
                            d_conv=d_conv, chunk_size=chunk_size, conv_impl=conv_impl,
                            conv_forward=conv_forward, conv_backward=conv_backward,
                            norm_impl=norm_impl, core_vjp=core_vjp)
        self.embedding = nnx.Embed(
            v_pad, d_model, dtype=dtype, param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs)
        self.layers = nnx.List([
            ResidualBlock(d_model, norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs, ssd_impl=ssd_impl, ssd_kernels=ssd_kernels,
                          out_proj_init_scale=1.0 / math.sqrt(n_layers), **mixer_config)
            for _ in range(n_layers)])
        self.norm_f = RMSNorm(d_model, norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                              rngs=rngs)
        if tie_embeddings:
            self.lm_head = None
        else:
            bound = 1.0 / math.sqrt(d_model)
            self.lm_head = nnx.Linear(
                d_model, v_pad, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=partitioned(
                    lambda k, s, d=jnp.float32: jax.random.uniform(k, s, jnp.float32, -bound,
                                                                   bound).astype(d),
                    ("embed", "vocab")),
                rngs=rngs)

    # ------------------------------------------------------------------------------ pieces
    def _check_ids(self, ids: jax.Array, ndim: int, what: str) -> None:
        if ids.ndim != ndim or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"MambaLM.{what}: expected integer ids of rank {ndim}, got "
                             f"{ids.dtype} array of shape {ids.shape}")

    def _embed(self, ids: jax.Array) -> jax.Array:
        table = self.embedding.embedding[...]
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def _head(self, residual: jax.Array) -> jax.Array:
        """residual (..., d_model) float32 -> float32 logits (..., V_pad)."""
        h = self.norm_f(residual).astype(self.dtype)
        if self.lm_head is None:
            w = self.embedding.embedding[...].astype(self.dtype)  # (V, d)
        else:
            w = self.lm_head.kernel[...].astype(self.dtype).T
        return head_einsum("...d,vd->...v", h, w, self.head_dtype)

    def _prenorm(self, layer, residual, h):
        """(residual + h float32, layer.norm of it in the compute dtype): residual (..., d)
        float32, h (..., d) the previous layer's output (or the embedding) (`norms.prenorm`)."""
        return prenorm(residual, h, layer.norm.weight[...], None, eps=layer.norm.eps,
                       dtype=self.dtype)

    def _run_layers(self, ids, seq_idx, return_cache):
        h = self._embed(ids)
        residual = jnp.zeros(h.shape, jnp.float32)
        caches = []
        for layer in self.layers:
            residual, x = self._prenorm(layer, residual, h)
            out = layer.mixer.forward(x, seq_idx=seq_idx, return_cache=return_cache)
            if return_cache:
                h, cache = out
                caches.append(cache)
            else:
                h = out
        return self._head(residual + h.astype(jnp.float32)), tuple(caches)

    # ----------------------------------------------------------------------------- public
    def __call__(self, ids: jax.Array, *, seq_idx: jax.Array | None = None) -> jax.Array:
        """ids (batch, seqlen) int -> logits (batch, seqlen, padded_vocab_size) float32.

        Columns >= vocab_size belong to padding rows (never targets; `generate` masks them).
        """
        self._check_ids(ids, 2, "__call__")
        return self._run_layers(ids, seq_idx, return_cache=False)[0]

    def prefill(self, ids: jax.Array) -> tuple[jax.Array, LMCache]:
        """Parallel forward that also returns the recurrent cache after the last token.

        ids (batch, seqlen) -> (logits (batch, seqlen, V_pad) float32, cache for `step`).
        """
        self._check_ids(ids, 2, "prefill")
        return self._run_layers(ids, None, return_cache=True)

    def init_cache(self, batch: int, dtype=None) -> LMCache:
        """Zero cache: one Mamba2Cache per layer (conv state in `dtype`, default compute dtype)."""
        dtype = dtype or self.dtype
        return tuple(layer.mixer.init_cache(batch, dtype) for layer in self.layers)

    def step(self, ids_t: jax.Array, cache: LMCache) -> tuple[jax.Array, LMCache]:
        """One token: ids_t (batch,) int -> (logits (batch, V_pad) float32, new cache)."""
        self._check_ids(ids_t, 1, "step")
        if len(cache) != len(self.layers):
            raise ValueError(f"MambaLM.step: cache has {len(cache)} layers, the model "
                             f"{len(self.layers)}")
        h = self._embed(ids_t)
        residual = jnp.zeros(h.shape, jnp.float32)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            residual = residual + h.astype(jnp.float32)
            h, c = layer.mixer.step(layer.norm(residual).astype(self.dtype), layer_cache)
            new_cache.append(c)
        return self._head(residual + h.astype(jnp.float32)), tuple(new_cache)


# ----------------------------------------------------------------------------------- sampling

def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_p,
                  vocab_size: int | None = None) -> jax.Array:
    """Samples one token per row. logits (batch, V) float -> ids (batch,) int32.

    temperature == 0: greedy argmax. Otherwise softmax(logits / temperature) restricted to the
    nucleus: the smallest set of most probable tokens whose probability reaches top_p (ties at
    the boundary kept; top_p >= 1 keeps everything). Ids >= vocab_size (padding) are never
    chosen. temperature and top_p may be traced scalars.
    """
    logits = logits.astype(jnp.float32)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)

    def nucleus(s):
        desc = -jnp.sort(-s, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        return jnp.where(s >= threshold, s, -jnp.inf)

    filtered = jax.lax.cond(top_p < 1.0, nucleus, lambda s: s, scaled)
    sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _generate_program(graphdef, state, prompt_ids, rng, temperature, top_p, num_new):
    model = nnx.merge(graphdef, state)
    cast_linears_to_compute_dtype(model)  # once, not at every decoded token
    logits, cache = model.prefill(prompt_ids)
    keys = jax.random.split(rng, num_new)
    first = sample_logits(logits[:, -1], keys[0], temperature, top_p, model.vocab_size)

    def body(carry, key):
        cache, tok = carry
        step_logits, cache = model.step(tok, cache)
        tok = sample_logits(step_logits, key, temperature, top_p, model.vocab_size)
        return (cache, tok), tok

    _, rest = jax.lax.scan(body, (cache, first), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_new"))
def generate_split(graphdef, state, prompt_ids, rng, temperature, top_p, num_new):
    """`generate`'s jitted program on a model already split by `nnx.split` (no argument checks).

    graphdef, state: `nnx.split(model)` of a MambaLM; prompt_ids int32 (batch, prompt_len); rng
    a PRNG key; temperature, top_p float32 scalars; num_new static. Returns int32 (batch,
    num_new), the same as `generate`. A serving loop calls `generate_bound`'s program instead
    (the same program, no GraphDef hashed per call).
    """
    return _generate_program(graphdef, state, prompt_ids, rng, temperature, top_p, num_new)


def generate_bound(graphdef, state, num_new: int):
    """(run, params): `run(params, prompt_ids, rng, temperature, top_p)` is `generate_split`
    with the graph, the state's layout and num_new bound (`layers.bound.bind`): the same
    program and tokens, and a call hashes no GraphDef and passes few arrays. The bound
    weights have the compute-dtype linears cast once here (`precision.cast_state_linears`;
    the same bits), so a call casts no weights."""
    graphdef, state = cast_state_linears(graphdef, state)
    return bind(_generate_program, graphdef, state, num_new=int(num_new))


def generate(model: MambaLM, prompt_ids, num_new: int, rng: jax.Array, temperature: float = 1.0,
             top_p: float = 1.0) -> jax.Array:
    """Autoregressive continuation of `prompt_ids`; one jitted program (prefill + lax.scan).

    Args:
      model: a MambaLM.
      prompt_ids: (batch, prompt_len) int, prompt_len >= 1 (use EOS as a start token for
        unconditional samples); ids must be < model.vocab_size.
      num_new: tokens to generate (>= 1); static (one compilation per value).
      rng: a PRNG key; the result is a deterministic function of it.
      temperature: 0 = greedy argmax; > 0 = sample from softmax(logits / temperature).
      top_p: nucleus mass in (0, 1]; 1 = no truncation.
    Returns:
      (batch, num_new) int32: the new tokens only (not the prompt).
    """
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or not jnp.issubdtype(prompt_ids.dtype,
                                                                              jnp.integer):
        raise ValueError(f"generate: prompt_ids must be integer (batch, prompt_len >= 1), got "
                         f"{prompt_ids.dtype} {prompt_ids.shape}")
    if int(num_new) < 1:
        raise ValueError(f"generate: num_new must be >= 1, got {num_new}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if float(temperature) < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    try:  # concrete prompts are range-checked; traced ones (generate inside jit) cannot be
        max_id, min_id = int(jnp.max(prompt_ids)), int(jnp.min(prompt_ids))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        max_id, min_id = 0, 0
    if max_id >= model.vocab_size or min_id < 0:
        raise ValueError(f"generate: prompt ids must be in [0, {model.vocab_size}), got "
                         f"[{min_id}, {max_id}]")
    graphdef, state = nnx.split(model)
    return generate_split(graphdef, state, prompt_ids.astype(jnp.int32), rng,
                          jnp.float32(temperature), jnp.float32(top_p), int(num_new))


# --------------------------------------------------------------------------------- the task

def lm_from_config(model_config, vocab_size: int, *, param_dtype="float32",
                   rngs: nnx.Rngs, pad_vocab_size_multiple: int = 16) -> MambaLM:
    """Builds a MambaLM from `config.model` (d_model, n_layers, d_state, expand, headdim,
    ngroups, d_conv, chunk_size, ssd_impl, ssd_* kernels, conv_impl, conv_forward, conv_backward, norm_impl,
    mixer_core_vjp, tie_embeddings, compute_dtype, head_dtype; a config without head_dtype, a
    run saved before it reached this model, keeps the compute dtype)."""
    m = model_config
    return MambaLM(vocab_size, d_model=m.d_model, n_layers=m.n_layers, d_state=m.d_state,
                   expand=m.expand, headdim=m.headdim, ngroups=m.ngroups, d_conv=m.d_conv,
                   chunk_size=m.chunk_size, ssd_impl=m.ssd_impl,
                   ssd_kernels=KernelConfig.from_config(m),
                   conv_impl=getattr(m, "conv_impl", "auto"),
                   conv_forward=getattr(m, "conv_forward", "triton"),
                   conv_backward=getattr(m, "conv_backward", "triton"),
                   norm_impl=getattr(m, "norm_impl", "auto"),
                   core_vjp=bool(getattr(m, "mixer_core_vjp", False)),
                   tie_embeddings=m.tie_embeddings,
                   pad_vocab_size_multiple=pad_vocab_size_multiple,
                   dtype=as_dtype(m.compute_dtype), param_dtype=as_dtype(param_dtype),
                   head_dtype=as_dtype(getattr(m, "head_dtype", m.compute_dtype)), rngs=rngs)


def next_token_metrics(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy and accuracy (float32 scalars).

    logits (batch, L, V) float, targets (batch, L) int (all positions count).
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.mean(logz - picked)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return ce, accuracy


def ar_setting(config, name: str, default):
    """config.ar.<name> when the config has an `ar` section, else `default`."""
    section = config.get("ar") if hasattr(config, "get") else getattr(config, "ar", None)
    if section is None:
        return default
    if hasattr(section, "get"):
        return section.get(name, default)
    return getattr(section, name, default)
