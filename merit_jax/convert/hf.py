"""Hugging Face checkpoints <-> merit_jax models, tensor by tensor.

Reading: safetensors (one file, or shards with `model.safetensors.index.json`), sliced lazily so that each
device receives only its shard. Writing: sharded safetensors + index, config.json, generation_config.json and
the tokenizer files, into a temporary directory renamed into place when complete.
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
from safetensors import safe_open
from safetensors.numpy import save_file

from merit_jax import checkpoint
from merit_jax.errors import InputFileError, reading
from merit_jax import workdir as wd
from merit_jax.models import params as P
from merit_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


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


class HFTensors:
    """Lazy access to the tensors of a HF directory; `get(name, index)` reads only the slice asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        self._handles: dict[str, Any] = {}
        if index.is_file():
            data = wd.read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputFileError(f"{index}: no weight_map {{tensor name: shard file}}")
            for fname in dict.fromkeys(weight_map.values()):  # every shard there and readable, before any work
                if not (self.path / fname).is_file():
                    tensor = next(k for k, v in weight_map.items() if v == fname)
                    raise InputFileError(f"{self.path / fname}: missing (listed in {INDEX_FILE} for tensor "
                                         f"{tensor!r})")
                self._open(fname)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
            weight_map = {k: f.name for f in files for k in self._open(f.name).keys()}
        self.file_of = weight_map

    def _open(self, fname: str):
        if fname not in self._handles:
            with reading(self.path / fname, "safetensors file"):
                self._handles[fname] = safe_open(self.path / fname, "np")
        return self._handles[fname]

    def _handle(self, key: str):
        return self._open(self.file_of[key])

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str, index: tuple | None = None) -> np.ndarray:
        if key not in self.file_of:
            raise KeyError(f"{self.path}: tensor {key!r} is missing")
        with reading(self.path / self.file_of[key], "safetensors file", f" (tensor {key!r})"):
            sl = self._handle(key).get_slice(key)
            return sl[index] if index is not None else sl[:]


def load_hf_params_fetch(tensors: HFTensors):
    """A `fetch(name, shape, dtype, index)` for `params.create_from_arrays` reading from HF tensors."""

    def fetch(name, shape, dtype, index):
        key, transpose = hf_key(name)
        key = stored_key(key, tensors.file_of)
        if key not in tensors.file_of:
            raise KeyError(f"{tensors.path}: tensor {key!r} (for {name}) is missing")
        hf_shape = tensors.shape(key)
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        if hf_shape != want:
            raise ValueError(f"{tensors.path}: tensor {key!r} has shape {hf_shape}, config.json implies {want}")
        idx = None if index is None else (tuple(reversed(index)) if transpose else index)
        x = tensors.get(key, idx)
        return np.asarray(x.T if transpose else x).astype(dtype)

    return fetch


def build_model(model_type: str, hf_cfg: dict, *, rngs, source="config.json", **policy) -> nnx.Module:
    if model_type == "qwen2_5_vl":
        from merit_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
        return Qwen2_5_VLForConditionalGeneration.from_hf_config(hf_cfg, rngs=rngs, **policy)
    from merit_jax.models.qwen2 import Qwen2ForCausalLM
    return Qwen2ForCausalLM(ModelConfig.from_hf(hf_cfg, source), rngs=rngs, **policy)


def model_factory(hf_cfg: dict, source: str = "config.json", *, dtype="float32", compute_dtype=None,
                  remat="none", attention="xla", scan_layers: bool = False, seed: int = 0):
    """A zero-argument constructor (for `nnx.eval_shape` / sharded creation) of the model a config describes."""
    model_type = hf_cfg.get("model_type")
    if model_type != "qwen2_5_vl":
        ModelConfig.from_hf(hf_cfg, source)  # validate eagerly: a clear error before any tracing
    policy = dict(param_dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(compute_dtype or dtype), remat=remat,
                  attention=attention, scan_layers=scan_layers)
    return lambda: build_model(model_type, hf_cfg, rngs=nnx.Rngs(seed), source=source, **policy)


def load_hf(path: str | os.PathLike, dtype: str = "float32", *, mesh=None, compute_dtype=None, remat="none",
            attention="xla", scan_layers: bool = False) -> nnx.Module:
    """A Flax NNX model with the weights of a local HF directory (each device gets only its shards)."""
    hf_cfg = read_hf_config(path)
    make = model_factory(hf_cfg, f"{path}/config.json", dtype=dtype, compute_dtype=compute_dtype, remat=remat,
                         attention=attention, scan_layers=scan_layers)
    tensors = HFTensors(path)
    model = P.create_from_arrays(make, mesh, load_hf_params_fetch(tensors),
                                 what=str(path))
    return model


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(flat: dict[str, Any], dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) per parameter, gathered to this host one tensor at a time."""
    for name in P.canonical(flat):  # layers in numeric order, so each shard holds consecutive layers
        key, transpose = hf_key(name)
        x = to_host(flat[name])
        yield key, np.ascontiguousarray((x.T if transpose else x).astype(dtype))


def write_hf_dir(out: str | os.PathLike, tensors: Iterator[tuple[str, np.ndarray]], hf_cfg: dict,
                 tokenizer_dir: str | os.PathLike | None = None, dtype_name: str = "float32",
                 max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Writes a HF directory atomically: sharded safetensors + index, config, tokenizer files."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        files, weight_map, total = [], {}, 0
        def flush():
            if shards[-1]:
                fname = f"part-{len(files):05d}.safetensors"
                save_file(shards[-1], tmp / fname, metadata={"format": "pt"})
                files.append(fname)
                for k in shards[-1]:
                    weight_map[k] = fname
                shards[-1] = {}
        for key, x in tensors:
            if size and size + x.nbytes > max_shard_bytes:
                flush()
                size = 0
            shards[-1][key] = x
            size += x.nbytes
            total += x.nbytes
        flush()
        n = len(files)
        renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
                   for i, f in enumerate(files)}
        for f, g in renamed.items():
            os.replace(tmp / f, tmp / g)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[f] for k, f in weight_map.items()}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        if tokenizer_dir:
            checkpoint.copy_tokenizer_files(tokenizer_dir, tmp)
        cfg = dict(hf_cfg, dtype=dtype_name)
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if not (tmp / "generation_config.json").exists():
            gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        checkpoint.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_hf(model_or_flat, hf_cfg: dict, out: str | os.PathLike, *, dtype: str = "float32",
            tokenizer_dir=None, max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Exports parameters (a module or a flat dict) as a HF checkpoint that transformers loads."""
    flat = model_or_flat if isinstance(model_or_flat, dict) else P.flatten(model_or_flat)
    np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
    if jax.process_index() != 0:  # every process must still take part in gathering sharded tensors
        for _ in hf_tensors(flat, np_dtype):
            pass
        return Path(out)
    return write_hf_dir(out, hf_tensors(flat, np_dtype), hf_cfg, tokenizer_dir, dtype, max_shard_bytes, overwrite)
