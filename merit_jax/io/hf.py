"""Hugging Face checkpoints <-> merit_jax models, tensor by tensor.

Reading: safetensors (one file, or shards with `model.safetensors.index.json`, through
merit_jax.io.safetensors), sliced lazily so that each device receives only its shard. Writing: safetensors
shards streamed one tensor at a time (+ index), config.json, generation_config.json and the tokenizer files,
into a temporary directory renamed into place when complete. `orbax_to_hf` / `hf_to_orbax` convert whole
checkpoints (the convert CLI and the export stage call them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax.io import checkpoint
from merit_jax import artifacts as wd
from merit_jax.io.safetensors import MAX_SHARD_BYTES, SafetensorsDir, SafetensorsWriter
from merit_jax.models import params as P
from merit_jax.models.registry import model_factory

def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json: not a Hugging Face model directory")
    return wd.read_json(Path(path) / "config.json")


def hf_key(name: str) -> tuple[str, bool]:
    """merit_jax parameter name -> (HF tensor name, whether the tensor is transposed between the two)."""
    *prefix, leaf = name.split("/")
    hf_leaf, transpose = {"kernel": ("weight", True), "embedding": ("weight", False),
                          "scale": ("weight", False), "bias": ("bias", False),
                          "weight": ("weight", False)}[leaf]  # `weight`: kept in HF's layout (Conv3d)
    return ".".join([*prefix, hf_leaf]), transpose


# Qwen2.5-VL tensors as transformers 5 names them in memory; checkpoints (and save_pretrained) use the
# released names `visual.*` / `model.*`, which is what merit_jax writes; either is read.
_HF_ALIASES = ((r"^visual\.", "model.visual."), (r"^model\.(?!visual\.|language_model\.)", "model.language_model."))


def stored_key(key: str, stored) -> str:
    """`key`, or the alias under which a checkpoint holding `stored` names keeps that tensor."""
    if key in stored:
        return key
    for pattern, repl in _HF_ALIASES:
        alias = re.sub(pattern, repl, key)
        if alias != key and alias in stored:
            return alias
    return key


def load_hf_params_fetch(tensors: SafetensorsDir):
    """A `fetch(name, shape, dtype, index)` for `params.create_from_arrays` reading from HF tensors."""

    def fetch(name, shape, dtype, index):
        key, transpose = hf_key(name)
        key = stored_key(key, tensors.file_of)
        if key not in tensors.file_of:
            raise KeyError(f"{tensors.path}: tensor {key!r} (for {name}) is missing")
        hf_shape = tensors.specs[key][0]
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        if hf_shape != want:
            raise ValueError(f"{tensors.path}: tensor {key!r} has shape {hf_shape}, config.json implies {want}")
        idx = None if index is None else (tuple(reversed(index)) if transpose else index)
        x = tensors.get(key, idx)
        return np.asarray(x.T if transpose else x).astype(dtype)

    return fetch


def load_hf(path: str | os.PathLike, dtype: str = "float32", *, mesh=None, compute_dtype=None, remat="none",
            attention="xla", scan_layers: bool = False, max_segments: int = 16) -> nnx.Module:
    """A Flax NNX model with the weights of a local HF directory (each device gets only its shards)."""
    hf_config = read_hf_config(path)
    make = model_factory(hf_config, f"{path}/config.json", dtype=dtype, compute_dtype=compute_dtype, remat=remat,
                         attention=attention, scan_layers=scan_layers,
                         max_segments=max_segments)
    tensors = SafetensorsDir(path)
    try:
        return P.create_from_arrays(make, mesh, load_hf_params_fetch(tensors), what=str(path))
    finally:
        tensors.close()


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_specs(flat: dict[str, Any], dtype) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{HF name: (shape, dtype)} of the tensors `hf_tensors(flat, dtype)` yields, in the same order."""
    specs = {}
    for name in P.canonical(flat):
        key, transpose = hf_key(name)
        shape = tuple(flat[name].shape)
        specs[key] = (tuple(reversed(shape)) if transpose else shape, np.dtype(dtype))
    return specs


def hf_tensors(flat: dict[str, Any], dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) per parameter, gathered to this host one tensor at a time."""
    for name in P.canonical(flat):  # layers in numeric order, so each shard holds consecutive layers
        key, transpose = hf_key(name)
        x = to_host(flat[name])
        yield key, np.ascontiguousarray((x.T if transpose else x).astype(dtype))


def write_hf_dir(out: str | os.PathLike, specs: dict, tensors: Iterator[tuple[str, np.ndarray]], hf_config: dict,
                 tokenizer_dir: str | os.PathLike | None = None, dtype_name: str = "float32",
                 max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Writes a HF directory atomically: safetensors shards (+ index) streamed tensor by tensor in `specs`
    order, config.json, generation_config.json, the tokenizer files."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer = SafetensorsWriter(tmp, specs, max_shard_bytes)
    try:
        for key, x in tensors:
            writer.write(key, x)
        writer.close()
        if tokenizer_dir:
            checkpoint.copy_tokenizer_files(tokenizer_dir, tmp)
        config = dict(hf_config, dtype=dtype_name)
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if not (tmp / "generation_config.json").exists():
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        checkpoint.replace_dir(tmp, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_hf(model_or_flat, hf_config: dict, out: str | os.PathLike, *, dtype: str = "float32",
            tokenizer_dir=None, max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Exports parameters (a module or a flat dict) as a HF checkpoint that transformers loads."""
    flat = model_or_flat if isinstance(model_or_flat, dict) else P.flatten(model_or_flat)
    np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
    if jax.process_index() != 0:  # every process must still take part in gathering sharded tensors
        for _ in hf_tensors(flat, np_dtype):
            pass
        return Path(out)
    return write_hf_dir(out, hf_specs(flat, np_dtype), hf_tensors(flat, np_dtype), hf_config, tokenizer_dir, dtype,
                        max_shard_bytes, overwrite)


# ------------------------------------------------------------------------------------- whole checkpoints


def hf_to_orbax(hf_dir, out, overwrite: bool = False) -> Path:
    """A HF directory as a merit_jax checkpoint; tensors keep their stored dtype (a bf16 release stays bf16)."""
    hf_config = read_hf_config(hf_dir)
    stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
    dtype = stored if stored in ("bfloat16", "float16") else "float32"
    model = load_hf(hf_dir, dtype)
    return checkpoint.save(out, P.flatten(model), hf_config, tokenizer_dir=hf_dir, overwrite=overwrite)


def orbax_to_hf(ckpt, out, dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES,
                overwrite: bool = False) -> Path:
    """A merit_jax checkpoint as a HF directory of `dtype` tensors, with the checkpoint's tokenizer files."""
    flat = checkpoint.load(ckpt)
    return save_hf(flat, checkpoint.read_hf_config(ckpt), out, dtype=dtype, tokenizer_dir=ckpt,
                   max_shard_bytes=max_shard_bytes, overwrite=overwrite)
