"""The Mamba-2 mixer (causal, with single-token `step`) and its bidirectional wrapper.

Data flow of one causal `Mamba2` mixer (no residual, no outer norm; the model adds those):

    u (b, l, d_model)
    -> in_proj (no bias)            -> [z | x | B | C | dt]   widths d_inner, d_inner,
                                       ngroups*d_state, ngroups*d_state, nheads
                                       (mamba_ssm's row order, so checkpoints map 1:1)
    -> depthwise causal conv1d (width d_conv, bias) + SiLU over [x | B | C]
    -> SSD: y = ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)  (A = -exp(A_log))
    -> gated RMSNorm: normalise(y * silu(z)) per group of d_inner/ngroups channels, eps 1e-5
    -> out_proj (no bias)           -> (b, l, d_model)

Initialisation follows the Mamba-2 paper / mamba_ssm: A_log = log U(1, 16); dt drawn
log-uniformly in [dt_min, dt_max] = [1e-3, 0.1], floored at 1e-4 and stored as
dt_bias = softplus^-1(dt); D = 1; conv weight and bias U(+-1/sqrt(d_conv)) and the projections
U(+-1/sqrt(fan_in)) (PyTorch's defaults, which mamba_ssm keeps); the norm weight is 1.

Compute happens in `dtype`; parameters are stored in `param_dtype`; dt, A, D, the conv
accumulation, the norm and the SSD states are float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dimba_jax.layers.fused_conv import (bidirectional_conv_pallas, causal_conv1d_silu,
                                         causal_conv_pallas, conv_size_error)
from dimba_jax.layers.fused_mixer import mixer_core
from dimba_jax.layers.fused_norm import (bidirectional_gated_norm_pallas, gated_norm_pallas,
                                         norm_size_error)
from dimba_jax.layers.norms import GatedRMSNorm, partitioned
from dimba_jax.layers.triton_common import (check_conv_kernel, check_impl, default_interpret,
                                            use_fused)
from dimba_jax.ssd import KernelConfig, ssd


class Mamba2Cache(NamedTuple):
    """Recurrent state of one causal Mamba2 mixer (a pytree; carry it through `lax.scan`).

    conv_state: (batch, d_conv - 1, conv_dim) the last d_conv-1 inputs of the causal conv
        ([x | B | C] before the conv), oldest first; dtype = the cache dtype.
    ssm_state: (batch, nheads, headdim, d_state) float32 SSM state h_t.
    """

    conv_state: jax.Array
    ssm_state: jax.Array


# ----------------------------------------------------------------------------- initialisers

def _uniform(bound: float):
    """Initializer U(-bound, bound); PyTorch's Linear/Conv1d default uses bound 1/sqrt(fan_in)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def _a_log_init(a_min: float, a_max: float):
    """A_log = log(U(a_min, a_max)) so that A = -exp(A_log) lies in [-a_max, -a_min]."""

    def init(key, shape, dtype=jnp.float32):
        a = jax.random.uniform(key, shape, jnp.float32, a_min, a_max)
        return jnp.log(a).astype(dtype)

    return init


def _dt_bias_init(dt_min: float, dt_max: float, dt_floor: float):
    """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max], floored at dt_floor."""

    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_floor)
        # inverse of softplus(x) = log(1 + e^x): x = dt + log(1 - e^-dt)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _flip(x):
    return None if x is None else jnp.flip(x, axis=1)


# ------------------------------------------------------------------------------- causal mixer

