"""Parameters stored in the dtype a layer computes in, for programs that only run the model.

An `nnx.Linear` built with `dtype=bfloat16, param_dtype=float32` casts its float32 kernel to
bfloat16 on every call. Inside a sampling or decoding loop the weights enter the loop in float32,
so the cast runs at every step (on an H100, DIMBA base sampling at batch 1 ran two standalone
`wrapped_convert` kernels per layer and step, 7% of its kernel time, which these casts explain:
benchmarks/results/latency_levers_h100_profile.md).
`cast_linears_to_compute_dtype` does the cast once, before the loop; the layer's own cast is
then the identity, so the results are the same bits.
"""

from __future__ import annotations

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
