"""The streaming merge of whole checkpoints: `merge_checkpoints(inputs, out, method=..., ...)`.

Inputs are merit_jax checkpoints or Hugging Face directories (merging/sources.py); the output is the same kind.

Memory: tensors are read piece by piece (HF: row blocks of at most `chunk_bytes`; Orbax: whole tensors, small
ones grouped up to `chunk_bytes`), accumulated in float32 one input at a time (merging/ops.py), and written
out. The working set is a few pieces whatever K is. An HF output is streamed straight into its safetensors
files (io/safetensors.py); a merit_jax output is streamed group by group into a `checkpoint.Writer` (one
Orbax partial save per batch of groups), so neither ever holds the merged model. Groups are merged in
threads (`workers`), the next input's read overlapping the current one's arithmetic.

Several processes (jax.distributed): every process runs the same merge; each reads, merges and writes only
the shards it owns (`fsdp_placement`), process 0 writes the json files, and the output is renamed into place
after a barrier (see `_process_split`). jax is imported only for merit_jax inputs: an HF merge never pays for it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from merit_jax.io import checkpoint
from merit_jax.io.safetensors import MAX_SHARD_BYTES, SafetensorsWriter, nbytes
from merit_jax.merging.ops import (LINEAR_METHODS, RELATIVE_METHODS, axpy_into, linear_coefficients, merge_tensors,
                                   resolve_weights)
from merit_jax.merging.sources import MergeInputError, Piece, detect_kind, open_source, validate_sources

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 << 20
MAX_WRITES = 16  # merit_jax output: about this many Orbax partial saves (see _write_merit_jax)
MERGE_INFO_FILE = "merit_merge.json"

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


# ========================================================================================= the driver


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
        f32_bytes = nbytes(shape, np.float32)
        if split_rows and rows > 1 and f32_bytes > chunk_bytes:
            if group:
                yield group
                group, size = [], 0
            row_bytes = max(1, f32_bytes // rows)
            step = max(1, chunk_bytes // row_bytes)
            for start in range(0, rows, step):
                yield [(name, start, min(rows, start + step))]
            continue
        if group and size + f32_bytes > chunk_bytes:
            yield group
            group, size = [], 0
        group.append((name, 0, rows))
        size += f32_bytes
    if group:
        yield group


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
    stored_bytes = sum(nbytes(*sources[0].specs[name]) for name, _, _ in group)
    if len(sources) < 2 or stored_bytes > prefetch_bytes:
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
                    accs[i] = axpy_into(accs[i], c, arrays[i])
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
    max_shard_bytes: int = MAX_SHARD_BYTES,
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
    writer = SafetensorsWriter(tmp, out_specs, max_shard_bytes)
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
    checkpoint.fsync_dir(tmp)
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
    out_bytes = sum(nbytes(shape, out_dtypes[name]) for name, (shape, _) in first.specs.items())
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
                part_bytes += nbytes(np.shape(piece), out_dtypes[name])
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
