"""The Qwen2.5-VL vision tower's window layout, computed on the host from the images' patch grids.

Transformers reorders each image's patches so that every attention window's are contiguous (`window_index`),
runs the blocks on that order and restores the merged tokens' order at the end. Here that bookkeeping is a
`VisionLayout` of numpy index arrays, passed through jit as an argument: the window order and its inverse,
each patch's 2-D rotary position, and the attention segments (frames for the full-attention blocks, windows
for the others) as padded [segments, length] gathers. `layout_sizes` / `stacked_layouts` give many rows (or
examples) layouts of one common shape, so that they stack and a whole run compiles once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np

if TYPE_CHECKING:
    from merit_jax.models.qwen2_5_vl import VisionConfig

Array = jax.Array


class SegmentGather(NamedTuple):
    """Attention within pieces of a sequence (a frame, a window), on a padded [S, L] gather of it: a segment
    of L slots holds one piece, or several consecutive ones (packed frames), which attend only to themselves.

    gather int32 [S, L]: sequence index of each slot (empty slots repeat the segment's first token);
    piece int32 [S, L]: the piece of each slot, -1 for empty slots (attention mask: same piece);
    scatter int32 [P]: flat slot (s * L + j) of each sequence position."""

    gather: Array
    piece: Array
    scatter: Array


class VisionLayout(NamedTuple):
    """Host-computed index arrays for one batch of images (a pytree: pass it through jit as an argument).

    patch_order int32 [P]: window order <- processor order (`x_window = x[patch_order]`);
    unit_restore int32 [U]: merged units back to processor order (argsort of HF's window_index);
    rope_hw int32 [P, 2]: each patch's (row, column) in its image, in window order;
    full / window: segments for the full-attention blocks (frames, packed) and the windowed ones.
    Padding patches (beyond the images' own, when bucketed) sit at the end, in segments of their own."""

    patch_order: Array
    unit_restore: Array
    rope_hw: Array
    full: SegmentGather
    window: SegmentGather

    @property
    def num_patches(self) -> int:
        return int(self.patch_order.shape[0])


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Consecutive lengths grouped greedily into bins of at most `capacity`."""
    bins: list[list[int]] = []
    for n in lengths:
        if bins and sum(bins[-1]) + n <= capacity:
            bins[-1].append(n)
        else:
            bins.append([n])
    return bins


def _segments(lengths: list[int], n_total: int, num_segments: int | None, seg_len: int | None,
              pack: bool = False) -> SegmentGather:
    """Pieces of `lengths` (contiguous, in order; then padding tokens up to n_total, in pieces of seg_len)
    as a SegmentGather: one piece per segment, or with `pack` as many consecutive real pieces as fit."""
    lengths = [int(n) for n in lengths if n > 0]
    seg_len = max([*lengths, 1]) if seg_len is None else seg_len
    if lengths and max(lengths) > seg_len:
        raise ValueError(f"vision layout: a segment of {max(lengths)} patches exceeds the length {seg_len}")
    pad = n_total - sum(lengths)
    padding = [seg_len] * (pad // seg_len) + ([pad % seg_len] if pad % seg_len else [])
    segments = (_pack(lengths, seg_len) if pack else [[n] for n in lengths]) + [[n] for n in padding]
    num_segments = len(segments) if num_segments is None else num_segments
    if len(segments) > num_segments:
        raise ValueError(f"vision layout: {len(segments)} segments exceed the bucket of {num_segments}")
    gather = np.full((num_segments, seg_len), n_total - 1, np.int32)  # unused segments: empty
    piece = np.full((num_segments, seg_len), -1, np.int32)
    scatter = np.zeros(n_total, np.int32)
    pos = pid = 0
    for i, seg in enumerate(segments):
        gather[i] = pos
        slot = 0
        for n in seg:
            gather[i, slot:slot + n] = pos + np.arange(n)
            piece[i, slot:slot + n] = pid
            scatter[pos:pos + n] = i * seg_len + slot + np.arange(n)
            pos, slot, pid = pos + n, slot + n, pid + 1
    return SegmentGather(gather, piece, scatter)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class LayoutSizes(NamedTuple):
    """Array sizes of a VisionLayout: patches, full-attention segment length and count, window segment count.
    Layouts built with the same sizes stack into one array per field (per-row or per-example images)."""

    num_patches: int
    full_len: int
    full_segments: int
    window_segments: int


def _grid_stats(grid: np.ndarray, vision: VisionConfig) -> tuple[int, list[int], int]:
    """(patches, frame sizes in order, windows) of a list of image grids [N, 3]."""
    m, ws = vision.spatial_merge_size, vision.window_units
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    windows = t * -(-(h // m) // ws) * -(-(w // m) // ws)
    frames = [int(hi * wi) for ti, hi, wi in grid.tolist() for _ in range(ti)]
    return int((t * h * w).sum()), frames, int(windows.sum())


def _segment_counts(stats: tuple[int, list[int], int], n_total: int, full_len: int,
                    vision: VisionConfig) -> tuple[int, int]:
    """(full-attention, window) segments a row with these stats takes at these sizes, as vision_layout lays
    them out: its frames packed into segments of full_len (its windows one per segment), then its padding
    patches (n_total - its own) in segments of their own."""
    n, frames, windows = stats
    win_len = vision.window_units ** 2 * vision.merge_unit
    return (len(_pack(frames, full_len)) + -(-(n_total - n) // full_len),
            windows + -(-(n_total - n) // win_len))


def layout_sizes(grids: list, vision: VisionConfig) -> LayoutSizes:
    """The smallest common (power-of-two bucketed) LayoutSizes that fit every grid list in `grids` (one per
    row or example; an empty list stands for a row without images: see `row_grid`) and a padding row.

    Every batch may carry padding rows (the last batch of an evaluation, empty rows up to a fixed row count);
    a padding row holds one smallest stand-in image and the rest padding patches, which takes more segments
    than a full row (padding never shares a segment), so it is always fitted too."""
    stats = [_grid_stats(row_grid(g, vision), vision) for g in [*grids, []]]
    n_total = max(next_pow2(n) for n, _, _ in stats)
    full_len = max(next_pow2(max(frames)) for _, frames, _ in stats)
    counts = [_segment_counts(st, n_total, full_len, vision) for st in stats]
    return LayoutSizes(n_total, full_len, max(c[0] for c in counts), max(c[1] for c in counts))


def fits(grid, sizes: LayoutSizes, vision: VisionConfig) -> bool:
    """Whether a row's images (grids [N, 3]; none: a padding row) lay out within `sizes`."""
    n, frames, windows = stats = _grid_stats(row_grid(grid, vision), vision)
    if n > sizes.num_patches or max(frames) > sizes.full_len:
        return False
    full, window = _segment_counts(stats, sizes.num_patches, sizes.full_len, vision)
    return full <= sizes.full_segments and window <= sizes.window_segments


def grown_sizes(sizes: LayoutSizes, grids: list, vision: VisionConfig) -> LayoutSizes:
    """Sizes that fit every row `sizes` fits and the rows of `grids` too, for sizes that grow while a run
    goes on (rows that were not fitted up front); the segment counts are rounded up to powers of two as well,
    so that growing sizes take few distinct shapes. No earlier row is needed: a row's frames pack into no more
    segments at a larger full_len (greedy packing of consecutive frames), and its padding segments grow by at
    most the added patches over the segment length."""
    stats = [_grid_stats(row_grid(g, vision), vision) for g in grids]
    n_total = max([sizes.num_patches] + [next_pow2(n) for n, _, _ in stats])
    full_len = max([sizes.full_len] + [next_pow2(max(frames)) for _, frames, _ in stats])
    added = n_total - sizes.num_patches
    win_len = vision.window_units ** 2 * vision.merge_unit
    counts = [_segment_counts(st, n_total, full_len, vision) for st in stats]
    full = max([sizes.full_segments + -(-added // full_len)] + [c[0] for c in counts])
    window = max([sizes.window_segments + -(-added // win_len)] + [c[1] for c in counts])
    return LayoutSizes(n_total, full_len, next_pow2(full), next_pow2(window))


def stacked_layouts(grids: list, vision: VisionConfig, sizes: LayoutSizes | None = None) -> VisionLayout:
    """One layout per grid list (row or example), stacked: every field gains a leading axis."""
    sizes = sizes or layout_sizes(grids, vision)
    layouts = [vision_layout(row_grid(g, vision), vision, sizes=sizes) for g in grids]
    return jax.tree.map(lambda *xs: np.stack(xs), *layouts)


def row_grid(grid, vision: VisionConfig) -> np.ndarray:
    """A row's grids [N, 3]; a row without images gets one smallest stand-in image (whose features no
    token picks), so that every row's layout is well-formed."""
    grid = np.asarray(grid, np.int64).reshape(-1, 3)
    m = vision.spatial_merge_size
    return grid if len(grid) else np.array([[1, m, m]], np.int64)


def vision_layout(image_grid_thw, vision: VisionConfig, *, bucket: bool = False,
                  sizes: LayoutSizes | None = None) -> VisionLayout:
    """The window reordering, its inverse, rotary positions and attention segments for a batch of images
    (numpy, from the concrete `image_grid_thw` [N, 3]), exactly as transformers' vision tower computes them.

    bucket: round every size up to a power of two (padding patches at the end; feed `pixel_values` padded
    with zero rows to `layout.num_patches`, or let the model pad them), so that jit sees few shapes.
    sizes: exactly these array sizes (`layout_sizes`), e.g. to stack the layouts of several rows.
    """
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if not len(grid):
        raise ValueError("vision_layout: image_grid_thw holds no image")
    m, u, ws = vision.spatial_merge_size, vision.merge_unit, vision.window_units
    if (grid[:, 1:] % m).any() or (grid <= 0).any():
        raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be positive multiples of "
                         f"spatial_merge_size={m}")
    window_index, window_lens, frame_lens, rope = [], [], [], []
    offset = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = -lh % ws, -lw % ws  # HF pads a whole extra window when divisible; it holds nothing
        padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (lh + ph) // ws, (lw + pw) // ws
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
        window_lens += ((padded >= 0).sum(-1).reshape(-1) * u).tolist()
        window_index.append(padded[padded >= 0] + offset)
        offset += t * lh * lw
        frame_lens += [h * w] * t
        # (row, col) of each patch in the processor's order: merge blocks row-major, then inside the block
        rows = np.arange(h).reshape(lh, m, 1, 1).repeat(lw, 2).repeat(m, 3).transpose(0, 2, 1, 3).reshape(-1)
        cols = np.arange(w).reshape(1, 1, lw, m).repeat(lh, 0).repeat(m, 1).transpose(0, 2, 1, 3).reshape(-1)
        rope.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    n_real = offset * u
    n_total = sizes.num_patches if sizes else next_pow2(n_real) if bucket else n_real
    if n_total < n_real:
        raise ValueError(f"vision layout: {n_real} patches exceed sizes.num_patches={n_total}")
    units = np.concatenate(window_index + [np.arange(offset, n_total // u)])
    patch_order = (units[:, None] * u + np.arange(u)).reshape(-1)
    rope_hw = np.concatenate(rope + [np.zeros((n_total - n_real, 2), np.int64)])[patch_order]
    full_len = sizes.full_len if sizes else next_pow2(max(frame_lens)) if bucket else None
    win_len = ws * ws * u if bucket or sizes else None

    if sizes:  # segment counts: the images' segments (frames packed), then the padding's
        full_count, window_count = sizes.full_segments, sizes.window_segments
    elif bucket:
        pad = n_total - n_real
        full_count = next_pow2(len(_pack(frame_lens, full_len)) + -(-pad // full_len))
        window_count = next_pow2(sum(n > 0 for n in window_lens) + -(-pad // win_len))
    else:
        full_count = window_count = None
    return VisionLayout(
        patch_order=patch_order.astype(np.int32),
        unit_restore=np.argsort(units, kind="stable").astype(np.int32),
        rope_hw=rope_hw.astype(np.int32),
        full=_segments(frame_lens, n_total, full_count, full_len, pack=True),
        window=_segments(window_lens, n_total, window_count, win_len))
