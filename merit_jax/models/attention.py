"""Causal self-attention over packed rows without T × S scores: splash attention (the Pallas TPU kernel) and
cuDNN's fused attention in its packed layout (NVIDIA GPUs).

    out_btnh = splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt)   # model.attention = "splash"
    out_btnh = cudnn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt)    # model.attention = "cudnn"

Packed rows hold several examples, told apart by `segment_ids` (0: padding); a token attends to the earlier
tokens of its own segment (causal by index within a segment, which is causal by position id too, since a
segment's positions count up from 0). The kernel takes exactly that as a CausalMask plus SegmentIds and works
block by block, so neither the scores nor the mask ever exist whole. Grouped-query attention runs the MQA form
of the kernel once per KV head over the query heads of its group. Under a mesh the kernel runs per shard
(`jax.shard_map`: rows over the data axes, KV heads over tp), since XLA cannot partition a Pallas call.

The kernel needs sequence lengths that are multiples of 128 (its block size); shorter or odd-length batches
(generation, tests) fall back to XLA's attention with the same mask, which `dense_attention` builds. On a machine
without a TPU the kernel runs through Pallas' interpreter (tests: slow, exact); `INTERPRET` says which, and a
deviceless TPU compile (merit_jax.plan) sets it False.

cuDNN takes packed rows as ragged offsets: each row's runs of one segment id (its padding one too) become
start offsets and lengths, padded to a static number per row (`model.max_segments`), and the kernel attends
causally inside each one (a flash kernel: no scores, no mask in memory). Handing cuDNN a dense [T, S]
mask instead would turn it into a [B, 1, T, S] bias, and MaxText's cudnn flash path, which drops segment ids,
attends across packed examples: both avoided here. A row with more segments than that bound cannot be
expressed: its outputs become NaN (a loud loss, never a silent wrong one); raise the bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from merit_jax.sharding import LOGICAL_RULES

BLOCK = 128  # the kernel's lane width: sequence lengths and blocks are multiples of it
MAX_BLOCK = 512
INTERPRET: bool | None = None  # None: interpret unless the default backend is a TPU


def dense_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """bool [B, 1, T, T]: causal by index, same segment (XLA's fallback)."""
    t = segment_ids_bt.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    return (causal[None] & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]))[:, None]


def supported(t: int) -> bool:
    return t % BLOCK == 0


def _block(t: int) -> int:
    return max(b for b in range(BLOCK, min(t, MAX_BLOCK) + 1, BLOCK) if t % b == 0)


