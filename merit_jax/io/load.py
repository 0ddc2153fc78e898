"""Load a model from either kind of directory: a merit_jax checkpoint or a Hugging Face checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from merit_jax.io import checkpoint
from merit_jax.io import hf
from merit_jax.models import params as P
from merit_jax.models.registry import model_factory


def read_config(path: str | os.PathLike) -> dict:
    """The HF config of either kind of model directory."""
    return checkpoint.read_hf_config(path) if checkpoint.is_checkpoint(path) else hf.read_hf_config(path)


def load_model(path: str | os.PathLike, *, mesh=None, dtype: str = "float32", compute_dtype=None, remat="none",
               attention="xla", scan_layers: bool = False, max_segments: int = 16) -> nnx.Module:
    """A model with the weights of `path`, each parameter loaded straight into its shards on `mesh`."""
    path = Path(path)
    if not checkpoint.is_checkpoint(path):
        return hf.load_hf(path, dtype, mesh=mesh, compute_dtype=compute_dtype, remat=remat, attention=attention,
                          scan_layers=scan_layers, max_segments=max_segments)
    hf_config = checkpoint.read_hf_config(path)
    make = model_factory(hf_config, f"{path}/config.json", dtype=dtype, compute_dtype=compute_dtype, remat=remat,
                         attention=attention, scan_layers=scan_layers,
                         max_segments=max_segments)
    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    specs = P.specs(abs_state)
    stored = checkpoint.tensor_specs(path)
    P.check_names(specs, stored, str(path))
    for name, (shape, _) in specs.items():
        if tuple(stored[name][0]) != tuple(shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(stored[name][0])}, "
                             f"config.json implies {tuple(shape)}")
    shardings = P.shardings(abs_state, mesh) if mesh is not None else None
    flat = checkpoint.load(path, shardings=shardings)

    def fill(path_, var):
        x = flat[P.path_name(path_)]
        x = x.astype(var.dtype) if x.dtype != var.dtype else x
        return var.replace(x if isinstance(x, jax.Array) else jax.numpy.asarray(np.asarray(x)))

    return nnx.merge(graphdef, nnx.map_state(fill, abs_state))
