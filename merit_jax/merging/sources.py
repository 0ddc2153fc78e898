"""The merge's inputs: open a checkpoint of either kind, check that the inputs belong together, and the stage's
inputs (branch weights from split/partition.json, θ⁰).

An input is a merit_jax checkpoint (merit_jax/io/checkpoint.py, read through Orbax) or a Hugging Face directory
(config.json + *.safetensors, read through merit_jax/io/safetensors.py). `open_source` gives either as a
"source": `.kind` ('merit_jax' | 'hf'), `.path`, `.hf_config`, `.specs` {name: (shape, dtype)} and
`.read(pieces)`, where a piece is (tensor name, first row, end row) along axis 0.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from merit_jax.io import checkpoint
from merit_jax.errors import InputFileError
from merit_jax.io import safetensors as st
from merit_jax.merging.ops import RELATIVE_METHODS

# Config keys that may differ between checkpoints of the same model (bookkeeping, not architecture).
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                                 "use_cache"})

Piece = tuple[str, int, int]  # (tensor name, first row, end row) along axis 0; (name, 0, 0) for 0-d tensors


class MergeInputError(InputFileError):
    """The inputs cannot be merged (missing, unreadable, or not belonging together)."""


# ================================================================================================ sources


class HFSource:
    """A Hugging Face directory: config.json + *.safetensors (one file, or shards with an index)."""

    kind = "hf"

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.hf_config = read_json(path / "config.json")
        try:
            self._tensors = st.SafetensorsDir(path)
        except st.UnreadableSafetensors as e:
            raise MergeInputError(f"{e.path} is not a readable safetensors file: {e.problem}") from e
        except st.MissingShard as e:
            raise MergeInputError(f"{path}: shard {e.fname} named in the index is missing") from e
        except (InputFileError, FileNotFoundError) as e:
            raise MergeInputError(str(e)) from e
        self.specs = self._tensors.specs  # in the order the tensors lie on disk, read sequentially

    def read(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        return [self._tensors.read_rows(name, start, stop) for name, start, stop in pieces]

    def close(self) -> None:
        self._tensors.close()


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


def read_json(path: pathlib.Path) -> dict:
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


# ============================================================================================= validation


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


# ========================================================================================= stage inputs


def branch_weights(method: str, explicit: Sequence[float], partition: Mapping, path: pathlib.Path) -> list | None:
    """The weights the merge stage passes for `method`: none for uniform; the configured ones (merge.weights)
    for 'weights' and, when given, for the relative methods; else the branches' token counts from the split's
    partition (read from `path`)."""
    if method == "uniform":
        return None
    if method == "weights" or (method in RELATIVE_METHODS and explicit):
        return list(explicit)
    weights = partition.get("tokens") or partition.get("weights")
    if not weights:
        raise MergeInputError(f"{path} has neither tokens nor weights")
    return weights


def check_base(method: str, base: str | os.PathLike) -> None:
    """θ⁰ of the merge stage's relative methods must be a merit_jax checkpoint."""
    if not checkpoint.is_checkpoint(base):
        raise MergeInputError(
            f"method {method!r} needs θ⁰ as a merit_jax checkpoint: {base} is not one "
            f"({checkpoint.checkpoint_problem(base)}); set merge.base (python -m merit_jax.convert hf-to-orbax)")
