"""Stage 4: the one-shot merge θ̄ = Σ_k w_k θ_k, soups, and the merge operators relative to θ⁰.

    python -m merit_jax.merge --ckpt DIR --ckpt DIR [...] [--weights W1,W2,...] --out DIR
        [--method tokens|uniform|weights|task_arithmetic|ties|dare] [--base DIR] [--dtype bfloat16|float16|float32]

Inputs are merit_jax checkpoints (merit_jax/checkpoint.py) or Hugging Face directories (config.json +
*.safetensors, single file or sharded with model.safetensors.index.json); the output is the same kind.

Layout of this module:
  * the merge math, pure functions on arrays: `resolve_weights`, `merge_tensors` (+ `ties_trim`, `dare_drop`);
  * readers (`open_source`) and writers for both formats, validation (`validate_sources`);
  * the streaming driver `merge_checkpoints`, the pipeline stage `run(cfg, workdir)` and the CLI `main`.

Memory: tensors are read piece by piece (HF: row blocks of at most `chunk_bytes`; Orbax: whole tensors, small
ones grouped up to `chunk_bytes`), accumulated in float32 one input at a time, and written out. The working
set is a few pieces whatever K is. An HF output is streamed straight into its safetensors files; a merit_jax
output is streamed group by group into a `checkpoint.Writer` (one Orbax partial save per group), so neither
ever holds the merged model.

Several processes (jax.distributed): every process runs the same merge; each reads, merges and writes only
the shards it owns (`fsdp_placement`), process 0 writes the json files, and the output is renamed into place
after a barrier (see `_process_split`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from merit_jax import checkpoint
from merit_jax.errors import InputFileError
from merit_jax import workdir as wd

logger = logging.getLogger(__name__)

LINEAR_METHODS = ("tokens", "uniform", "weights")
RELATIVE_METHODS = ("task_arithmetic", "ties", "dare")  # need θ⁰ (--base)
METHODS = LINEAR_METHODS + RELATIVE_METHODS

DEFAULT_CHUNK_BYTES = 64 << 20
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"
MAX_WRITES = 16  # merit_jax output: about this many Orbax partial saves (see _write_merit_jax)
MERGE_INFO_FILE = "merit_merge.json"

# Config keys that may differ between checkpoints of the same model (bookkeeping, not architecture).
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                                 "use_cache"})


class MergeInputError(InputFileError):
    """The inputs cannot be merged (missing, unreadable, or not belonging together)."""


# ============================================================================================ the math


def resolve_weights(method: str, num_inputs: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """The normalised merge weights w (float64 [K], Σ w = 1) of a method.

    tokens: `weights` are the supervised token counts n_k; w_k = n_k / Σ n_j.
    uniform: w_k = 1/K (`weights` must be None).
    weights and the relative methods: explicit weights, normalised (a warning if they did not sum to 1);
      the relative methods default to uniform when none are given.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if num_inputs < 1:
        raise ValueError("nothing to merge: no inputs")
    if method == "uniform":
        if weights is not None and len(weights):
            raise ValueError("method 'uniform' takes no weights; use method 'weights' for explicit ones")
        return np.full(num_inputs, 1.0 / num_inputs)
    if weights is None or not len(weights):
        if method in RELATIVE_METHODS:
            return np.full(num_inputs, 1.0 / num_inputs)
        what = "token counts" if method == "tokens" else "weights"
        raise ValueError(f"method {method!r} needs {what} for the {num_inputs} inputs")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != num_inputs:
        raise ValueError(f"{w.shape[0]} weights given for {num_inputs} inputs")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights sum to {total}; at least one must be positive")
    if method != "tokens" and abs(total - 1.0) > 1e-6:
        logger.warning("merge weights %s sum to %.6g, not 1: normalising them", w.tolist(), total)
    return w / total


def _f32(x):
    """x as float32, numpy or jax alike (no copy when it already is)."""
    return x if x.dtype == np.float32 else x.astype(np.float32)


def ties_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Keeps the ceil(density · n) entries of largest magnitude of `tau` (exactly that many), zeroes the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    flat = np.ravel(tau)
    n = flat.size
    keep = min(n, int(math.ceil(density * n)))
    if keep >= n:
        return np.array(tau, copy=True)
    idx = np.argpartition(np.abs(flat), n - keep)[n - keep:]
    out = np.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(np.shape(tau))


