"""Conditioning layers of the DIMBA denoiser: timestep embedding, prompt encoders, FiLM / additive.

* `sinusoidal_embedding` + `TimestepEmbedding`: tau(t) = MLP(sin/cos features of t) -> (b, d_model).
* Prompt encoders map the clean embeddings of the *visible* prompt positions (known and not
  dropped) to per-position conditioning c (b, L, d_model), zero elsewhere:
  - `MlpPromptEncoder` (default, "mlp"): a light per-position two-layer MLP, trained. Context
    between prompt tokens comes from the denoiser itself, which sees the clean prompt.
  - `FrozenPromptEncoder` ("frozen"): any stack of Mamba-2 residual blocks (with its own token
    embedding and final norm) taken from a dimba_jax checkpoint. Its weights are re-typed as
    `FrozenParam` (not `nnx.Param`), so the optimizer and `nnx.grad` never touch them (no weight
    decay either), and its output passes through `stop_gradient`; a trained linear map
    d_encoder -> d_model follows. `frozen_prompt_encoder` builds one from a `FrozenStack` (a
    trained model's stack in memory; `dimba_jax.train.tasks` reads it from the donor run).
* `FiLM` (scale/shift per block, zero-initialised so a fresh block starts as the identity
  modulation) and `AdditiveConditioning` (a per-block shift of the block input).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dimba_jax.layers.norms import partitioned
from dimba_jax.layers.precision import affine


class FrozenParam(nnx.Variable):
    """A weight that is used but never trained (not an `nnx.Param`: optimizers and grads skip it)."""


def dense(din: int, dout: int, axes: tuple, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
          dtype=None, zero_init: bool = False, use_bias: bool = True) -> nnx.Linear:
    """An `nnx.Linear` with logical axis names on kernel (din, dout) and bias (dout,)."""
    kinit = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=partitioned(kinit, axes),
                      bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Transformer-style features of (possibly fractional) timesteps.

    t: (b,) int or float. Returns float32 (b, dim): [sin(t f_k), cos(t f_k)] with
    f_k = max_period^(-k/half), k = 0..half-1 (half = dim // 2; a zero column pads odd dim).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """tau(t) = Linear(SiLU(Linear(sinusoidal(t)))): (b,) -> float32 (b, d_model)."""

    def __init__(self, time_embed_dim: int, d_model: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.time_embed_dim = time_embed_dim
        self.fc1 = dense(time_embed_dim, d_model, (None, "embed"), rngs=rngs, param_dtype=param_dtype)
        self.fc2 = dense(d_model, d_model, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        """t: (b,) timesteps -> (b, d_model) float32."""
        return self.fc2(jax.nn.silu(self.fc1(sinusoidal_embedding(t, self.time_embed_dim))))


def _mask(x: jax.Array, visible: jax.Array) -> jax.Array:
    return x * visible[..., None].astype(x.dtype)


class MlpPromptEncoder(nnx.Module):
    """Per-position MLP over the prompt's clean embeddings: (b, L, d_in) -> (b, L, d_model), zero
    where not visible. d_in defaults to d_model; hidden width defaults to 2 d_model. Both GEMMs
    take their operands and parameters in `dtype` (DIMBA's model.io_dtype; None: float32, the
    layers' compute dtype left unset) with float32 sums and outputs (`precision.affine`), the
    SiLU in float32."""

    def __init__(self, d_model: int, hidden: int | None = None, *, d_in: int | None = None,
                 param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        hidden = hidden or 2 * d_model
        self.dtype = dtype
        self.fc1 = dense(d_in or d_model, hidden, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype,
                         dtype=dtype)
        self.fc2 = dense(hidden, d_model, ("mlp", "embed"), rngs=rngs, param_dtype=param_dtype,
                         dtype=dtype)

    def __call__(self, prompt_emb: jax.Array, tokens: jax.Array, visible: jax.Array) -> jax.Array:
        """prompt_emb: float (b, L, d_in) clean embeddings; tokens: int (b, L) (unused here);
        visible: bool (b, L). Returns float32 (b, L, d_model), zero at invisible positions."""
        del tokens
        x = _mask(prompt_emb.astype(jnp.float32), visible)
        dtype = self.dtype or jnp.float32
        h = affine(x, self.fc1.kernel[...], self.fc1.bias[...], dtype)
        h = affine(jax.nn.silu(h), self.fc2.kernel[...], self.fc2.bias[...], dtype)
        return _mask(h, visible)


def freeze(module: nnx.Module) -> nnx.Module:
    """Re-types every `nnx.Param` of `module` (in place) as `FrozenParam`; returns the module.

    Raises ValueError if a Param sits where it cannot be re-typed (directly inside a container).
    """
    for _, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Param):
                    setattr(node, name, FrozenParam(value[...], **value.get_metadata()))
    left = nnx.state(module, nnx.Param)
    if jax.tree_util.tree_leaves(left):
        raise ValueError("freeze: some parameters could not be frozen (held directly in a container)")
    return module


class FrozenPromptEncoder(nnx.Module):
    """A frozen Mamba-2 stack as prompt encoder, followed by a trained projection.

    Args:
      embedding: float (V, d_enc) token-embedding table of the encoder (frozen).
      blocks: residual blocks, each `block(h (b, L, d_enc)) -> (b, L, d_enc)` (frozen).
      final_norm: module `(b, L, d_enc) -> (b, L, d_enc)` (frozen).
      d_model: output width (the denoiser's).
    The encoder sees only the visible prompt tokens (other positions get a zero embedding).
    """

    def __init__(self, embedding: jax.Array, blocks: Sequence[nnx.Module], final_norm: nnx.Module,
                 d_model: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d_enc = int(embedding.shape[-1])
        self.embedding = FrozenParam(jnp.asarray(embedding))
        self.blocks = nnx.List([freeze(b) for b in blocks])
        self.final_norm = freeze(final_norm)
        self.proj = dense(d_enc, d_model, ("mlp", "embed"), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, prompt_emb: jax.Array, tokens: jax.Array, visible: jax.Array) -> jax.Array:
        """tokens: int (b, L); visible: bool (b, L). Returns float32 (b, L, d_model), zero where not visible.

        `prompt_emb` (the denoiser's own embeddings) is ignored: the encoder uses its own table.
        """
        del prompt_emb
        table = self.embedding[...]
        h = _mask(jnp.take(table, tokens, axis=0).astype(jnp.float32), visible)
        for block in self.blocks:
            h = block(h)
        h = jax.lax.stop_gradient(self.final_norm(h).astype(jnp.float32))
        return _mask(self.proj(h), visible)


class PreNormResidual(nnx.Module):
    """h + layer.mixer(layer.norm(h)) for a layer with `norm` and `mixer` (the AR baseline's layers)."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def __call__(self, h: jax.Array) -> jax.Array:
        return h + self.layer.mixer(self.layer.norm(h)).astype(h.dtype)


class _Stack(nnx.Module):
    """Container of a frozen stack's blocks and final norm (for split / merge)."""

    def __init__(self, blocks, final_norm):
        self.blocks = nnx.List(blocks)
        self.final_norm = final_norm


class FrozenStack(NamedTuple):
    """A trained model's token embedding and residual stack, frozen, ready to become encoders.

    table: float (V, d_enc) embedding table; graphdef, state: `nnx.split` of a module with
    `.blocks` and `.final_norm` (weights as `FrozenParam`).
    """
    table: jax.Array
    graphdef: object
    state: object


def frozen_stack(model: nnx.Module) -> FrozenStack:
    """The frozen stack of a trained model held in memory (the task layer loads it from a run).

    `model` must expose `embedding_table()` (or `embedding.embedding`), `blocks` (or pre-norm
    `layers` with `norm` and `mixer`) and `final_norm` (or `norm_f`): a DIMBA denoiser's stack
    (whose blocks then run without their timestep conditioning) or the AR baseline's.
    Raises ValueError for a model without them.
    """
    if hasattr(model, "embedding_table"):  # DIMBA denoiser
        table = model.embedding_table()
    elif hasattr(model, "embedding") and hasattr(model.embedding, "embedding"):  # AR baseline (nnx.Embed)
        table = model.embedding.embedding[...]
    else:
        raise ValueError(f"checkpoint model {type(model).__name__} has no token embedding table")
    norm = getattr(model, "final_norm", None) or getattr(model, "norm_f", None)
    if hasattr(model, "blocks"):
        blocks = list(model.blocks)
    elif hasattr(model, "layers"):  # pre-norm layers whose residual add lives in the LM
        blocks = [PreNormResidual(layer) for layer in model.layers]
    else:
        blocks = None
    if blocks is None or norm is None:
        raise ValueError(f"checkpoint model {type(model).__name__} lacks blocks/layers or a final norm")
    graphdef, state = nnx.split(_Stack([freeze(b) for b in blocks], freeze(norm)))
    return FrozenStack(jnp.asarray(table), graphdef, state)


def frozen_prompt_encoder(stack: FrozenStack, d_model: int, *, param_dtype=jnp.float32,
                          rngs: nnx.Rngs) -> FrozenPromptEncoder:
    """A `FrozenPromptEncoder` over a fresh copy of `stack` (safe inside jit / eval_shape)."""
    fresh = jax.tree.map(lambda x: x, stack.state)  # new Variable objects at the current trace level
    copy = nnx.merge(stack.graphdef, fresh)
    return FrozenPromptEncoder(stack.table, list(copy.blocks), copy.final_norm, d_model,
                               param_dtype=param_dtype, rngs=rngs)


class FiLM(nnx.Module):
    """x * (1 + scale(c)) + shift(c); scale/shift from a zero-initialised linear map of c.

    c: (b, cond_dim); x: (b, L, d_model). Returns x's dtype.
    """

    def __init__(self, cond_dim: int, d_model: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = dense(cond_dim, 2 * d_model, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype,
                          zero_init=True)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.proj(c.astype(jnp.float32)), 2, axis=-1)
        return (x.astype(jnp.float32) * (1.0 + scale[:, None, :]) + shift[:, None, :]).astype(x.dtype)

    def modulation(self, c: jax.Array) -> jax.Array:
        """[scale; shift] of c: float32 (b, 2, d_model) (what `__call__` applies)."""
        return self.proj(c.astype(jnp.float32)).reshape(c.shape[0], 2, -1)


class AdditiveConditioning(nnx.Module):
    """x + shift(c) with a zero-initialised linear shift. c: (b, cond_dim); x: (b, L, d_model)."""

    def __init__(self, cond_dim: int, d_model: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = dense(cond_dim, d_model, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype,
                          zero_init=True)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        return (x.astype(jnp.float32) + self.proj(c.astype(jnp.float32))[:, None, :]).astype(x.dtype)

    def modulation(self, c: jax.Array) -> jax.Array:
        """[scale = 0; shift] of c: float32 (b, 2, d_model) (x * (1 + 0) + shift = `__call__`)."""
        shift = self.proj(c.astype(jnp.float32))
        return jnp.stack([jnp.zeros_like(shift), shift], axis=1)


def make_block_conditioning(kind: str, cond_dim: int, d_model: int, *, param_dtype=jnp.float32,
                            rngs: nnx.Rngs) -> nnx.Module:
    """"film" -> FiLM, "additive" -> AdditiveConditioning; anything else -> ValueError."""
    if kind == "film":
        return FiLM(cond_dim, d_model, param_dtype=param_dtype, rngs=rngs)
    if kind == "additive":
        return AdditiveConditioning(cond_dim, d_model, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"model.conditioning must be 'film' or 'additive', got {kind!r}")
