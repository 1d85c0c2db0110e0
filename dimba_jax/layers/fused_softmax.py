"""The numerator of a vocabulary softmax as one Pallas kernel: what `softmax(s / t) @ E`
needs before its GEMM.

From scores s (..., V) float32 and a temperature t (a float32 scalar):

    m = max_v s_v / t,   e_v = exp(s_v / t - m),   total = sum_v e_v

e (..., V) in `dtype` (the head GEMM's operand dtype) and total (...) float32, the sum of the
float32 e before rounding. The softmax is then (e @ E) / total (`DimbaModel.softmax_embedding`),
and the (..., V) probabilities are never written. In XLA this is three passes over s per call
(the max, the exponentials for the GEMM, their sum); the kernel reads each row once: a program
holds whole rows (V a power of two, at most MAX_VOCAB) and writes e and the row sums.

`softmax_numerator_xla` is the math in jnp (m under `stop_gradient`, as the XLA path of the
model differentiates it); `softmax_numerator_pallas` the kernel (Triton backend, or the Pallas
interpreter with `interpret=True`) with that function's gradient as its custom VJP, recomputed
from the saved scores and row maxima.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MAX_VOCAB = 16384  # the longest row a program holds (float32 registers)
ROW_ELEMENTS = 8192  # rows per program: this many elements, at least one row


def numerator_size_error(vocab: int) -> str:
    """Why the kernel cannot take rows of `vocab` scores, "" if it can."""
    if vocab < 16 or vocab & (vocab - 1) or vocab > MAX_VOCAB:
        return (f"the fused softmax needs the vocabulary a power of two in [16, {MAX_VOCAB}], "
                f"got {vocab}")
    return ""


def softmax_numerator_xla(scores, temperature, dtype):
    """(e (..., V) in dtype, total (...) float32) of the module docstring, in jnp."""
    s = scores.astype(jnp.float32) / temperature
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    return e.astype(dtype), jnp.sum(e, axis=-1)


def _kernel(s_ref, t_ref, e_ref, total_ref, m_ref):
    """s_ref (R, V) float32 rows, t_ref (1,) the temperature; e_ref (R, V), total_ref and
    m_ref (R,) float32."""
    s = s_ref[...].astype(jnp.float32) / t_ref[...]
    m = jnp.max(s, axis=1)
    e = jnp.exp(s - m[:, None])
    e_ref[...] = e.astype(e_ref.dtype)
    total_ref[...] = jnp.sum(e, axis=1)
    m_ref[...] = m


def _rows(n: int, vocab: int) -> int:
    """Rows per program: the largest power of two <= ROW_ELEMENTS / vocab dividing n (>= 1)."""
    r = 1
    while r * 2 * vocab <= ROW_ELEMENTS and n % (r * 2) == 0:
        r *= 2
    return r


def _call(scores, temperature, cfg):
    dtype, interpret = cfg
    n, vocab = scores.shape
    r = _rows(n, vocab)
    rows = pl.BlockSpec((r, vocab), lambda i: (i, 0))
    vec = pl.BlockSpec((r,), lambda i: (i,))
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
        params = plt.CompilerParams(num_warps=8 if r * vocab >= 4096 else 4, num_stages=1)
    return pl.pallas_call(
        _kernel,
        out_shape=(jax.ShapeDtypeStruct((n, vocab), jnp.dtype(dtype)),
                   jax.ShapeDtypeStruct((n,), jnp.float32),
                   jax.ShapeDtypeStruct((n,), jnp.float32)),
        grid=(n // r,),
        in_specs=[rows, pl.BlockSpec((1,), lambda i: (0,))],
        out_specs=(rows, vec, vec),
        compiler_params=params,
        interpret=interpret,
        name="softmax_numerator",
    )(scores, temperature.reshape(1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused(scores, temperature, cfg):
    e, total, _ = _call(scores, temperature, cfg)
    return e, total


def _fused_fwd(scores, temperature, cfg):
    e, total, m = _call(scores, temperature, cfg)
    return (e, total), (scores, temperature, m)


def _fused_bwd(cfg, res, cts):
    """With s' = s / t and e = exp(s' - m) (m held constant): d s' = (de + dtotal) * e."""
    scores, temperature, m = res
    de, dtotal = cts
    s = scores / temperature
    g = (de.astype(jnp.float32) + dtotal[:, None]) * jnp.exp(s - m[:, None])
    dt = -jnp.sum(jnp.where(g != 0, g * s, 0.0)) / temperature  # -inf scores carry no weight
    return g / temperature, dt


_fused.defvjp(_fused_fwd, _fused_bwd)


def softmax_numerator_pallas(scores, temperature, dtype, *, interpret: bool = False):
    """`softmax_numerator_xla` as the fused kernel (differentiable in scores and temperature).

    Args: scores (..., V) float32 (entries may be -inf, not a whole row); temperature a
    float32 scalar (array or float); dtype the output e's dtype; interpret: the Pallas
    interpreter. Returns (e (..., V) in dtype, total (...) float32).
    Raises ValueError (one line) for a vocabulary the kernel does not take
    (`numerator_size_error`).
    """
    error = numerator_size_error(scores.shape[-1])
    if error:
        raise ValueError(error)
    lead = scores.shape[:-1]
    e, total = _fused(scores.astype(jnp.float32).reshape(-1, scores.shape[-1]),
                      jnp.asarray(temperature, jnp.float32),
                      (jnp.dtype(dtype).name, bool(interpret)))
    return e.reshape(scores.shape), total.reshape(lead)
