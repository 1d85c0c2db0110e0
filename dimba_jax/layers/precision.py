"""Precision helpers of the models (no model here: layers below both).

`cast_linears_to_compute_dtype`: parameters stored in the dtype a layer computes in, for
programs that only run the model. An `nnx.Linear` built with `dtype=bfloat16,
param_dtype=float32` casts its float32 kernel to bfloat16 on every call. Inside a sampling or
decoding loop the weights enter the loop in float32, so the cast runs at every step (on an H100,
DIMBA base sampling at batch 1 ran two standalone `wrapped_convert` kernels per layer and step,
7% of its kernel time, which these casts explain: benchmarks/results/latency_levers_h100_profile.md).
The function does the cast once, before the loop; the layer's own cast is then the identity, so
the results are the same bits. `cast_state_linears` does it once outside any program, on a
copy of a split module, for programs bound to their weights (`sampler.bound_program`,
`ar.generate_bound`).

`head_einsum`: a vocabulary-sized GEMM (a tied head x @ E^T, DIMBA's softmax @ E) with its
operands in a chosen dtype and float32 sums, forward and backward (`model.head_dtype`).
`affine`: x @ W + b the same way (DIMBA's stem and output projection, `model.io_dtype`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def cast_linears_to_compute_dtype(model: nnx.Module) -> int:
    """Stores the kernel and bias of every `nnx.Linear` of `model` whose compute `dtype` is set
    in that dtype (in place: call it on a model merged inside the jitted program, so the stored
    parameters are untouched). Other parameters (norms, SSM parameters, embeddings) keep
    their dtype. Returns the number of arrays cast.
    """
    cast = 0
    for _, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Linear) or module.dtype is None:
            continue
        dtype = jnp.dtype(module.dtype)
        for name in ("kernel", "bias"):
            param = getattr(module, name, None)
            if not isinstance(param, nnx.Variable):
                continue
            value = param.get_value() if hasattr(param, "get_value") else param.value
            if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != dtype:
                if hasattr(param, "set_value"):  # flax >= 0.12; older: the value property
                    param.set_value(value.astype(dtype))
                else:
                    param.value = value.astype(dtype)
                cast += 1
    return cast


def cast_state_linears(graphdef, state):
    """`cast_linears_to_compute_dtype` on a copy of the split module `(graphdef, state)`:
    returns (graphdef, state) with every compute-dtype `nnx.Linear`'s kernel and bias stored in
    that dtype, the other arrays the same. The caller's module and state are untouched (the
    copy has its own Variables). A program over this state finds nothing left to cast: the
    same bits, and no cast of the weights at each call (bound sampling / decoding programs)."""
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    cast_linears_to_compute_dtype(copy)
    return nnx.split(copy)


def head_einsum(spec: str, a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """A vocabulary-sized GEMM of the head or the output prior: jnp.einsum(spec, a, b), float32.

    spec: a two-operand contraction "A,B->C" in which every index appears in exactly two of A,
    B, C ("bld,vd->blv": x @ E^T; "blv,vd->bld": p @ E). a, b: float arrays (taken as float32;
    their gradients come back in their own dtypes). dtype float32: the float32 einsum itself.
    bfloat16: both operands cast to bfloat16 and the products summed in float32
    (`preferred_element_type`); the backward's two GEMMs likewise take the cotangent and the
    saved operands in bfloat16 and return float32 gradients. -> float32 array of C.
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a, b)
    return _low_precision_einsum(spec, jnp.dtype(dtype), a, b)


def affine(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype=jnp.float32) -> jax.Array:
    """x @ kernel + bias in float32, with x, kernel and bias rounded to `dtype` first.

    x float (b, L, i), kernel float (i, o), bias float (o,) -> float32 (b, L, o). The GEMM is
    `head_einsum` (operands in dtype, float32 sums, forward and backward); the bias is rounded
    to dtype and added in float32. So parameters stored already in dtype (as
    `cast_linears_to_compute_dtype` leaves an `nnx.Linear` whose compute dtype is dtype) give
    the same bits as float32 ones; dtype float32 is the float32 affine map itself.
    """
    y = head_einsum("bli,io->blo", x, kernel, dtype)
    return y + bias.astype(dtype).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(spec, dtype, a, b):
    """`head_einsum` in `dtype`: float32 a, b -> float32 (operands in dtype, float32 sums)."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _low_precision_einsum_fwd(spec, dtype, a, b):
    """The forward: (float32 output, residuals (a, b) in dtype)."""
    a_low, b_low = a.astype(dtype), b.astype(dtype)
    out = jnp.einsum(spec, a_low, b_low, preferred_element_type=jnp.float32)
    return out, (a_low, b_low)


def _low_precision_einsum_bwd(spec, dtype, res, g):
    """The backward: float32 cotangent g of C -> float32 (da, db), each one GEMM in dtype."""
    a_low, b_low = res
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    g_low = g.astype(dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g_low, b_low, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{out},{sa}->{sb}", g_low, a_low, preferred_element_type=jnp.float32)
    return da, db


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)
