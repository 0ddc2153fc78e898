"""Parameters as a flat dict {"model/layers/0/self_attn/q_proj/kernel": array}: the currency of checkpoints,
merging, gradient extraction and export. Also: creating a model directly inside its shards."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from merit_jax.models.names import canonical, name_key  # noqa: F401  (re-exported)
from merit_jax.sharding import named_sharding


def path_name(path) -> str:
    return "/".join(str(p) for p in path)


def _flat_vars(node) -> dict[str, nnx.Variable]:
    state = node if isinstance(node, nnx.State) else nnx.state(node, nnx.Param)
    flat = {path_name(p): v for p, v in nnx.to_flat_state(state)}
    return {k: flat[k] for k in canonical(flat)}  # the same order for a module and for jax-made states


def flatten(node) -> dict[str, jax.Array]:
    """Flat {name: array} of a module's (or a State's) parameters."""
    return {k: v[...] for k, v in _flat_vars(node).items()}


def specs(node) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)}; works on abstract modules/states (from `nnx.eval_shape`) too."""
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _flat_vars(node).items()}


def logical_axes(node) -> dict[str, tuple]:
    return {k: v.get_metadata().get("logical_axes", (None,) * len(v.shape)) for k, v in _flat_vars(node).items()}


def shardings(node, mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedSharding of every parameter of `node` (a module or an abstract module from `nnx.eval_shape`)."""
    return {k: named_sharding(mesh, v.get_metadata().get("logical_axes", (None,) * len(v.shape)), v.shape)
            for k, v in _flat_vars(node).items()}


def state_shardings(state: nnx.State, mesh: Mesh):
    """A tree like `state` (params) with NamedSharding leaves (for jit in/out_shardings)."""
    return nnx.map_state(lambda path, v: named_sharding(
        mesh, v.get_metadata().get("logical_axes", (None,) * len(v.shape)), v.shape), state)


def check_names(expected: dict, got: dict, what: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(f"{what}: parameter names differ from the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")


def unflatten_into(model: nnx.Module, flat: dict[str, jax.Array], what: str = "parameters") -> nnx.Module:
    """Writes `flat` into `model` in place after checking names and shapes; returns the model."""
    variables = _flat_vars(model)
    check_names(variables, flat, what)
    for name, var in variables.items():
        if tuple(flat[name].shape) != tuple(var.shape):
            raise ValueError(f"{what}: tensor {name!r} has shape {tuple(flat[name].shape)}, "
                             f"the model expects {tuple(var.shape)}")
        var[...] = jax.numpy.asarray(flat[name], dtype=var.dtype) if not isinstance(flat[name], jax.Array) \
            else flat[name].astype(var.dtype)
    return model


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
    """Builds the model with every parameter created directly in its shard (never whole on one device)."""
    if mesh is None:
        return make_model()
    abstract = nnx.eval_shape(make_model)
    graphdef, abs_state = nnx.split(abstract)
    out_shardings = state_shardings(abs_state, mesh)

    def init():
        return nnx.split(make_model())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def create_from_arrays(make_model: Callable[[], nnx.Module], mesh: Mesh | None,
                       fetch: Callable[[str, tuple, np.dtype, tuple | None], np.ndarray], what: str) -> nnx.Module:
    """Builds the model from tensors delivered shard by shard: `fetch(name, shape, dtype, index)` returns the
    slice `index` (a tuple of slices, or None for the whole tensor) of tensor `name`."""
    abstract = nnx.eval_shape(make_model)
    graphdef, abs_state = nnx.split(abstract)
    shard_of = shardings(abs_state, mesh) if mesh is not None else {}

    def build(path, var):
        name, shape, dtype = path_name(path), tuple(var.shape), var.dtype
        if mesh is None:
            return var.replace(jax.numpy.asarray(fetch(name, shape, dtype, None)))
        array = jax.make_array_from_callback(shape, shard_of[name], lambda idx: fetch(name, shape, dtype, idx))
        return var.replace(array)

    state = nnx.map_state(build, abs_state)
    return nnx.merge(graphdef, state)
