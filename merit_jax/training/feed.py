"""Feeding the global batch: each process builds its own rows of every batch (the data-parallel shard it
holds) and they become one global array; the data iterator's position on resume."""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from merit_jax.config import TrainSettings
from merit_jax.sharding import batch_sharding

log = logging.getLogger(__name__)


def process_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """(shard_index, shard_count) of this process's rows of a [global_rows, ...] array with `sharding`: the
    process feeds rows [i * global_rows / n, (i + 1) * global_rows / n)."""
    index_map = sharding.addressable_devices_indices_map((global_rows, 1))
    spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = start
    for a, b in spans:
        if a > covered:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}: "
                             "order the mesh devices by process")
        covered = max(covered, b)
    per = stop - start
    if global_rows % per or start % per:
        raise ValueError(f"process {jax.process_index()} holds rows [{start}, {stop}) of {global_rows}: not an "
                         "equal share")
    return start // per, global_rows // per


def to_global(local: Mapping[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """This process's rows of a batch dict -> global jax arrays sharded over (data, fsdp)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v,
                                                        (global_rows, *v.shape[1:]))
    return out


def seek(iterator, step: int) -> None:
    """Positions a fresh train iterator (make_train_iterator) at batch `step`."""
    state = iterator.get_state()
    if set(state) != {"next_index"}:
        raise RuntimeError(f"cannot position the data iterator from its state {state}: resume with the number of "
                           "processes that saved the checkpoint")
    iterator.set_state({"next_index": int(step)})



def process_batches(examples: Sequence, s: TrainSettings, num_epochs: float, mesh: Mesh,
                    make_images: Callable | None = None):
    """The Grain iterator of this process's rows of every global batch (examples packed into rows of
    s.seq_len, s.batch_size rows per global batch, shuffled by s.seed, `num_epochs` epochs); its state is
    what a checkpoint saves. make_images: examples -> RowImages for a Qwen2.5-VL model."""
    from merit_jax.data.pipeline import make_train_iterator

    shard_index, shard_count = process_rows(batch_sharding(mesh, 2), s.batch_size)
    log.info("train: process %d of %d feeds data shard %d of %d (%d of the %d rows of each global batch)",
             jax.process_index(), jax.process_count(), shard_index, shard_count, s.batch_size // shard_count,
             s.batch_size)
    return make_train_iterator(list(examples), seq_len=s.seq_len, batch_size=s.batch_size, seed=s.seed,
                               num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
                               images=make_images(list(examples)) if make_images else None,
                               num_threads=s.loader_threads,
                               max_segments=s.max_segments if s.attention == "cudnn" else 0)