class Mamba2(nnx.Module):
    """Causal Mamba-2 mixer (see the module docstring for the data flow).

    Args:
      d_model: input/output width.
      d_state: SSM state size N (per group).
      expand: d_inner = expand * d_model.
      headdim: SSD head dimension P; nheads = d_inner // headdim.
      ngroups: B/C groups (nheads % ngroups == 0); also the gated-norm groups.
      d_conv: width of the depthwise causal conv over [x | B | C].
      chunk_size: SSD chunk length.
      ssd_impl: "auto" | "xla" | "reference" | "pallas" (dimba_jax.ssd.ssd's `impl`).
      ssd_kernels: the Pallas kernels of the SSD (`dimba_jax.ssd.KernelConfig`; default its
        defaults), passed to `ssd` as its static `kernels`.
      norm_impl: "auto" | "xla" | "pallas": the gated-norm epilogue (the fused kernels of
        `layers/fused_norm.py`, one direction here, both in `BidirectionalMamba2`; needs
        headdim a power of two).
      conv_impl: "auto" | "xla" | "pallas": the conv prologue (the fused kernels of
        `layers/fused_conv.py`, one direction here, both in `BidirectionalMamba2`; needs
        headdim and d_state powers of two; here not with seq_idx, which takes the XLA conv).
        For both knobs: "pallas" = the fused kernel wherever the call allows it (in the Pallas
        interpreter off GPU; other sizes raise); "auto" = the fused kernels on a GPU where the
        call and the sizes allow it, in training and in sampling alike, else XLA (never the
        interpreter); see `triton_common.use_fused`.
      conv_forward: "triton" | "mosaic": the fused conv prologue's forward kernel (the Pallas
        Triton kernel, or the Mosaic GPU kernel of `layers/mosaic_conv.py`, Hopper only; the
        Triton one where the Mosaic one does not take the sizes).
      conv_backward: "triton" | "mosaic": the same choice for the backward's first kernel (g
        and the weight sums; `mosaic_conv.conv_bwd_g_mosaic`); its second is Triton's.
      core_vjp: where both fused kernels run (and, causal, without seq_idx or a returned
        cache), run prologue -> SSD -> epilogue as one custom VJP whose backward writes the
        in-projection output's gradient once (`layers/fused_mixer.py`) instead of three
        widened gradients that XLA adds; the same values and gradients.
      dt_min, dt_max, dt_init_floor: dt initialisation range and floor.
      a_init_range: A = -U(a_init_range) at init.
      dt_limit: (lo, hi) clip applied to softplus(dt + dt_bias).
      out_proj_init_scale: multiplies the out_proj init bound (LMs use 1/sqrt(n_layers)).
      dtype: compute dtype of activations; param_dtype: parameter dtype.

    Parameters (logical axes): in_proj.kernel (d_model, d_in_proj) ("embed", "mlp");
    conv_weight (d_conv, conv_dim) ("conv", "mlp"); conv_bias (conv_dim,) ("mlp",);
    dt_bias, A_log, D (nheads,) ("heads",); norm.weight (d_inner,) ("mlp",);
    out_proj.kernel (d_inner, d_model) ("mlp", "embed").
    """

    def __init__(self, d_model: int, *, d_state: int = 128, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, d_conv: int = 4, chunk_size: int = 256, ssd_impl: str = "auto",
                 ssd_kernels: KernelConfig | None = None, norm_impl: str = "auto",
                 conv_impl: str = "auto", conv_forward: str = "triton",
                 conv_backward: str = "triton", core_vjp: bool = False,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 a_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_limit: tuple[float, float] = (0.0, float("inf")),
                 out_proj_init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d_inner = expand * d_model
        if min(d_model, d_state, expand, headdim, ngroups, d_conv, chunk_size) <= 0:
            raise ValueError("Mamba2: all sizes must be positive")
        if d_inner % headdim:
            raise ValueError(f"Mamba2: d_inner={d_inner} (expand*d_model) must be divisible "
                             f"by headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2: nheads={nheads} must be divisible by ngroups={ngroups}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.ngroups, self.d_conv, self.chunk_size = ngroups, d_conv, chunk_size
        self.ssd_impl = ssd_impl
        self.ssd_kernels = ssd_kernels or KernelConfig()
        self.norm_impl = check_impl("model.norm_impl", norm_impl)
        self.conv_impl = check_impl("model.conv_impl", conv_impl)
        self.conv_forward = check_conv_kernel("model.conv_forward", conv_forward)
        self.conv_backward = check_conv_kernel("model.conv_backward", conv_backward)
        self.core_vjp = bool(core_vjp)
        self.d_inner, self.nheads = d_inner, nheads
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.d_in_proj = 2 * d_inner + 2 * ngroups * d_state + nheads
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.dtype, self.param_dtype = dtype, param_dtype

        self.in_proj = nnx.Linear(
            d_model, self.d_in_proj, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=partitioned(_uniform(1.0 / math.sqrt(d_model)), ("embed", "mlp")),
            rngs=rngs)
        conv_bound = 1.0 / math.sqrt(d_conv)
        self.conv_weight = nnx.Param(partitioned(_uniform(conv_bound), ("conv", "mlp"))(
            rngs.params(), (d_conv, self.conv_dim), param_dtype))
        self.conv_bias = nnx.Param(partitioned(_uniform(conv_bound), ("mlp",))(
            rngs.params(), (self.conv_dim,), param_dtype))
        self.dt_bias = nnx.Param(partitioned(_dt_bias_init(dt_min, dt_max, dt_init_floor),
                                             ("heads",))(rngs.params(), (nheads,), param_dtype))
        self.A_log = nnx.Param(partitioned(_a_log_init(*a_init_range), ("heads",))(
            rngs.params(), (nheads,), param_dtype))
        self.D = nnx.Param(partitioned(nnx.initializers.ones, ("heads",))(
            rngs.params(), (nheads,), param_dtype))
        self.norm = GatedRMSNorm(d_inner, ngroups, eps=1e-5, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.out_proj = nnx.Linear(
            d_inner, d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=partitioned(_uniform(out_proj_init_scale / math.sqrt(d_inner)),
                                    ("mlp", "embed")),
            rngs=rngs)

    # ------------------------------------------------------------------ pieces (shared by paths)
    def _check_input(self, u: jax.Array, name: str, ndim: int) -> None:
        if u.ndim != ndim or u.shape[-1] != self.d_model:
            want = "(batch, seqlen, d_model)" if ndim == 3 else "(batch, d_model)"
            raise ValueError(f"Mamba2.{name}: expected {want} with d_model={self.d_model}, "
                             f"got shape {u.shape}")

    def _split_proj(self, zxbcdt: jax.Array):
        """(..., d_in_proj) -> z (..., d_inner), xBC (..., conv_dim), dt (..., nheads)."""
        z = zxbcdt[..., :self.d_inner]
        xbc = zxbcdt[..., self.d_inner:self.d_inner + self.conv_dim]
        dt = zxbcdt[..., self.d_inner + self.conv_dim:]
        return z, xbc, dt

    def _core(self, zxbcdt, mixers, a, d, dt_bias):
        """`fused_mixer.mixer_core` over `mixers` (this mixer, or both directions forward
        first) sharing this one's settings and projection output zxbcdt."""
        return mixer_core(
            zxbcdt, tuple(m.conv_weight[...] for m in mixers),
            tuple(m.conv_bias[...] for m in mixers), a, d, dt_bias,
            tuple(m.norm.weight[...] for m in mixers), ngroups=self.ngroups,
            d_state=self.d_state, chunk_size=self.chunk_size, dt_limit=self.dt_limit,
            ssd_impl=self.ssd_impl, kernels=self.ssd_kernels, eps=self.norm.eps,
            dtype=self.dtype, interpret=default_interpret(), conv_forward=self.conv_forward,
            conv_backward=self.conv_backward, **self._packed_columns())

    def _packed_columns(self) -> dict:
        """Where the fused conv kernels find xBC and dt in the projection's output
        [z | xBC | dt] (their xbc_offset, dt_offset, nheads); the gate is at column 0."""
        return dict(xbc_offset=self.d_inner, dt_offset=self.d_inner + self.conv_dim,
                    nheads=self.nheads)

    def _split_xbc(self, xbc: jax.Array):
        """(b, l, conv_dim) -> x (b,l,h,p), B (b,l,g,n), C (b,l,g,n)."""
        gn = self.ngroups * self.d_state
        lead = xbc.shape[:-1]
        x = xbc[..., :self.d_inner].reshape(*lead, self.nheads, self.headdim)
        b = xbc[..., self.d_inner:self.d_inner + gn].reshape(*lead, self.ngroups, self.d_state)
        c = xbc[..., self.d_inner + gn:].reshape(*lead, self.ngroups, self.d_state)
        return x, b, c

    def _conv(self, xbc: jax.Array, seq_idx: jax.Array | None) -> jax.Array:
        """Depthwise causal conv + bias + SiLU. xbc (b, l, conv_dim) -> same shape, `dtype`.

        out[t] = bias + sum_k w[k] * xbc[t - (d_conv-1) + k], zero before t = 0 and, with
        seq_idx, zero for inputs from a different packed sequence than t's.
        """
        return causal_conv1d_silu(xbc, self.conv_weight[...], self.conv_bias[...],
                                  seq_idx=seq_idx, dtype=self.dtype)

    def ssm_constants(self):
        """float32 A (nheads,) = -exp(A_log), D (nheads, headdim) (each head's skip weight
        repeated over its channels: the form the SSD kernels read, so no broadcast per call)
        and dt_bias (nheads,). Functions of the parameters alone, so a caller that runs the
        mixer many times on the same parameters (a sampler's step loop) computes them once and
        passes them as `ssm`."""
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        d = jnp.broadcast_to(self.D[...].astype(jnp.float32)[:, None],
                             (self.nheads, self.headdim))
        return a, d, self.dt_bias[...].astype(jnp.float32)

    def _conv_tail(self, xbc: jax.Array) -> jax.Array:
        """Last d_conv-1 conv inputs of xbc (b, l, c), left-zero-padded when l < d_conv-1."""
        keep = self.d_conv - 1
        if keep == 0:
            return xbc[:, :0]
        padded = jnp.pad(xbc, ((0, 0), (keep, 0), (0, 0)))
        return padded[:, -keep:]

    # ----------------------------------------------------------------------------- forward
    def forward(self, u: jax.Array, *, seq_idx: jax.Array | None = None,
                return_cache: bool = False, ssm=None):
        """Parallel forward; optionally also the cache after the last token (prefill).

        u: (batch, seqlen, d_model); seq_idx: optional (batch, seqlen) int, packed-sequence ids;
        ssm: `ssm_constants()` computed beforehand, or None (computed here).
        Returns y (batch, seqlen, d_model) in `dtype`, and with return_cache a Mamba2Cache
        (conv_state in `dtype`) such that `step` continues the sequence exactly.
        """
        self._check_input(u, "__call__", 3)
        if seq_idx is not None and seq_idx.shape != u.shape[:2]:
            raise ValueError(f"Mamba2: seq_idx must have shape {u.shape[:2]}, got {seq_idx.shape}")
        batch, seqlen, _ = u.shape
        zxbcdt = self.in_proj(u.astype(self.dtype))
        z, xbc_in, dt = self._split_proj(zxbcdt)
        a, d, dt_bias = self.ssm_constants() if ssm is None else ssm
        fuse_conv = use_fused(self.conv_impl, seq_idx is None,
                              shape_supported=not conv_size_error(self.headdim, self.d_state))
        fuse_norm = use_fused(self.norm_impl, True,
                              shape_supported=not norm_size_error(self.headdim))
        if self.core_vjp and not return_cache and fuse_conv and fuse_norm:
            return self.out_proj(self._core(zxbcdt, (self,), a, d, dt_bias))
        if fuse_conv:
            x, b, c, dt = causal_conv_pallas(
                zxbcdt, zxbcdt, self.conv_weight[...], self.conv_bias[...], ngroups=self.ngroups,
                d_state=self.d_state, dtype=self.dtype, interpret=default_interpret(),
                forward_kernel=self.conv_forward, backward_kernel=self.conv_backward,
                **self._packed_columns())
        else:
            x, b, c = self._split_xbc(self._conv(xbc_in, seq_idx))
        out = ssd(x, dt.astype(jnp.float32), a, b, c, self.chunk_size, D=d, dt_bias=dt_bias,
                  dt_softplus=True, dt_limit=self.dt_limit, seq_idx=seq_idx,
                  return_final_states=return_cache, impl=self.ssd_impl,
                  kernels=self.ssd_kernels)
        y, final = out if return_cache else (out, None)
        if fuse_norm:
            y = gated_norm_pallas(y, zxbcdt, self.norm.weight[...], ngroups=self.ngroups,
                                  eps=self.norm.eps, dtype=self.dtype,
                                  interpret=default_interpret())
        else:
            y = self.norm(y.reshape(batch, seqlen, self.d_inner).astype(self.dtype), z)
        y = self.out_proj(y)
        if not return_cache:
            return y
        cache = Mamba2Cache(conv_state=self._conv_tail(xbc_in).astype(self.dtype),
                            ssm_state=final.astype(jnp.float32))
        return y, cache

    def __call__(self, u: jax.Array, *, seq_idx: jax.Array | None = None,
                 ssm=None) -> jax.Array:
        """u: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model) in `dtype`; ssm as in
        `forward`."""
        return self.forward(u, seq_idx=seq_idx, ssm=ssm)

    # ------------------------------------------------------------------------ recurrent step
    def init_cache(self, batch: int, dtype=jnp.float32) -> Mamba2Cache:
        """Zero cache: conv_state (batch, d_conv-1, conv_dim) in `dtype`, ssm_state float32."""
        return Mamba2Cache(
            conv_state=jnp.zeros((batch, self.d_conv - 1, self.conv_dim), dtype),
            ssm_state=jnp.zeros((batch, self.nheads, self.headdim, self.d_state), jnp.float32))

    def step(self, u_t: jax.Array, cache: Mamba2Cache) -> tuple[jax.Array, Mamba2Cache]:
        """Advances one token. u_t: (batch, d_model) -> (y_t (batch, d_model) in `dtype`, cache).

        Running `step` over a sequence from `init_cache` equals the parallel forward.
        """
        self._check_input(u_t, "step", 2)
        batch = u_t.shape[0]
        if cache.ssm_state.shape != (batch, self.nheads, self.headdim, self.d_state):
            raise ValueError(f"Mamba2.step: cache ssm_state shape {cache.ssm_state.shape} does "
                             f"not match batch {batch} and this block")
        zxbcdt = self.in_proj(u_t.astype(self.dtype))
        z, xbc, dt = self._split_proj(zxbcdt)
        window = jnp.concatenate([cache.conv_state, xbc[:, None].astype(cache.conv_state.dtype)],
                                 axis=1)  # (b, d_conv, conv_dim), oldest first
        conv = jnp.sum(window.astype(jnp.float32) * self.conv_weight[...].astype(jnp.float32),
                       axis=1) + self.conv_bias[...].astype(jnp.float32)
        x, b, c = self._split_xbc(jax.nn.silu(conv))  # float32: (b,h,p), (b,g,n), (b,g,n)
        a, d, dt_bias = self.ssm_constants()
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)
        dt = jnp.clip(dt, self.dt_limit[0], self.dt_limit[1])  # (b, h)
        heads_per_group = self.nheads // self.ngroups
        b = jnp.repeat(b, heads_per_group, axis=1)  # (b, h, n)
        c = jnp.repeat(c, heads_per_group, axis=1)
        decay = jnp.exp(dt * a)  # (b, h)
        state = (cache.ssm_state * decay[:, :, None, None]
                 + (dt[:, :, None] * x)[..., None] * b[:, :, None, :])
        y = jnp.einsum("bhpn,bhn->bhp", state, c) + d * x
        y = self.norm(y.reshape(batch, self.d_inner).astype(self.dtype), z)
        y = self.out_proj(y)
        return y, Mamba2Cache(conv_state=window[:, 1:], ssm_state=state)


# ------------------------------------------------------------------------ bidirectional mixer

class BidirectionalMamba2(nnx.Module):
    """Bidirectional Mamba-2 mixer: a causal scan plus a scan over the flipped sequence.

        y = out( ( N_f(SSD_f(conv_f(xBC))) + flip(N_b(SSD_b(conv_b(flip(xBC))))) ) / 2 )

    `.fwd` and `.bwd` are two complete `Mamba2` mixers (so a causal checkpoint maps onto each
    one with the same function). The backward direction reads the sequence right to left.

    Weight sharing (`share_projections`, default True, Caduceus-style):
      * shared: in_proj (so z, x, B, C, dt projections) and out_proj. `bwd.in_proj` and
        `bwd.out_proj` are the *same* module objects as `fwd`'s (an NNX shared reference: one
        parameter, one gradient). The projections are then computed once for both directions.
      * per direction, always: the conv (weight, bias), A_log, dt_bias, D and the gated-norm
        weight, i.e. everything that shapes the time dynamics.
      Why shared by default: (1) a bidirectional block then has the parameter count and the
      projection FLOPs of one causal block (projections are >97% of a block's parameters), so the
      AR baseline and the denoiser compare at equal size layer for layer, and the extra cost of
      seeing both sides is only the second conv + SSD; (2) warm-starting from a causal
      checkpoint gives both directions the same projections anyway; (3) the direction-specific
      dynamics (decay rates, step sizes, conv filters) are what distinguishes the two scans.
      Caduceus ties in/out projections the same way; MDLM's dimamba and Vim keep two full sets
      (`share_projections=False` reproduces that: independent in_proj/out_proj per direction);
      Hydra's quasiseparable mixer is a different operator and is not offered here.
    Combination: the mean of the two directions (not the sum), so the output scale matches a
    single causal mixer's; with shared out_proj the mean is taken before the (linear) out_proj.

    Both directions' SSDs run as ONE `ssd` call with 2*nheads heads (the backward half in
    flipped time), which halves the number of SSD kernels; with `seq_idx` the two scans are
    separate calls because the backward one needs the flipped segment ids. The two convs are
    separate elementwise programs (each direction has its own filter; XLA fuses each).
    With shared projections, no `seq_idx` and one dt_limit for both directions, two fused Pallas
    kernels can replace XLA around that SSD call: the prologue (`conv_impl`;
    `layers/fused_conv.py`: both convs + SiLU, the flip of the backward input and the
    concatenation of both directions' x, B, C, dt) and the epilogue (`norm_impl`;
    `layers/fused_norm.py`: the two gated norms, the flip and the mean). Each knob is resolved
    per call by `triton_common.use_fused`: "pallas" runs the kernel (in the Pallas interpreter
    off GPU), "auto" runs it on a GPU where the kernel takes the sizes (training and
    sampling), "xla" never; otherwise the XLA path.

    Args: those of `Mamba2` plus `share_projections`.
    """

    def __init__(self, d_model: int, *, share_projections: bool = True, rngs: nnx.Rngs,
                 **mamba2_kwargs):
        self.share_projections = share_projections
        self.fwd = Mamba2(d_model, rngs=rngs, **mamba2_kwargs)
        self.bwd = Mamba2(d_model, rngs=rngs, **mamba2_kwargs)
        if share_projections:
            self.bwd.in_proj = self.fwd.in_proj
            self.bwd.out_proj = self.fwd.out_proj
        self.d_model = d_model

    def ssm_constants(self):
        """Both directions' float32 (A, D, dt_bias) concatenated along the heads (A and dt_bias
        (2 * nheads,), D (2 * nheads, headdim)): forward heads first, as the one SSD call takes
        them (`Mamba2.ssm_constants`)."""
        both = zip(self.fwd.ssm_constants(), self.bwd.ssm_constants())
        return tuple(jnp.concatenate(pair, axis=0) for pair in both)

    def __call__(self, u: jax.Array, *, seq_idx: jax.Array | None = None,
                 ssm=None) -> jax.Array:
        """u: (batch, seqlen, d_model) -> y: (batch, seqlen, d_model) in the blocks' `dtype`;
        ssm: `ssm_constants()` computed beforehand, or None (computed here)."""
        f, bk = self.fwd, self.bwd
        f._check_input(u, "__call__", 3)
        if seq_idx is not None and seq_idx.shape != u.shape[:2]:
            raise ValueError(f"BidirectionalMamba2: seq_idx must have shape {u.shape[:2]}, "
                             f"got {seq_idx.shape}")
        batch, seqlen, _ = u.shape
        u = u.astype(f.dtype)
        zxf = f.in_proj(u)
        zxb = zxf if self.share_projections else bk.in_proj(u)
        z_f, xbc_f, dt_f = f._split_proj(zxf)
        z_b, xbc_b, dt_b = bk._split_proj(zxb)
        seq_r = _flip(seq_idx)
        a, d, bias = self.ssm_constants() if ssm is None else ssm
        common = dict(dt_softplus=True, dt_limit=f.dt_limit, impl=f.ssd_impl, kernels=f.ssd_kernels)
        one_call = seq_idx is None and f.dt_limit == bk.dt_limit
        fusable = one_call and self.share_projections
        fuse_conv = use_fused(f.conv_impl, fusable,
                              shape_supported=not conv_size_error(f.headdim, f.d_state))
        fuse_norm = use_fused(f.norm_impl, fusable, shape_supported=not norm_size_error(f.headdim))
        if fuse_conv and fuse_norm and f.core_vjp:
            return f.out_proj(f._core(zxf, (f, bk), a, d, bias))
        # Both directions in "scan time": backward inputs are flipped.
        if one_call:
            cat = lambda p, q, axis=2: jnp.concatenate([p, q], axis=axis)  # noqa: E731
            if fuse_conv:  # reads xBC and dt from the projection's output: no slice copies
                x, b, c, dt = bidirectional_conv_pallas(
                    zxf, zxf, f.conv_weight[...], bk.conv_weight[...], f.conv_bias[...],
                    bk.conv_bias[...], ngroups=f.ngroups, d_state=f.d_state, dtype=f.dtype,
                    interpret=default_interpret(), forward_kernel=f.conv_forward,
                    backward_kernel=f.conv_backward,
                    **f._packed_columns())
            else:
                x_f, b_f, c_f = f._split_xbc(f._conv(xbc_f, None))
                x_b, b_b, c_b = bk._split_xbc(bk._conv(_flip(xbc_b), None))
                x, b, c = cat(x_f, x_b), cat(b_f, b_b), cat(c_f, c_b)
                dt = cat(dt_f, _flip(dt_b)).astype(jnp.float32)
            y = ssd(x, dt, a, b, c, f.chunk_size, D=d, dt_bias=bias, **common)
            if fuse_norm:
                y = bidirectional_gated_norm_pallas(
                    y, zxf, f.norm.weight[...], bk.norm.weight[...], ngroups=f.ngroups,
                    eps=f.norm.eps, dtype=f.dtype, interpret=default_interpret())
                return f.out_proj(y)
            y_f, y_b = y[:, :, :f.nheads], y[:, :, f.nheads:]
        else:
            x_f, b_f, c_f = f._split_xbc(f._conv(xbc_f, seq_idx))
            x_b, b_b, c_b = bk._split_xbc(bk._conv(_flip(xbc_b), seq_r))
            dt_b = _flip(dt_b)
            h = f.nheads
            y_f = ssd(x_f, dt_f.astype(jnp.float32), a[:h], b_f, c_f, f.chunk_size, D=d[:h],
                      dt_bias=bias[:h], seq_idx=seq_idx, **common)
            y_b = ssd(x_b, dt_b.astype(jnp.float32), a[h:], b_b, c_b, bk.chunk_size, D=d[h:],
                      dt_bias=bias[h:], seq_idx=seq_r, dt_softplus=True, dt_limit=bk.dt_limit,
                      impl=bk.ssd_impl, kernels=bk.ssd_kernels)
        y_f = f.norm(y_f.reshape(batch, seqlen, f.d_inner).astype(f.dtype), z_f)
        y_b = bk.norm(_flip(y_b).reshape(batch, seqlen, bk.d_inner).astype(bk.dtype), z_b)
        if self.share_projections:
            return f.out_proj((y_f + y_b) * 0.5)
        return (f.out_proj(y_f) + bk.out_proj(y_b)) * 0.5
