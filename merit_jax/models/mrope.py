"""Multimodal RoPE (M-RoPE) of Qwen2.5-VL: 3-D position ids and their cos/sin, as pure jittable functions.

Position rules (transformers' `Qwen2_5_VLModel.get_rope_index`, images only):
  - a text token gets (p, p, p), where p counts on from the previous token (0 at the start of a sequence);
  - the tokens of an image whose merged grid is (t, h, w) = (T, H/m, W/m) (m = spatial_merge_size), laid out
    row-major, get (s + i_t, s + i_h, s + i_w), s being the next free position before the image;
  - after the image, counting resumes at s + max(h, w).
Padding (attention_mask 0, or segment id 0) gets (0, 0, 0) and does not advance the count. With packed
segments the count restarts at 0 in each segment, as if each example were alone.
`rope_deltas[b] = max position + 1 - number of real tokens`: during decoding a new token at text position
q (counting real tokens) has position q + rope_deltas[b] on all three axes.

Videos are not supported yet (their temporal axis is spaced by `tokens_per_second * second_per_grid_t`).

Shapes: B batch, T sequence, N images, H head dim.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def image_token_counts(image_grid_thw_n3: Array, spatial_merge_size: int) -> Array:
    """Tokens each image occupies in the text: t * h * w / m^2 (int32 [N])."""
    g = jnp.asarray(image_grid_thw_n3, jnp.int32)
    return g[:, 0] * g[:, 1] * g[:, 2] // (spatial_merge_size * spatial_merge_size)


def image_token_index(input_ids_bt: Array, image_token_id: int, valid_bt: Array | None = None) -> tuple[Array, Array]:
    """(is_image bool [B, T], k int32 [B, T]): k = index of the token among all image tokens of the batch,
    counted row-major (the order in which image features are consumed); -1 before the first."""
    is_image = input_ids_bt == image_token_id
    if valid_bt is not None:
        is_image &= valid_bt
    b, t = input_ids_bt.shape
    k = jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)).reshape(b, t) - 1
    return is_image, k


def mrope_positions(input_ids_bt: Array, image_grid_thw_n3: Array | None, *, image_token_id: int,
                    spatial_merge_size: int = 2, attention_mask_bt: Array | None = None,
                    segment_ids_bt: Array | None = None) -> tuple[Array, Array]:
    """(positions int32 [3, B, T], rope_deltas int32 [B]) by the rules in the module docstring.

    `image_grid_thw_n3`: the processor's (t, h, w) patch grid per image, in the order images appear in the
    batch (row-major); rows of zeros are allowed as padding (they own no token). Jittable: only shapes are
    static.
    """
    input_ids_bt = jnp.asarray(input_ids_bt)
    b, t = input_ids_bt.shape
    valid = jnp.ones((b, t), bool) if attention_mask_bt is None else jnp.asarray(attention_mask_bt).astype(bool)
    if segment_ids_bt is not None:
        valid &= jnp.asarray(segment_ids_bt) > 0
    zeros = jnp.zeros((b, t), jnp.int32)
    if image_grid_thw_n3 is None or np.shape(image_grid_thw_n3)[0] == 0:
        is_image, rank, span, grid_h, grid_w, hw = (jnp.zeros((b, t), bool), zeros, zeros, zeros, zeros, zeros)
    else:
        m = spatial_merge_size
        grid = jnp.asarray(image_grid_thw_n3, jnp.int32)
        counts = image_token_counts(grid, m)
        ends = jnp.cumsum(counts)
        is_image, k = image_token_index(input_ids_bt, image_token_id, valid)
        img = jnp.clip(jnp.searchsorted(ends, k, side="right"), 0, grid.shape[0] - 1)  # zero-count rows skipped
        rank = k - (ends - counts)[img]  # index of the token inside its image
        grid_h, grid_w = jnp.maximum(grid[:, 1] // m, 1)[img], jnp.maximum(grid[:, 2] // m, 1)[img]
        hw = grid_h * grid_w
        last = is_image & (rank == counts[img] - 1)
        span = jnp.where(last, jnp.maximum(grid_h, grid_w), 0)  # an image advances the count by max(h, w)
    step = jnp.where(is_image, span, valid.astype(jnp.int32))
    start = jnp.cumsum(step, axis=1) - step  # exclusive: the next free position before each token
    if segment_ids_bt is not None:  # restart at every segment; `start` never decreases along a row
        seg = jnp.asarray(segment_ids_bt)
        first = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        start = start - jax.lax.cummax(jnp.where(first, start, 0), axis=1)
    pos_t = start + jnp.where(is_image, rank // jnp.maximum(hw, 1), 0)
    pos_h = start + jnp.where(is_image, (rank // jnp.maximum(grid_w, 1)) % jnp.maximum(grid_h, 1), 0)
    pos_w = start + jnp.where(is_image, rank % jnp.maximum(grid_w, 1), 0)
    positions = jnp.where(valid[None], jnp.stack([pos_t, pos_h, pos_w]), 0).astype(jnp.int32)
    deltas = positions.max(axis=(0, 2)) + 1 - valid.sum(axis=1)
    return positions, deltas.astype(jnp.int32)


def mrope_cos_sin(positions_3bt: Array, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[Array, Array]:
    """cos, sin float32 [B, T, H]: frequency band i of `mrope_section` rotates by axis i % 3 (t, h, w),
    in HF's half-split layout (the H/2 frequencies repeated twice)."""
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, expected "
                         f"head_dim / 2 = {head_dim // 2}")
    axis_of_freq = np.concatenate([np.full(s, i % 3) for i, s in enumerate(mrope_section)])
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    pos_bth = jnp.moveaxis(jnp.asarray(positions_3bt)[axis_of_freq], 0, -1).astype(jnp.float32)  # [B, T, H/2]
    freqs = pos_bth * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
