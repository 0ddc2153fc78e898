"""model.attention = "cudnn": the packed rows' layout cuDNN's kernel is given (ragged offsets), and the training
plan's bound on segments per row. The kernel itself needs an NVIDIA GPU (bench/bench_gpu.py checks it there:
equal to XLA within bf16 rounding, no attention across segments; docs/BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import pytest

from merit_jax.data.packing import plan_rows
from merit_jax.data.pipeline import check_segments
from merit_jax.models.attention import segment_runs


def runs_by_hand(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of one segment id, padding included."""
    out, start = [], 0
    for t in range(1, len(row) + 1):
        if t == len(row) or row[t] != row[start]:
            out.append((start, t - start))
            start = t
    return out


def test_segment_runs_match_a_scan_of_each_row():
    rng = np.random.default_rng(0)
    rows = [np.repeat(np.arange(1, 6), rng.integers(1, 9, 5)) for _ in range(5)]
    width = max(len(r) for r in rows) + 4
    seg = np.zeros((6, width), np.int32)
    for i, r in enumerate(rows):
        seg[i, :len(r)] = r  # trailing padding
    seg[5, 3:] = 1  # leading padding (a left-padded prompt), then one segment
    m = 8
    starts, lengths, overflow = (np.asarray(x) for x in segment_runs(seg, m))
    assert starts.shape == (6, m + 1) and lengths.shape == (6, m) and not overflow
    for i in range(6):
        want = runs_by_hand(seg[i])
        n = len(want)
        assert [tuple(x) for x in zip(starts[i, :n], lengths[i, :n])] == want
        assert (starts[i, n:] == -1).all() and (lengths[i, n:] == -1).all()
        assert lengths[i, :n].sum() == width  # every position in exactly one run: cuDNN defines all gradients


def test_segment_runs_flag_a_row_beyond_the_bound():
    seg = np.array([[1, 2, 3, 4, 0, 0], [1, 1, 1, 2, 2, 2]], np.int32)
    assert bool(segment_runs(seg, 5)[2]) is False
    assert bool(segment_runs(seg, 4)[2]) is True  # row 0: 4 examples + padding


def test_training_plan_refuses_rows_over_max_segments():
    lengths = np.array([10, 12, 9, 30, 8, 11, 7, 13], np.int64)
    rows = plan_rows(lengths, seq_len=64, batch_size=2, seed=0, num_epochs=1.0)
    most = max(len(r) + int(lengths[r].sum() < 64) for r in rows)
    check_segments(rows, lengths, 64, most)  # at the bound: accepted
    with pytest.raises(ValueError, match=rf"{most} segments > model.max_segments={most - 1}.*raise"):
        check_segments(rows, lengths, 64, most - 1)
