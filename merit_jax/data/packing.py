"""Packing examples into fixed-length rows, and building batch dicts from them (pure numpy).

Batch dict (the convention every model-feeding pipeline follows), arrays [rows, seq_len]:
  input_ids int32, targets int32 (next token of the same example, 0 where there is none),
  loss_mask float32 (1 where targets is supervised), segment_ids int32 (1..n per row, 0 = padding),
  positions int32 (0.. restarting at each segment, 0 on padding).
"""

import math

import numpy as np

from merit_jax.data.tokenize import Example

PACK_WINDOW = 1024  # consecutive examples packed together (first fit) before their rows are emitted


class TokenTable:
    """All examples' tokens in flat arrays, with targets and their loss mask shifted inside each example."""

    def __init__(self, examples: list[Example]):
        if not examples:
            raise ValueError("no examples to pack")
        self.lengths = np.array([len(e) for e in examples], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.ids = np.concatenate([e.input_ids for e in examples]).astype(np.int32)
        last = self.offsets + self.lengths - 1  # each example's last token: it has no target
        self.targets = np.concatenate([self.ids[1:], [0]]).astype(np.int32)
        self.targets[last] = 0
        mask = np.concatenate([e.loss_mask for e in examples])
        self.target_mask = np.concatenate([mask[1:], [False]]).astype(np.float32)
        self.target_mask[last] = 0.0

    def rows(self, row_examples: list, seq_len: int) -> dict[str, np.ndarray]:
        """Batch dict with one row per entry of `row_examples` (each a sequence of example indices)."""
        n_rows = len(row_examples)
        out = {k: np.zeros((n_rows, seq_len), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
        out["loss_mask"] = np.zeros((n_rows, seq_len), np.float32)
        seg_ex = np.concatenate([np.asarray(r, dtype=np.int64) for r in row_examples] + [np.zeros(0, np.int64)])
        if not len(seg_ex):
            return out
        seg_row = np.repeat(np.arange(n_rows), [len(r) for r in row_examples])
        seg_len = self.lengths[seg_ex]
        seg_begin = np.cumsum(seg_len) - seg_len  # start of each segment in the flat concatenation
        row_first = np.searchsorted(seg_row, seg_row)  # index of the first segment of each segment's row
        seg_start = seg_begin - seg_begin[row_first]  # start inside its row
        seg_num = np.arange(len(seg_ex)) - row_first + 1  # 1-based segment id inside its row
        if (seg_start + seg_len).max() > seq_len:
            raise ValueError(f"a row holds more than seq_len={seq_len} tokens")
        tok_seg = np.repeat(np.arange(len(seg_ex)), seg_len)
        pos = np.arange(len(tok_seg)) - seg_begin[tok_seg]
        src = self.offsets[seg_ex][tok_seg] + pos
        r, c = seg_row[tok_seg], seg_start[tok_seg] + pos
        out["input_ids"][r, c] = self.ids[src]
        out["targets"][r, c] = self.targets[src]
        out["loss_mask"][r, c] = self.target_mask[src]
        out["segment_ids"][r, c] = seg_num[tok_seg]
        out["positions"][r, c] = pos
        return out


def pad_batch(examples: list[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One example per row, right-padded to seq_len (for extraction and evaluation)."""
    too_long = [(i, len(e)) for i, e in enumerate(examples) if len(e) > seq_len]
    if too_long:
        raise ValueError(f"examples longer than seq_len={seq_len} (index, length): {too_long[:5]}")
    return TokenTable(examples).rows([[i] for i in range(len(examples))], seq_len)


def packed_batch(examples: list[Example], seq_len: int,
                 rows: list[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The examples packed into rows of seq_len (extraction's `extract.pack`): `rows` (example indices per
    row), by default first fit in their order; (batch dict + "example_index" int32 [rows, seq_len], the
    example of each token, -1 on padding; the rows)."""
    too_long = [(i, len(e)) for i, e in enumerate(examples) if len(e) > seq_len]
    if too_long:
        raise ValueError(f"examples longer than seq_len={seq_len} (index, length): {too_long[:5]}")
    table = TokenTable(examples)
    rows = first_fit(table.lengths, seq_len) if rows is None else rows
    batch = table.rows(rows, seq_len)
    index = np.full(batch["segment_ids"].shape, -1, np.int32)
    for r, row in enumerate(rows):
        seg = batch["segment_ids"][r]
        index[r, seg > 0] = row[seg[seg > 0] - 1]
    batch["example_index"] = index
    return batch, rows


def first_fit(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Bins (arrays of indices into `lengths`, in order) each holding at most `capacity` tokens.

    Each item goes to the first bin with room, in the given (shuffled) order: rows mix tasks and lengths
    at random. ~95% fill on the synthetic mixture; sorting by length first packs wide length ranges a
    little tighter but makes rows of look-alike examples.
    """
    free = np.empty(0, dtype=np.int64)
    bins = []
    for i in range(len(lengths)):
        fits = np.flatnonzero(free >= lengths[i])
        if len(fits):
            b = fits[0]
        else:
            b, free = len(bins), np.append(free, capacity)
            bins.append([])
        bins[b].append(i)
        free[b] -= lengths[i]
    return [np.array(b, dtype=np.int64) for b in bins]


def plan_rows(lengths, *, seq_len: int, batch_size: int, seed: int, num_epochs: float) -> list[np.ndarray]:
    """The packed rows of a whole training run: example indices per row, a multiple of batch_size rows.

    Order: round(num_epochs * n) examples from a fresh seeded permutation per epoch (the last epoch may be
    partial); each window of PACK_WINDOW consecutive examples is packed first fit and its rows emitted in
    the order they were opened; empty rows pad the last batch. A pure function of its arguments, so every process
    of a multi-host run computes the same plan and the same number of steps.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n, total = len(lengths), int(round(num_epochs * len(lengths)))
    if total < 1:
        raise ValueError(f"num_epochs={num_epochs} over {n} examples is less than one example")
    if lengths.max() > seq_len:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit seq_len={seq_len} (use max_len <= seq_len)")
    epochs = range(math.ceil(total / n))
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in epochs])[:total]
    rows = []
    for start in range(0, total, PACK_WINDOW):
        chunk = order[start:start + PACK_WINDOW]
        rows += [chunk[b] for b in first_fit(lengths[chunk], seq_len)]
    rows += [np.zeros(0, np.int64)] * (-len(rows) % batch_size)
    return rows