def dare_drop(tau: np.ndarray, drop_p: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: zeroes each entry with probability `drop_p` and rescales the survivors by 1 / (1 − drop_p)."""
    if not 0.0 <= drop_p < 1.0:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {drop_p}")
    keep = rng.random(np.shape(tau)) >= drop_p
    return np.where(keep, tau * np.float32(1.0 / (1.0 - drop_p)), np.float32(0.0)).astype(np.float32)


def _dare_rng(seed: int | Sequence[int], k: int) -> np.random.Generator:
    seed = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    return np.random.default_rng([*seed, k])


def merge_tensors(
    tensors_k: Sequence[Any],
    weights: Sequence[float] | None,
    method: str = "weights",
    base: Any = None,
    *,
    lam: float = 1.0,
    density: float = 0.2,
    drop_p: float = 0.9,
    seed: int | Sequence[int] = 0,
) -> Any:
    """Merges the K versions of one tensor; returns float32 (numpy, or jax for jax inputs on linear methods).

    tensors_k: K arrays of one shape (any float dtype). A lazy sequence works too: it is indexed k = 0..K−1
      once per pass (one pass for the linear methods and DARE, two for TIES), so at most a few tensors are
      alive at a time whatever K is.
    weights: as `resolve_weights(method, K, weights)` takes them (token counts for "tokens").
    base: θ⁰'s version of the tensor, needed by the relative methods, with τ_k = θ_k − θ⁰:
      task_arithmetic: θ⁰ + lam · Σ_k w_k τ_k
      ties: trim each τ_k to its top `density` fraction by magnitude, elect the sign γ = sign(Σ_k w_k τ̂_k),
            θ⁰ + lam · Σ_{k: sign τ̂_k = γ} w_k τ̂_k / Σ_{k: sign τ̂_k = γ} w_k   (0 where no k agrees)
      dare: θ⁰ + lam · Σ_k w_k · dare_drop(τ_k, drop_p), drop masks from numpy Generator([*seed, k])
    The linear methods (tokens, uniform, weights) give Σ_k w_k θ_k.
    """
    num = len(tensors_k)
    w = resolve_weights(method, num, weights)
    if method in RELATIVE_METHODS and base is None:
        raise ValueError(f"method {method!r} is relative to θ⁰: pass base")

    if method in LINEAR_METHODS or method == "task_arithmetic":
        coefs, base_coef = linear_coefficients(method, w, lam)
        acc = None
        for k in range(num):
            if coefs[k] != 0.0:
                acc = _axpy_into(acc, coefs[k], tensors_k[k])
        if base_coef != 0.0:
            acc = _axpy_into(acc, base_coef, base)
        return acc

    base32 = _f32(np.asarray(base))
    if method == "dare":
        acc = np.zeros(base32.shape, np.float32)
        for k in range(num):
            tau = _f32(np.asarray(tensors_k[k])) - base32
            acc += np.float32(w[k]) * dare_drop(tau, drop_p, _dare_rng(seed, k))
        return base32 + np.float32(lam) * acc

    # TIES: pass 1 elects the sign from the trimmed mass, pass 2 averages the agreeing entries.
    mass = np.zeros(base32.shape, np.float32)
    for k in range(num):
        mass += np.float32(w[k]) * ties_trim(_f32(np.asarray(tensors_k[k])) - base32, density)
    sign = np.sign(mass)
    total = np.zeros(base32.shape, np.float32)
    weight_sum = np.zeros(base32.shape, np.float32)
    for k in range(num):
        trimmed = ties_trim(_f32(np.asarray(tensors_k[k])) - base32, density)
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        total += np.where(agree, np.float32(w[k]) * trimmed, np.float32(0.0))
        weight_sum += np.where(agree, np.float32(w[k]), np.float32(0.0))
    tau = np.divide(total, weight_sum, out=np.zeros_like(total), where=weight_sum > 0)
    return base32 + np.float32(lam) * tau


def linear_coefficients(method: str, weights: np.ndarray, lam: float = 1.0) -> tuple[np.ndarray, float]:
    """(c_k for the inputs, c for θ⁰) such that the merge is Σ_k c_k θ_k + c θ⁰ (linear methods only).

    task_arithmetic: θ⁰ + lam Σ w_k (θ_k − θ⁰) = Σ (lam w_k) θ_k + (1 − lam) θ⁰ since Σ w = 1.
    """
    if method in LINEAR_METHODS:
        return np.asarray(weights, np.float64), 0.0
    if method == "task_arithmetic":
        return lam * np.asarray(weights, np.float64), 1.0 - lam
    raise ValueError(f"method {method!r} is not linear")


# ===================================================================================== formats: reading

_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}

DTYPES = {
    "float32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "fp16": np.dtype(np.float16),
}


def parse_dtype(name: str | None) -> np.dtype | None:
    """'' / None → None (keep the inputs'), else one of DTYPES."""
    if not name:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)


Piece = tuple[str, int, int]  # (tensor name, first row, end row) along axis 0; (name, 0, 0) for 0-d tensors


class SafetensorsFile:
    """One .safetensors file read with plain positioned reads (no memory map).

    A memory map would be simpler, but every page it touches counts as resident memory of the process until
    the mapping goes, so merging K mapped models would look (and, under memory limits, be) K models large.
    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, data.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            self._file = open(path, "rb", buffering=0)
        except OSError as e:
            raise MergeInputError(f"{path} is unreadable: {e}") from e
        size = os.fstat(self._file.fileno()).st_size
        try:
            head = self._read_at(0, 8)
            header_len = int.from_bytes(bytes(head), "little")
            if not 0 < header_len <= min(size - 8, 1 << 28):
                raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
            header = json.loads(bytes(self._read_at(8, header_len)))
            if not isinstance(header, dict):
                raise ValueError("the header is not a json object")
        except (ValueError, OSError) as e:
            raise MergeInputError(f"{path} is not a readable safetensors file: {e}") from e
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[tuple[int, ...], np.dtype, int]] = {}  # name -> (shape, dtype, offset)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                st_dtype, (begin, end) = entry["dtype"], entry["data_offsets"]
                shape = tuple(int(s) for s in entry["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise MergeInputError(f"{path}: malformed header entry for tensor {name!r}: {entry!r}") from e
            if st_dtype not in _ST_TO_NP:
                raise MergeInputError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}")
            dtype = _ST_TO_NP[st_dtype]
            if end - begin != _nbytes(shape, dtype) or self.data_start + end > size or begin < 0:
                raise MergeInputError(f"{path}: tensor {name!r} has data_offsets {[begin, end]} that do not fit "
                                      f"its shape {list(shape)} {st_dtype} or the file ({size} bytes)")
            self.entries[name] = (shape, dtype, self.data_start + begin)

    def _read_at(self, offset: int, count: int) -> np.ndarray:
        # os.preadv: positioned, so several threads may read one file at once
        buf = np.empty(count, np.uint8)
        view = memoryview(buf)
        got = 0
        while got < count:
            n = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if not n:
                raise OSError(f"{self.path}: unexpected end of file at byte {offset + got}")
            got += n
        return buf

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 of tensor `name` (the whole tensor for 0-d ones)."""
        shape, dtype, offset = self.entries[name]
        if not shape:
            return self._read_at(offset, dtype.itemsize).view(dtype).reshape(())
        row_bytes = _nbytes(shape[1:], dtype)
        raw = self._read_at(offset + start * row_bytes, (stop - start) * row_bytes)
        return raw.view(dtype).reshape((stop - start, *shape[1:]))

    def close(self) -> None:
        self._file.close()


class HFSource:
    """A Hugging Face directory: config.json + *.safetensors (one file, or shards with an index)."""

    kind = "hf"

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.hf_config = _read_json(path / "config.json")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MergeInputError(f"{index} has no weight_map")
            files = list(dict.fromkeys(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            weight_map = None
        if not files:
            hint = " (only pytorch .bin weights? convert them to safetensors)" if any(path.glob("*.bin")) else ""
            raise MergeInputError(f"{path} has no *.safetensors files{hint}")
        self._files: dict[str, SafetensorsFile] = {}
        self._file_of: dict[str, str] = {}
        self.specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for fname in files:
            fpath = path / fname
            if not fpath.is_file():
                self.close()
                raise MergeInputError(f"{path}: shard {fname} named in the index is missing")
            handle = SafetensorsFile(fpath)
            self._files[fname] = handle
            # file order, then offset order: the order the tensors lie on disk, read sequentially
            for name, (shape, dtype, _) in sorted(handle.entries.items(), key=lambda item: item[1][2]):
                if name in self._file_of:
                    self.close()
                    raise MergeInputError(f"{path}: tensor {name!r} is stored twice ({self._file_of[name]}, {fname})")
                self._file_of[name] = fname
                self.specs[name] = (shape, dtype)
        if weight_map is not None:
            missing = [n for n, f in weight_map.items() if self._file_of.get(n) != f]
            if missing:
                self.close()
                raise MergeInputError(f"{index}: tensor {missing[0]!r} is not in {weight_map[missing[0]]}")

    def read(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        return [self._files[self._file_of[name]].read_rows(name, start, stop) for name, start, stop in pieces]

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


class OrbaxSource:
    """A merit_jax checkpoint; each read is one partial Orbax restore of whole tensors."""

    kind = "merit_jax"

    def __init__(self, path: pathlib.Path, placement: Callable[[str, tuple], Any] | None = None):
        self.path = path
        self._reader = checkpoint.Reader(path)
        self.hf_config = self._reader.hf_config
        self.specs = self._reader.specs
        self.placement = placement

    def read(self, pieces: Sequence[Piece]) -> list[Any]:
        names = [name for name, _, _ in pieces]
        shardings = None
        if self.placement is not None:
            shardings = {n: self.placement(n, self.specs[n][0]) for n in names}
        arrays = self._reader.read(names, shardings)
        return [arrays[n] for n in names]

    def close(self) -> None:
        self._reader.close()


def _read_json(path: pathlib.Path) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise MergeInputError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise MergeInputError(f"{path} is unreadable: {e}") from e
    if not isinstance(obj, dict):
        raise MergeInputError(f"{path} does not hold a json object")
    return obj


def detect_kind(path: str | os.PathLike) -> str:
    """'merit_jax' or 'hf'; MergeInputError naming the path and what is missing otherwise."""
    path = pathlib.Path(path)
    if not path.exists():
        raise MergeInputError(f"input {path} does not exist")
    if not path.is_dir():
        raise MergeInputError(f"input {path} is not a directory")
    problem = checkpoint.checkpoint_problem(path)
    if problem is None:
        return "merit_jax"
    if (path / checkpoint.MARKER_FILE).exists():
        raise MergeInputError(f"input {path}: {problem}")
    if (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))
    ):
        return "hf"
    raise MergeInputError(
        f"input {path} is neither a merit_jax checkpoint ({checkpoint.MARKER_FILE} missing) nor a Hugging Face "
        "directory (config.json and *.safetensors)"
    )


def open_source(path: str | os.PathLike, placement: Callable[[str, tuple], Any] | None = None):
    """An HFSource or OrbaxSource for `path`, with `.kind`, `.path`, `.hf_config`, `.specs`, `.read(pieces)`."""
    path = pathlib.Path(path)
    kind = detect_kind(path)
    try:
        return OrbaxSource(path, placement) if kind == "merit_jax" else HFSource(path)
    except MergeInputError:
        raise
    except Exception as e:
        raise MergeInputError(f"input {path} is unreadable: {type(e).__name__}: {e}") from e


# ================================================================================== validation


def _first_config_difference(a: Mapping, b: Mapping, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        if not prefix and key in IGNORED_CONFIG_KEYS:
            continue
        where = f"{prefix}{key}"
        if key not in a or key not in b:
            return f"{where} (only in {'the first' if key in a else 'this input'})"
        va, vb = a[key], b[key]
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            inner = _first_config_difference(va, vb, where + ".")
            if inner:
                return inner
        elif va != vb:
            return f"{where} ({va!r} vs {vb!r})"
    return None


def compare_sources(first, other, *, check_dtypes: bool = True) -> str | None:
    """The first way `other` does not belong with `first` (names, shapes, dtypes, config), or None."""
    if other.kind != first.kind:
        return f"it is a {other.kind} checkpoint but {first.path} is {first.kind}: convert one of them first"
    missing = [n for n in first.specs if n not in other.specs]
    if missing:
        return f"tensor {missing[0]!r} of {first.path} is missing ({len(missing)} missing in all)"
    extra = [n for n in other.specs if n not in first.specs]
    if extra:
        return f"it has tensor {extra[0]!r} that {first.path} lacks ({len(extra)} extra in all)"
    for name, (shape, dtype) in first.specs.items():
        oshape, odtype = other.specs[name]
        if oshape != shape:
            return f"tensor {name!r} has shape {oshape}, {first.path} has {shape}"
        if check_dtypes and odtype != dtype:
            return f"tensor {name!r} has dtype {odtype}, {first.path} has {dtype}"
    diff = _first_config_difference(first.hf_config, other.hf_config)
    if diff:
        return f"its config.json differs from {first.path}'s at key {diff}"
    return None


def validate_sources(sources: Sequence[Any], base: Any = None) -> None:
    """Raises MergeInputError naming the first input (and what) that does not match the first one."""
    for source in sources[1:]:
        problem = compare_sources(sources[0], source)
        if problem:
            raise MergeInputError(f"input {source.path} does not match {sources[0].path}: {problem}")
    if base is not None:
        problem = compare_sources(sources[0], base, check_dtypes=False)  # θ⁰ may be stored in another dtype
        if problem:
            raise MergeInputError(f"base {base.path} does not match {sources[0].path}: {problem}")


# ================================================================================== formats: writing


class SafetensorsStreamWriter:
    """Writes Hugging Face safetensors shards tensor piece by tensor piece, never holding a whole tensor.

    The header (names, dtypes, shapes, offsets) is known in advance from the input specs, so each shard's
    header is written first and the tensor bytes are appended in order as they are produced.
    """

    def __init__(self, out_dir: pathlib.Path, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = out_dir
        self.shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in specs.items():
            nbytes = _nbytes(shape, dtype)
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(name)
            size += nbytes
        n = len(self.shards)
        self.file_names = (["model.safetensors"] if n == 1 else
                           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.specs = dict(specs)
        self.total_size = sum(_nbytes(*spec) for spec in specs.values())
        self._order = [name for shard in self.shards for name in shard]
        self._shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._file = None
        self._shard = -1

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._close_file()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in self.shards[i]:
            shape, dtype = self.specs[name]
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": _NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as the safetensors library writes it
        self._file = open(self.out_dir / self.file_names[i], "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._shard = i

    def _close_file(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def write(self, name: str, piece: np.ndarray) -> None:
        """Appends the next rows of tensor `name`; tensors and rows must come in the planned order."""
        if self._pos >= len(self._order) or name != self._order[self._pos]:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing"
            raise RuntimeError(f"safetensors writer expected {expected!r}, got {name!r}")
        shape, dtype = self.specs[name]
        if piece.dtype != dtype:
            raise RuntimeError(f"tensor {name!r}: piece dtype {piece.dtype} != planned {dtype}")
        if self._shard != self._shard_of[name]:
            self._open_shard(self._shard_of[name])
        data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        self._file.write(memoryview(data))
        self._written += data.size
        total = _nbytes(shape, dtype)
        if self._written > total:
            raise RuntimeError(f"tensor {name!r}: {self._written} bytes written, {total} planned")
        if self._written == total:
            self._pos += 1
            self._written = 0

    def close(self) -> None:
        """Finishes the last shard and writes the index (when sharded); checks every tensor was written."""
        if self._pos != len(self._order):
            raise RuntimeError(f"safetensors writer closed before tensor {self._order[self._pos]!r} was written")
        if self._file is not None:
            self._close_file()
        if len(self.file_names) > 1:
            weight_map = {name: self.file_names[i] for i, shard in enumerate(self.shards) for name in shard}
            checkpoint.write_json_atomic(self.out_dir / "model.safetensors.index.json",
                                         {"metadata": {"total_size": self.total_size}, "weight_map": weight_map})

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# ================================================================================== streaming driver


def plan_pieces(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], chunk_bytes: int,
                split_rows: bool) -> Iterator[list[Piece]]:
    """Groups of pieces in `specs` order, each about `chunk_bytes` of float32 at most.

    split_rows: cut large tensors into row blocks (HF inputs, linear methods); otherwise a large tensor is one
    group of its own and small whole tensors are grouped together.
    """
    group: list[Piece] = []
    size = 0
    for name, (shape, _) in specs.items():
        rows = shape[0] if shape else 0
        nbytes = _nbytes(shape, np.float32)
        if split_rows and rows > 1 and nbytes > chunk_bytes:
            if group:
                yield group
                group, size = [], 0
            row_bytes = max(1, nbytes // rows)
            step = max(1, chunk_bytes // row_bytes)
            for start in range(0, rows, step):
                yield [(name, start, min(rows, start + step))]
            continue
        if group and size + nbytes > chunk_bytes:
            yield group
            group, size = [], 0
        group.append((name, 0, rows))
        size += nbytes
    if group:
        yield group


_AXPY_BLOCK_BYTES = 16 << 20  # float32 bytes of the product computed at a time


def _axpy_into(acc, c: float, x):
    """acc + c·x in float32; for numpy in place, the product taken in row blocks of _AXPY_BLOCK_BYTES.

    The blocks keep the temporary c·x small: a whole-tensor product would cost as much memory as the
    accumulator itself (the largest term of the merge's peak for a big embedding).
    """
    if acc is None:
        if isinstance(x, np.ndarray):
            return np.multiply(x, np.float32(c), dtype=np.float32)
        return np.float32(c) * _f32(x)
    if isinstance(acc, np.ndarray) and isinstance(x, np.ndarray) and acc.ndim:
        rows = acc.shape[0]
        step = max(1, _AXPY_BLOCK_BYTES // max(1, acc[:1].nbytes))
        tmp = np.empty((min(step, rows), *acc.shape[1:]), np.float32)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = tmp[: stop - start]
            np.multiply(x[start:stop], np.float32(c), out=block, dtype=np.float32)
            acc[start:stop] += block
        return acc
    return acc + np.float32(c) * _f32(x)


class _LazyTensors:
    """The K versions of one tensor, read on demand (what keeps merge_tensors' memory independent of K)."""

    def __init__(self, sources: Sequence[Any], piece: Piece):
        self.sources, self.piece = sources, piece

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, k: int):
        return self.sources[k].read([self.piece])[0]


def _reads(sources, group, prefetch_bytes: int) -> Iterator[list]:
    """source.read(group) for each source in turn.

    When the group's stored bytes are at most `prefetch_bytes`, the next source's read runs in a thread while
    the caller adds up the current one (reading a merit_jax checkpoint is mostly waiting for zstd in Orbax's
    threads): one read at a time, two groups of inputs in memory. Big groups (one large tensor) are read
    strictly one after the other, so that the peak stays one input tensor.
    """
    nbytes = sum(_nbytes(*sources[0].specs[name]) for name, _, _ in group)
    if len(sources) < 2 or nbytes > prefetch_bytes:
        for source in sources:
            yield source.read(group)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="merge-read") as pool:
        future = pool.submit(sources[0].read, group)
        for following in sources[1:]:
            arrays = future.result()
            future = pool.submit(following.read, group)
            yield arrays
            del arrays
        yield future.result()


def _merge_group(group, sources, base, method, weights, out_dtypes, opts) -> list[Any]:
    """The merged pieces of one group, cast to their output dtypes."""
    floats = [is_float(sources[0].specs[name][1]) for name, _, _ in group]
    if method in LINEAR_METHODS or method == "task_arithmetic":
        coefs, base_coef = linear_coefficients(method, weights, opts["lam"])
        terms = [(src, c) for src, c in zip(sources, coefs) if c != 0.0]
        if base is not None and base_coef != 0.0:
            terms.append((base, base_coef))
        accs = [None] * len(group)
        for (_, c), arrays in zip(terms, _reads([src for src, _ in terms], group, opts.get("prefetch_bytes", 0))):
            for i in range(len(arrays)):
                if floats[i]:
                    accs[i] = _axpy_into(accs[i], c, arrays[i])
                    arrays[i] = None  # each input tensor freed as soon as it is added
            del arrays
        if not terms:  # all weights 0 cannot happen (resolve_weights), kept for safety
            raise RuntimeError("no input has a non-zero weight")
    else:
        accs = [None] * len(group)
        for i, piece in enumerate(group):
            if floats[i]:
                accs[i] = merge_tensors(_LazyTensors(sources, piece), weights, method,
                                        base=base.read([piece])[0], lam=opts["lam"], density=opts["density"],
                                        drop_p=opts["drop_p"], seed=(opts["seed"], zlib.crc32(piece[0].encode())))
    if not all(floats):
        # Integer / bool tensors (counters, masks) are not averaged: the first input's value is kept.
        firsts = sources[0].read([p for p, f in zip(group, floats) if not f])
        it = iter(firsts)
        accs = [a if f else next(it) for a, f in zip(accs, floats)]
    merged = []
    for i, (name, _, _) in enumerate(group):
        a, accs[i] = accs[i], None  # each float32 accumulator freed once cast
        if isinstance(a, np.generic):  # numpy turns 0-d results into scalars
            a = np.asarray(a)
        merged.append(a.astype(out_dtypes[name]) if a.dtype != out_dtypes[name] else a)
        del a
    return merged


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    base: str | os.PathLike | None = None,
    dtype: str | None = None,
    lam: float = 1.0,
    density: float = 0.2,
    drop_p: float = 0.9,
    seed: int = 0,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    placement: Callable[[str, tuple], Any] | None = None,
    info: Mapping[str, Any] | None = None,
    workers: int | None = None,
) -> pathlib.Path:
    """Merges checkpoints into `out` (same kind as the inputs), streaming; returns `out`.

    Everything is validated before anything is written; the output appears under its final name only when
    complete. method / weights / base / lam / density / drop_p / seed: see `merge_tensors`. dtype: output
    dtype of the floating tensors ('' or None keeps the inputs'). placement: for merit_jax inputs, a function
    (name, shape) -> jax Sharding to read and merge tensors in device shards (each process then handles the
    shards it owns; linear methods only). On several processes (jax.distributed) every process calls this
    with the same arguments and the work is split between them: see `_process_split` (the default placement
    is `fsdp_placement()`). info: extra fields for the merit_merge.json record. workers: groups merged at
    once in threads (default: up to 4 for HF inputs, by CPU count; 1 for merit_jax inputs).
    """
    inputs = [pathlib.Path(p) for p in inputs]
    out = pathlib.Path(out).absolute()
    if not inputs:
        raise MergeInputError("nothing to merge: no inputs")
    w = resolve_weights(method, len(inputs), weights)
    if method in RELATIVE_METHODS and base is None:
        raise MergeInputError(f"method {method!r} merges relative to θ⁰: give the base checkpoint (--base)")
    if method not in RELATIVE_METHODS and base is not None:
        logger.warning("method %r does not use the base checkpoint %s", method, base)
        base = None
    if placement is not None and method not in ("tokens", "uniform", "weights", "task_arithmetic"):
        raise ValueError(f"placement (sharded merging) supports the linear methods only, not {method!r}")
    out_dtype = parse_dtype(dtype)
    for p in inputs + ([pathlib.Path(base)] if base else []):
        if p.absolute() == out or out in p.absolute().parents:
            raise MergeInputError(f"output {out} would overwrite the input {p}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")

    placement, out_placement = _process_split(detect_kind(inputs[0]), method, placement)
    sources = [open_source(p, placement) for p in inputs]
    base_source = open_source(base, placement) if base is not None else None
    try:
        validate_sources(sources, base_source)
        first = sources[0]
        out_dtypes = {name: (out_dtype if out_dtype is not None and is_float(dt) else dt)
                      for name, (_, dt) in first.specs.items()}
        record = {
            "method": method, "inputs": [str(p.absolute()) for p in inputs], "weights": w.tolist(),
            "base": str(pathlib.Path(base).absolute()) if base else None,
            "dtype": str(out_dtype) if out_dtype is not None else "inputs'",
            "options": {"lam": lam, "density": density, "drop_p": drop_p, "seed": seed}
            if method in RELATIVE_METHODS else {},
            **dict(info or {}),
        }
        opts = {"lam": lam, "density": density, "drop_p": drop_p, "seed": seed,
                # merit_jax inputs on the host: read the next input of a group while adding up this one
                "prefetch_bytes": chunk_bytes if first.kind == "merit_jax" and placement is None else 0}
        split_rows = first.kind == "hf" and (method in LINEAR_METHODS or method == "task_arithmetic")
        groups = list(plan_pieces(first.specs, chunk_bytes, split_rows))
        config = _output_config(first.hf_config, out_dtype)
        logger.info("merging %d %s checkpoints (%s, weights %s) into %s", len(sources), first.kind, method,
                    np.round(w, 6).tolist(), out)
        start = time.perf_counter()
        if first.kind == "hf":
            _write_hf(out, first, sources, base_source, groups, method, w, out_dtypes, opts, config, record,
                      max_shard_bytes, overwrite, workers or _default_workers(first.kind))
        else:
            _write_merit_jax(out, first, sources, base_source, groups, method, w, out_dtypes, opts, config,
                             record, overwrite, workers or _default_workers(first.kind), out_placement)
        logger.info("merged into %s in %.1f s", out, time.perf_counter() - start)
    finally:
        for s in sources + ([base_source] if base_source else []):
            s.close()
    return out


def _process_split(kind: str, method: str, placement):
    """(placement for reading and merging, placement for writing) given the number of processes.

    One process: as given. Several (jax.distributed): each process must handle only its part. The linear
    methods read, merge and write the shards each process owns (`fsdp_placement` unless a placement is given);
    TIES and DARE need whole tensors (a per-tensor top-k, reproducible per-tensor masks), so every process
    merges each tensor whole and writes only its shards of the result.
    """
    if kind != "merit_jax":
        jax = sys.modules.get("jax")  # not imported for an HF merge unless the caller did
        if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
            raise ValueError("Hugging Face merges run in one process; convert the inputs to merit_jax checkpoints "
                             "(python -m merit_jax.convert hf-to-orbax) to merge on several processes")
        return placement, None
    import jax

    if jax.process_count() == 1:
        return placement, None
    if method in LINEAR_METHODS or method == "task_arithmetic":
        return placement or fsdp_placement(), None
    return None, fsdp_placement()


def _output_config(config: Mapping, out_dtype: np.dtype | None) -> dict:
    config = dict(config)
    if out_dtype is not None:
        name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(ml_dtypes.bfloat16): "bfloat16"}[out_dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    return config


def _merged_groups(groups, sources, base, method, w, out_dtypes, opts, workers: int) -> Iterator[tuple[list, list]]:
    """(group, its merged pieces) in plan order; `workers` groups are merged at once in threads.

    numpy's large ufuncs and the file reads release the GIL, so on several cores one group's reading overlaps
    another's arithmetic and the caller's writing. At most workers + 1 groups are in flight (memory bound).
    """
    run_group = lambda group: _merge_group(group, sources, base, method, w, out_dtypes, opts)  # noqa: E731
    groups = _progress(groups)
    if workers <= 1:
        for group in groups:
            yield group, run_group(group)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="merge") as pool:
        pending: deque = deque()
        try:
            for group in groups:
                pending.append((group, pool.submit(run_group, group)))
                if len(pending) > workers:
                    done_group, future = pending.popleft()
                    yield done_group, future.result()
            while pending:
                done_group, future = pending.popleft()
                yield done_group, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _merged_pieces(groups, sources, base, method, w, out_dtypes, opts, workers: int) -> Iterator[tuple[str, Any]]:
    """(name, merged piece) in plan order (see `_merged_groups`)."""
    for group, merged in _merged_groups(groups, sources, base, method, w, out_dtypes, opts, workers):
        yield from zip((name for name, _, _ in group), merged)


def _default_workers(kind: str) -> int:
    # Orbax restores run their own asyncio loop and threads, and `_reads` already overlaps each read with the
    # previous input's arithmetic: merit_jax groups are merged one at a time.
    return 1 if kind != "hf" else max(1, min(4, os.cpu_count() or 1))


def _progress(groups):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is pinned, but the merge does not need it
        return groups
    return tqdm(groups, desc="merge", unit="piece", disable=not sys.stderr.isatty(), leave=False)


def _write_hf(out, first, sources, base, groups, method, w, out_dtypes, opts, config, record,
              max_shard_bytes, overwrite, workers) -> None:
    tmp = out.parent / f".{out.name}.merit_jax-tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed merge: never complete
    tmp.mkdir(parents=True)
    out_specs = {name: (shape, out_dtypes[name]) for name, (shape, _) in first.specs.items()}
    writer = SafetensorsStreamWriter(tmp, out_specs, max_shard_bytes)
    try:
        for name, piece in _merged_pieces(groups, sources, base, method, w, out_dtypes, opts, workers):
            writer.write(name, np.asarray(piece))
        writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if checkpoint.has_tokenizer(first.path):
        checkpoint.copy_tokenizer_files(first.path, tmp)
    checkpoint.write_json_atomic(tmp / MERGE_INFO_FILE, record)
    checkpoint.write_json_atomic(tmp / "config.json", config)  # last: an HF directory "looks complete" with it
    checkpoint._fsync_dir(tmp)
    if out.exists() and not overwrite and any(out.iterdir()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"output {out} appeared while merging; not replacing it")
    checkpoint.replace_dir(tmp, out)


def _write_merit_jax(out, first, sources, base, groups, method, w, out_dtypes, opts, config, record,
                     overwrite, workers, out_placement=None) -> None:
    """Streams the merged groups into a checkpoint.Writer, in batches of whole groups (each one partial save).

    out_placement: on several processes, for tensors merged whole on every process (TIES, DARE): a function
    (name, shape) -> Sharding; each process then writes only the shards of the result it owns.
    """
    tokenizer_dir = first.path if checkpoint.has_tokenizer(first.path) else None
    # Each Writer.write is one Orbax partial save, and each costs more the more came before it (Orbax reads
    # every earlier part's metadata): groups are batched into at most ~MAX_WRITES writes. The batch being
    # filled and the one being written are the only merged tensors in memory (≈ 2/MAX_WRITES of the model).
    out_bytes = sum(_nbytes(shape, out_dtypes[name]) for name, (shape, _) in first.specs.items())
    write_bytes = max(1, out_bytes // MAX_WRITES)
    with checkpoint.Writer(out, config, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                           extra_json={MERGE_INFO_FILE: record}) as writer:
        owned = total = 0
        part, part_bytes = {}, 0
        for group, merged in _merged_groups(groups, sources, base, method, w, out_dtypes, opts, workers):
            for (name, _, _), piece in zip(group, merged):
                if out_placement is not None and isinstance(piece, np.ndarray):
                    piece = _global_array(piece, out_placement(name, piece.shape))
                part[name] = piece
                part_bytes += _nbytes(np.shape(piece), out_dtypes[name])
                mine, size = _owned_elements(piece)
                owned, total = owned + mine, total + size
            del merged, piece
            if part_bytes >= write_bytes:
                writer.write(part)
                part, part_bytes = {}, 0
        writer.write(part)  # the rest (an empty part is nothing)
        del part
        writer.commit()
    import jax

    if jax.process_count() > 1:
        logger.info("process %d of %d merged and wrote %d of the %d elements (the shards it owns)",
                    jax.process_index(), jax.process_count(), owned, total)


def _global_array(x: np.ndarray, sharding) -> Any:
    """The same numpy array on every process -> a jax.Array with `sharding` (each process keeps its shards)."""
    import jax

    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _owned_elements(x) -> tuple[int, int]:
    """(elements this process writes, elements of x): jax.Arrays are written by their replica-0 shards' owners."""
    size = int(np.prod(np.shape(x), dtype=np.int64))
    if not hasattr(x, "addressable_shards"):
        import jax

        return (size if jax.process_index() == 0 else 0), size  # numpy: Orbax writes it from process 0
    return sum(int(np.prod(s.data.shape, dtype=np.int64)) for s in x.addressable_shards if s.replica_id == 0), size


# ================================================================================== pipeline stage


def fsdp_placement(mesh=None) -> Callable[[str, tuple], Any]:
    """Shards each tensor's largest axis divisible by the device count over all devices (else replicates)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = mesh or Mesh(np.array(jax.devices()), ("shard",))
    n = mesh.devices.size
    axis = mesh.axis_names[0]

    def place(name: str, shape: tuple) -> Any:
        dims = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0 and shape[i] >= n]
        spec = [None] * len(shape)
        if dims and len(mesh.axis_names) == 1:
            spec[dims[0]] = axis
        return NamedSharding(mesh, PartitionSpec(*spec))

    return place


def run(cfg, workdir: pathlib.Path) -> pathlib.Path:
    """The `merge` stage: WORKDIR/branches/K/final (K = 0..len(groups)-1) → WORKDIR/merged/.

    Weights: split/partition.json "tokens" for `tokens` and the relative methods (unless merge.weights is
    set), merge.weights for `weights`. θ⁰ for the relative methods: merge.base, else WORKDIR/basin.
    Skipped when WORKDIR/merged is already a complete checkpoint.
    """
    workdir = pathlib.Path(workdir)
    out = workdir / "merged"
    if checkpoint.is_checkpoint(out):
        logger.info("merge: %s is complete, skipping", out)
        return out
    mcfg = cfg.merge
    method = mcfg.get("method", "tokens")
    partition = _read_json(workdir / "split" / "partition.json")
    groups = partition.get("groups")
    if not isinstance(groups, list) or not groups:
        raise MergeInputError(f"{workdir / 'split' / 'partition.json'} has no groups")
    inputs = [workdir / "branches" / str(k) / "final" for k in range(len(groups))]
    explicit = list(mcfg.get("weights", []) or [])
    if method == "uniform":
        weights = None
    elif method == "weights" or (method in RELATIVE_METHODS and explicit):
        weights = explicit
    else:
        weights = partition.get("tokens") or partition.get("weights")
        if not weights:
            raise MergeInputError(f"{workdir / 'split' / 'partition.json'} has neither tokens nor weights")
    base = None
    if method in RELATIVE_METHODS:
        base = mcfg.get("base", "") or wd.theta0(cfg, workdir)
        if not checkpoint.is_checkpoint(base):
            raise MergeInputError(
                f"method {method!r} needs θ⁰ as a merit_jax checkpoint: {base} is not one "
                f"({checkpoint.checkpoint_problem(base)}); set merge.base (python -m merit_jax.convert hf-to-orbax)")
    # On several processes merge_checkpoints splits the work between them (each merges its shards).
    return merge_checkpoints(
        inputs, out, method=method, weights=weights, base=base, dtype=mcfg.get("dtype", "") or None,
        lam=float(mcfg.get("lam", 1.0)), density=float(mcfg.get("density", 0.2)),
        drop_p=float(mcfg.get("drop_p", 0.9)), seed=int(mcfg.get("seed", cfg.get("seed", 0))),
        overwrite=True, info={"groups": groups, "tokens": partition.get("tokens")},
    )


# ============================================================================================== CLI


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix, scale in (("GIB", 1 << 30), ("MIB", 1 << 20), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m merit_jax.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True, metavar="DIR",
                   help="an input checkpoint (merit_jax or Hugging Face); repeat for each input")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (same kind as the inputs)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="default: 'weights' when --weights is given, else 'uniform'")
    p.add_argument("--weights", default="", metavar="W1,W2,...",
                   help="one number per input: weights (normalised) or, for --method tokens, token counts")
    p.add_argument("--base", default=None, metavar="DIR", help="θ⁰, for task_arithmetic / ties / dare")
    p.add_argument("--dtype", default="", help="output dtype: bfloat16 | float16 | float32 (default: the inputs')")
    p.add_argument("--lam", type=float, default=1.0, help="scale λ of the merged task vector (relative methods)")
    p.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    p.add_argument("--drop-p", type=float, default=0.9, help="DARE: drop probability")
    p.add_argument("--seed", type=int, default=0, help="DARE: seed of the drop masks")
    p.add_argument("--max-shard-size", default="5GB", help="HF output: largest safetensors shard, e.g. 2GB")
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / (1 << 20),
                   help="working-set size per piece (MiB of float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every restore at INFO
    try:
        weights = [float(x) for x in args.weights.split(",") if x.strip()] if args.weights else None
    except ValueError:
        print(f"error: --weights must be comma-separated numbers, got {args.weights!r}", file=sys.stderr)
        return 2
    method = args.method or ("weights" if weights else "uniform")
    try:
        if detect_kind(args.ckpt[0]) == "merit_jax":
            # Several processes (MERIT_COORDINATOR / SLURM / TPU, see merit_jax/distributed.py) merge together,
            # each its own shards; a no-op for one process. HF merges never import jax.
            from merit_jax import distributed

            distributed.initialize()
        merge_checkpoints(
            args.ckpt, args.out, method=method, weights=weights, base=args.base, dtype=args.dtype or None,
            lam=args.lam, density=args.density, drop_p=args.drop_p, seed=args.seed, overwrite=args.overwrite,
            chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))), max_shard_bytes=_parse_size(args.max_shard_size),
        )
    except (MergeInputError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
