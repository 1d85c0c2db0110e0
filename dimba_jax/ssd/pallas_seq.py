"""SSD forward in one Pallas Triton launch, for gradient-free calls at small batch.

A program per (batch, head, block of `block_p` headdim rows) walks every chunk of its sequence
in order and carries its rows of the state in registers. Per chunk of Q positions (s the
chunk-local cumulative sum of dt*A, formed in the kernel at its own chunk; h the (block_p, N)
float32 state entering the chunk):

    y  = ((C B^T) o L) @ (x dt) + exp(s) * (C @ h^T) + D x,     L_ij = exp(s_i - s_j) [i >= j]
    h <- exp(s_end) h + x^T @ (B * dt * exp(s_end - s))

The chunked forward (`pallas_mosaic_fwd`: chunk states fused with the state pass, then the
chunk output) takes two launches and writes each chunk's entering state to HBM between them;
here nothing but y and the final state leaves the program. Its parallelism is batch x heads x
headdim blocks, with the chunks in sequence inside each program, which suits short sequences
at small batch: the batch-1 denoiser calls of the sampler (`KernelConfig.forward_only_kernel`).
Products on the tensor cores with float32 accumulation (tf32 for float32 operands); h enters
the output product rounded to x.dtype, as the chunked kernels store it.

Imports without a GPU (the Triton Pallas module is imported lazily); `interpret=True` runs it in
the Pallas interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimba_jax.ssd import pallas_gpu as _tri

BLOCK_LEN = 64  # positions per chunk: the (Q, Q) decay tile stays small enough for registers
BLOCK_P = 32  # headdim rows of the state per program


def supported_seq(*, headdim: int, dstate: int, dtype, block_p: int = BLOCK_P,
                  q: int = BLOCK_LEN) -> tuple[bool, str]:
    """Whether `ssd_seq_forward` takes these sizes: (True, "") or (False, the reason)."""
    pow2 = lambda v: v > 0 and not v & (v - 1)  # noqa: E731
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                jnp.dtype(jnp.float32)):
        return False, f"dtype {jnp.dtype(dtype).name} (bfloat16, float16 or float32 only)"
    if not (pow2(block_p) and 16 <= block_p and headdim % block_p == 0):
        return False, f"block_p {block_p} must be a power of two >= 16 dividing headdim {headdim}"
    if not (pow2(dstate) and 16 <= dstate <= 256):
        return False, f"dstate {dstate} must be a power of two in [16, 256]"
    if not (pow2(q) and 16 <= q <= 128):
        return False, f"chunk {q} must be a power of two in [16, 128]"
    return True, ""


def _kernel(*refs, q, nc, has_h0):
    """One (batch, head, headdim block): every chunk in order, the state carried (from h0_ref,
    or from zeros without it)."""
    if has_h0:
        x_ref, b_ref, c_ref, dt_ref, a_ref, d_ref, h0_ref, y_ref, fin_ref = refs
    else:
        x_ref, b_ref, c_ref, dt_ref, a_ref, d_ref, y_ref, fin_ref = refs
    f32 = jnp.float32
    d, a = d_ref[...], a_ref[...]

    def chunk(ci, h):
        rows = pl.ds(pl.multiple_of(ci * q, q), q)
        x, bm, cm = x_ref[rows, :], b_ref[rows, :], c_ref[rows, :]
        dt = dt_ref[rows]
        s = jnp.cumsum(dt * a, axis=0)
        cdt = x.dtype
        m = (_tri.dot(cm, bm, trans_b=True) * _tri.masked_decay(s, q)).astype(cdt)
        xd = (x.astype(f32) * dt[:, None]).astype(cdt)
        y = _tri.dot(m, xd) + jnp.exp(s)[:, None] * _tri.dot(cm, h.astype(cdt), trans_b=True)
        y_ref[rows, :] = (y + d[None, :] * x.astype(f32)).astype(y_ref.dtype)
        s_end = _tri.last_entry(s, q)
        bw = (bm.astype(f32) * (jnp.exp(s_end - s) * dt)[:, None]).astype(cdt)
        return jnp.exp(s_end) * h + _tri.dot(x, bw, trans_a=True)

    h0 = h0_ref[...] if has_h0 else jnp.zeros(fin_ref.shape, f32)
    fin_ref[...] = jax.lax.fori_loop(0, nc, chunk, h0)


def ssd_seq_forward(x, b, c, dt, A, h0, d, *, q: int = BLOCK_LEN, hpg: int,
                    block_p: int = BLOCK_P, num_warps: int = 4, num_stages: int = 1,
                    interpret: bool = False):
    """The chunked SSD forward in one launch (no gradient: a plain function of its inputs).

    Args:
      x: (batch, Lp, nheads, P) bfloat16/float16/float32, Lp a multiple of q (zero padded).
      b, c: (batch, Lp, ngroups, N) in x.dtype.
      dt: (batch, nheads, Lp) float32 step sizes, processed (bias, softplus, limits) and zero
        on padded rows (`pallas_gpu.prepare_chunks`).
      A: (nheads,) float32 (negative: the decay per unit step).
      h0: (batch, nheads, P, N) float32, the state entering the sequence; None = zeros (made in
        the kernel, nothing read).
      d: the D skip, (nheads,) per head or (nheads, P) per headdim row (zeros for none).
      q: chunk length; hpg: heads per group; block_p: headdim rows per program;
      num_warps: warps per Triton program; num_stages: Triton software-pipeline stages of the
      loop over chunks (1 = none); interpret: the Pallas interpreter.
    Returns:
      y (batch, Lp, nheads, P) in x.dtype; the final state (batch, nheads, P, N) float32.
    Raises:
      ValueError for sizes `supported_seq` refuses or inconsistent shapes.
    """
    bsz, lp, nh, p = x.shape
    n = b.shape[-1]
    ok, why = supported_seq(headdim=p, dstate=n, dtype=x.dtype, block_p=block_p, q=q)
    if not ok:
        raise ValueError(f"ssd_seq_forward: {why}")
    if lp % q or b.shape != c.shape or b.shape[:2] != (bsz, lp) or nh != b.shape[2] * hpg:
        raise ValueError(f"ssd_seq_forward: x {x.shape}, B {b.shape}, C {c.shape} with {hpg} "
                         f"heads per group and chunk {q} do not fit together")
    xs = pl.BlockSpec((None, lp, None, block_p), lambda bi, hi, pi: (bi, 0, hi, pi))
    bs = pl.BlockSpec((None, lp, None, n), lambda bi, hi, pi: (bi, 0, hi // hpg, 0))
    vs = pl.BlockSpec((None, None, lp), lambda bi, hi, pi: (bi, hi, 0))
    hs = pl.BlockSpec((None, None, block_p, n), lambda bi, hi, pi: (bi, hi, pi, 0))
    if d.shape not in ((nh,), (nh, p)):
        raise ValueError(f"ssd_seq_forward: D must be ({nh},) or ({nh}, {p}), got {d.shape}")
    ds = (pl.BlockSpec((None, block_p), lambda bi, hi, pi: (hi, pi)) if d.ndim == 2
          else pl.BlockSpec((1,), lambda bi, hi, pi: (hi,)))
    a_spec = pl.BlockSpec((1,), lambda bi, hi, pi: (hi,))
    return pl.pallas_call(
        functools.partial(_kernel, q=q, nc=lp // q, has_h0=h0 is not None),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((bsz, nh, p, n), jnp.float32)),
        grid=(bsz, nh, p // block_p),
        in_specs=[xs, bs, bs, vs, a_spec, ds] + ([hs] if h0 is not None else []),
        out_specs=(xs, hs),
        compiler_params=None if interpret else _tri.triton_params(num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ssd_seq_fwd",
    )(x, b, c, dt.astype(jnp.float32), A.astype(jnp.float32), d.astype(jnp.float32),
      *([] if h0 is None else [h0.astype(jnp.float32)]))

