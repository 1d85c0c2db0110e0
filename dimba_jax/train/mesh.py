"""The device mesh and the mapping from logical axis names to mesh axes.

Layers name the axes of every parameter with *logical* names (``nnx.with_partitioning(init,
("embed", "mlp"))``). `config.mesh.axis_rules` maps each logical name to mesh axes, e.g.
``("embed", "fsdp")`` shards every d_model dimension over the `fsdp` axis and
``("batch", ("data", "fsdp"))`` splits the batch over both data-parallel axes. Swapping the
rules re-shards the whole model without touching a layer (MaxText's recipe).

The mesh has three named axes, in this order:
  data   — pure data parallelism (parameters replicated);
  fsdp   — data parallelism with parameters and optimizer state sharded (ZeRO-3 / FSDP);
  tensor — model parallelism over inner dimensions (d_inner, heads, vocab).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) sizes; one of them may be -1 (= the remaining devices).

    Raises:
      ValueError: more than one -1, a size < 1, or sizes whose product is not num_devices.
    """
    sizes = [int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: each must be >= 1 or -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if num_devices % rest:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                f"divisible by {rest}")
        sizes[sizes.index(-1)] = num_devices // rest
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {int(np.prod(sizes))}, "
            f"but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    Uses `jax.experimental.mesh_utils.create_device_mesh` so that on GPUs/TPUs the innermost
    axis (tensor) maps to the fastest interconnect; falls back to a plain reshape elsewhere.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU or an unusual topology: order as given.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_dict(axis_rules) -> dict[str, Any]:
    """`config.mesh.axis_rules` ((logical, mesh_axes), ...) -> {logical: mesh_axes}."""
    out = {}
    for rule in axis_rules:
        if len(rule) != 2:
            raise ValueError(f"axis rule {rule!r} must be a (logical_name, mesh_axes) pair")
        name, target = rule
        if isinstance(target, list):
            target = tuple(target)
        out[str(name)] = target
    return out


def _as_axes(target) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh, rules: dict[str, Any]) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec on `mesh`.

    A dimension stays unsharded (None) when its logical name has no rule (or maps to None),
    when a mesh axis is already used by an earlier dimension of the same array, or when its
    size is not divisible by the product of the mesh axis sizes (e.g. a byte vocabulary of
    259 over tensor=2). Mesh axes of size 1 are dropped.

    Raises:
      ValueError: a logical name that `rules` does not know, or a rank mismatch.
    """
    if logical_axes is None:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"logical axis {name!r} has no rule in config.mesh.axis_rules "
                f"(known: {sorted(rules)})")
        axes = tuple(a for a in _as_axes(rules[name])
                     if a not in used and mesh.shape[a] > 1)
        total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or size % total:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def variable_logical_axes(variable) -> tuple[str | None, ...] | None:
    """The logical axis names an nnx Variable was annotated with (None when unannotated).

    Reads the metadata written by `nnx.with_partitioning` across flax versions
    ("out_sharding" in flax >= 0.12, "sharding_names" / "sharding" before).
    """
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            if isinstance(names, PartitionSpec):
                names = tuple(names)
            return tuple(names)
    return None


def batch_spec(rules: dict[str, Any], mesh: Mesh, ndim: int = 2) -> PartitionSpec:
    """PartitionSpec of a (batch, ...) data array: the batch dimension by the "batch" rule."""
    axes = tuple(a for a in _as_axes(rules.get("batch", ("data", "fsdp"))) if mesh.shape[a] > 1)
    first = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(first, *([None] * (ndim - 1)))


def batch_shards(rules: dict[str, Any], mesh: Mesh) -> int:
    """Number of shards the batch dimension is split into (the global batch must divide by it)."""
    axes = [a for a in _as_axes(rules.get("batch", ("data", "fsdp"))) if mesh.shape[a] > 1]
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (scalars, RNG keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())