def _kernel(t: int, heads: int, interpret: bool, causal: bool = True):
    """MQA kernel over `heads` query heads sharing one KV head (causal), or MHA (bidirectional)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = _block(t)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) if causal else sm.FullMask((t, t)) for _ in range(heads)])
    make = sk.make_splash_mqa_single_device if causal else sk.make_splash_mha_single_device
    # Built per trace (its mask tables become constants of the program being traced; a kernel kept across
    # traces would leak them). The mask processing itself is cached inside jax's splash module.
    return make(mask, block_sizes=sizes, interpret=interpret)


def _interpret() -> bool:
    return INTERPRET if INTERPRET is not None else jax.default_backend() != "tpu"


def splash_segments(q_slnh: jax.Array, k_slnh: jax.Array, v_slnh: jax.Array, piece_sl: jax.Array) -> jax.Array:
    """Bidirectional attention inside pieces of each of S rows (the vision tower's frames and windows:
    merit_jax.models.vision_layout.SegmentGather), [S, L, N, H] in and out; L a multiple of 128.

    Under a mesh the kernel runs per shard (`jax.shard_map`; XLA cannot partition a Pallas call): heads over
    tp; the rows of a batch come sharded through the vmap over rows (`row_axes`, its spmd_axis_name)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    s, length, n, h = q_slnh.shape
    kernel = _kernel(length, n // _heads_split(n), _interpret(), causal=False)
    scale = 1.0 / np.sqrt(h)

    def row(q_lnh, k_lnh, v_lnh, piece_l):
        ids = sk.SegmentIds(q=piece_l, kv=piece_l)
        q = (q_lnh * scale).astype(q_lnh.dtype).transpose(1, 0, 2)
        return kernel(q, k_lnh.transpose(1, 0, 2), v_lnh.transpose(1, 0, 2), segment_ids=ids).transpose(1, 0, 2)

    local = lambda q, k, v, piece: jax.vmap(row)(q, k, v, piece)
    piece_sl = piece_sl.astype(jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or all(size == 1 for size in mesh.shape.values()):
        return local(q_slnh, k_slnh, v_slnh, piece_sl)
    qkv = P(None, None, "tp" if _heads_split(n) > 1 else None, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P()), out_specs=qkv, check_vma=False)
    return fn(q_slnh, k_slnh, v_slnh, piece_sl)


def _heads_split(n: int) -> int:
    """Shards of n attention heads under the current mesh: its tp axis when it divides them, else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    tp = 1 if mesh is None or mesh.empty else mesh.shape.get("tp", 1)
    return tp if n % tp == 0 else 1


def row_axes(rows: int) -> tuple[str, ...] | None:
    """The mesh axes a batch of `rows` rows is sharded over under the current mesh (for a jax.vmap over rows'
    spmd_axis_name, so that a kernel inside runs on each shard's own rows), or None (no mesh, or rows that
    do not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    axes = tuple(a for a in LOGICAL_RULES["batch"] if mesh.shape.get(a, 1) > 1)
    return axes if axes and rows % int(np.prod([mesh.shape[a] for a in axes])) == 0 else None


def _local(q_btnh, k_btkh, v_btkh, seg_bt, interpret: bool):
    """The kernel on one shard: rows and KV heads of this device."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q_btnh.shape
    k = k_btkh.shape[2]
    kernel = _kernel(t, n // k, interpret)
    q_bkgth = (q_btnh * (1.0 / np.sqrt(h))).astype(q_btnh.dtype).reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    k_bkth, v_bkth = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)

    def row(q_kgth, k_kth, v_kth, seg_t):
        ids = sk.SegmentIds(q=seg_t, kv=seg_t)
        return jax.vmap(lambda qg, kh, vh: kernel(qg, kh, vh, segment_ids=ids))(q_kgth, k_kth, v_kth)

    out_bkgth = jax.vmap(row)(q_bkgth, k_bkth, v_bkth, seg_bt)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def splash_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, segment_ids_bt: jax.Array) -> jax.Array:
    """softmax(q kᵀ / √h + causal-within-segment mask) v, [B, T, N, H] out; q, k, v in the compute dtype."""
    interpret = _interpret()
    seg = segment_ids_bt.astype(jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or all(s == 1 for s in mesh.shape.values()):
        return _local(q_btnh, k_btkh, v_btkh, seg, interpret)
    rows = tuple(a for a in LOGICAL_RULES["batch"] if mesh.shape[a] > 1)
    rows = rows if rows and q_btnh.shape[0] % int(np.prod([mesh.shape[a] for a in rows])) == 0 else ()
    heads = "tp" if mesh.shape["tp"] > 1 and k_btkh.shape[2] % mesh.shape["tp"] == 0 else None
    qkv = P(rows or None, None, heads, None)
    fn = jax.shard_map(functools.partial(_local, interpret=interpret), mesh=mesh,
                       in_specs=(qkv, qkv, qkv, P(rows or None, None)), out_specs=qkv, check_vma=False)
    return fn(q_btnh, k_btkh, v_btkh, seg)


def segment_runs(segment_ids_bt: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN's packed layout of each row: start offsets int32 [B, M + 1] and lengths int32 [B, M] of its runs
    of one segment id (padding, id 0, is a run too: cuDNN leaves the gradients of uncovered positions
    undefined), in order, -1 where a row has fewer than M; and whether any row has more (bool)."""
    b, t = segment_ids_bt.shape
    seg = segment_ids_bt.astype(jnp.int32)
    edge = jnp.full((b, 1), -1, jnp.int32)  # never a segment id: the row's ends bound a run
    start = seg != jnp.concatenate([edge, seg[:, :-1]], axis=1)
    end = seg != jnp.concatenate([seg[:, 1:], edge], axis=1)
    run = jnp.cumsum(start, axis=1) - 1  # each token's run index in its row
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rows = jnp.arange(b)[:, None]
    starts = jnp.full((b, max_segments + 1), -1, jnp.int32).at[
        rows, jnp.where(start & (run < max_segments), run, max_segments + 1)].set(pos, mode="drop")
    ends = jnp.full((b, max_segments), -1, jnp.int32).at[rows, jnp.where(end, run, max_segments)].set(
        pos, mode="drop")
    lengths = jnp.where(ends >= 0, ends - starts[:, :max_segments] + 1, -1)
    return starts, lengths, jnp.any(run >= max_segments)


def cudnn_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, segment_ids_bt: jax.Array,
                    max_segments: int = 16) -> jax.Array:
    """softmax(q kᵀ / √h + causal-within-segment mask) v, [B, T, N, H] out, through cuDNN's fused kernel with
    packed rows as ragged offsets; q, k, v in bf16 or fp16. Padding (segment 0) attends among itself, as in
    `splash_attention`."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as fused

    starts, lengths, overflow = segment_runs(segment_ids_bt, max_segments)
    out = fused(q_btnh, k_btkh, v_btkh, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts, kv_offsets=starts,
                scale=float(1.0 / np.sqrt(q_btnh.shape[-1])), mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return jnp.where(overflow, jnp.asarray(jnp.nan, out.dtype), out)
