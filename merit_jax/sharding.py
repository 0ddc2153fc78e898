"""Device mesh (data, fsdp, tp) and the one table that maps each tensor role to mesh axes.

Parameters carry *logical* axis names (`embed`, `heads`, `mlp`, ...) as metadata; activations are
constrained with the same names. `LOGICAL_RULES` below is the only place where a logical name meets a mesh
axis, so changing a parallelism strategy is a one-line edit.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tp")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations: examples over every data-parallel axis
    "seq": None,
    "act_embed": None,
    "act_heads": "tp",
    "act_mlp": "tp",
    "act_vocab": "tp",
    "embed": "fsdp",  # parameters: ZeRO-3 style over fsdp, Megatron style over tp
    "vocab": "tp",
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "norm": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tp) mesh over all (global) devices; one axis may be -1 (takes what is left)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tp]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tp={tp}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tp={tp}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by data*fsdp*tp={known} (the fixed axes)")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: data*fsdp*tp = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} "
            f"does not match the {n} available devices")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axes; with `shape` and `mesh`, dims the mesh axis does not divide stay whole."""
    spec = []
    used: set[str] = set()
    for i, name in enumerate(logical_axes):
        axes = LOGICAL_RULES.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dim
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def named_sharding(mesh: Mesh, logical_axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or all(s == 1 for s in mesh.shape.values()):
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] host batch: B over (data, fsdp)."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))
