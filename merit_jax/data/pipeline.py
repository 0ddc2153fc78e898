"""The Grain training stream: shuffled, packed, batched, sharded, checkpointable.

    it = make_train_iterator(examples, seq_len=128, batch_size=16, seed=0, num_epochs=1.0)
    batch = next(it)                                   # batch dict, rows [batch_size // shard_count, seq_len]
    steps = num_train_steps(examples, seq_len=128, batch_size=16, seed=0, num_epochs=1.0)

The whole run's packing plan is computed up front from example lengths (packing.plan_rows), so every
process agrees on the number of steps, and step i of process p is rows [i*B + p*B/P, i*B + (p+1)*B/P) of
the plan: the union over processes is the same global batch whatever the process count. The iterator is a
grain DatasetIterator; save and restore it with Orbax through `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)` (or it.get_state() / it.set_state()); a restored iterator yields exactly the
batches that would have followed.
"""

import grain
import numpy as np

from merit_jax.data.packing import TokenTable, plan_rows
from merit_jax.data.tokenize import Example


def _check(examples, seq_len, batch_size, shard_index, shard_count):
    if not examples:
        raise ValueError("no training examples")
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} (global) is not divisible by shard_count={shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} outside [0, {shard_count})")
    for i, ex in enumerate(examples):
        if len(ex) > seq_len:
            raise ValueError(f"example {i} of task '{ex.task}' has {len(ex)} tokens > seq_len={seq_len}: "
                             "set data.max_len <= train.seq_len")


def num_train_steps(examples: list[Example], *, seq_len: int, batch_size: int, seed: int,
                    num_epochs: float = 1.0) -> int:
    """Exact number of batches make_train_iterator yields with the same arguments (on every shard)."""
    _check(examples, seq_len, batch_size, 0, 1)
    rows = plan_rows([len(e) for e in examples], seq_len=seq_len, batch_size=batch_size, seed=seed,
                     num_epochs=num_epochs)
    return len(rows) // batch_size


def steps_per_epoch(examples: list[Example], *, seq_len: int, batch_size: int, seed: int = 0) -> int:
    return num_train_steps(examples, seq_len=seq_len, batch_size=batch_size, seed=seed, num_epochs=1.0)


def check_segments(rows: list[np.ndarray], lengths: np.ndarray, seq_len: int, max_segments: int) -> None:
    """Every packed row's segments (examples + padding) within `max_segments` (model.attention=cudnn needs it)."""
    counts = np.array([len(r) + int(lengths[r].sum() < seq_len) for r in rows])
    worst = int(counts.argmax()) if len(counts) else 0
    if len(counts) and counts[worst] > max_segments:
        raise ValueError(f"packed row {worst} of the training plan holds {len(rows[worst])} examples (+ padding): "
                         f"{counts[worst]} segments > model.max_segments={max_segments}, the most that "
                         f"model.attention=cudnn tells apart; raise model.max_segments to {int(counts.max())} "
                         f"(its memory grows with it, docs/TRAINING.md) or use model.attention=xla")


def make_train_iterator(examples: list[Example], *, seq_len: int, batch_size: int, seed: int,
                        num_epochs: float = 1.0, shard_index: int = 0, shard_count: int = 1,
                        num_threads: int = 1, prefetch: int = 4, images=None,
                        max_segments: int = 0) -> grain.DatasetIterator:
    """A grain iterator over this process's share of each global batch (batch_size is global).
    images: a merit_jax.data.vision.RowImages over `examples` (Qwen2.5-VL): batches then carry each row's
    images; it is fitted here on every row of the run, so the arrays keep one shape. max_segments > 0: every
    row must hold at most that many segments (its examples, and its padding if any), else a ValueError."""
    _check(examples, seq_len, batch_size, shard_index, shard_count)
    table = TokenTable(examples)
    rows = plan_rows(table.lengths, seq_len=seq_len, batch_size=batch_size, seed=seed, num_epochs=num_epochs)
    if max_segments:
        check_segments(rows, table.lengths, seq_len, max_segments)
    per_shard = batch_size // shard_count
    if images is not None:
        images.fit(rows)

    def batch(step):
        first = step * batch_size + shard_index * per_shard
        mine = rows[first:first + per_shard]
        out = table.rows(mine, seq_len)
        return images.add(out, mine) if images is not None else out

    ds = grain.MapDataset.range(len(rows) // batch_size).map(batch)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read_options=options))


def stream_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding tokens of a batch dict."""
    return int((batch["segment_ids"] > 0).sum())
