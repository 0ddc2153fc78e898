"""Reductions of a flat gradient {name: array} to d dimensions, as pure functions (docs/EXTRACT.md).

    layout = Layout.of(flat)                    # which tensors, in which order, how many coordinates (P)
    reduce_flat(flat, layout, "full")          # [P]    the exact concatenation
    reduce_flat(flat, layout, "stride", s=7)   # [ceil(P/s)] every s-th coordinate of the concatenation
    reduce_flat(flat, layout, "sketch", d=4096, seed=0)   # [d] a CountSketch: unbiased inner products

All three are linear maps, so a mean of gradients can be reduced once instead of every gradient. They work
under jit and vmap (a per-example gradient {name: [C, ...]} is reduced with jax.vmap).

The sketch is CountSketch (feature hashing with random signs): coordinate i of the concatenation goes to
bucket h(i) with sign s(i), where (h, s) come from an integer hash of (seed, tensor name, index) computed on
the fly, so no P x d matrix, and not even a P-long index table, ever exists. For any x, y:
    E[<Sx, Sy>] = <x, y>,   Var[<Sx, Sy>] = (|x|^2 |y|^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / d,
the variance of a dense Gaussian projection to d dims (minus a small term), at O(P) cost.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from merit_jax.models.names import canonical

REDUCTIONS = ("full", "stride", "sketch")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Layout:
    """The filtered tensors in concatenation order: `names[i]` has `shapes[i]` and starts at `offsets[i]`."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, flat: Mapping[str, object]) -> "Layout":
        """The layout of a flat dict (anything with `.shape`), in the canonical name order
        (merit_jax.models.names), whatever the dict's own order."""
        names = canonical(flat)
        return cls(tuple(names), tuple(tuple(int(n) for n in np.shape(flat[k])) for k in names))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.sizes)[:-1]])) if self.names else ()

    @property
    def total(self) -> int:
        """P: the number of coordinates."""
        return int(sum(self.sizes))

    def check(self, flat: Mapping[str, object], batch_dims: int = 0) -> None:
        """Raises if `flat` does not hold exactly these tensors (with `batch_dims` leading dims). The dict's
        own order does not matter: every reduction reads the tensors by name, in layout order."""
        if len(flat) != len(self.names) or any(n not in flat for n in self.names):
            missing = [n for n in self.names if n not in flat]
            extra = [n for n in flat if n not in set(self.names)]
            raise ValueError(f"gradient tensors differ from the layout: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, shape in zip(self.names, self.shapes):
            got = tuple(np.shape(flat[name]))[batch_dims:]
            if got != shape:
                raise ValueError(f"gradient tensor {name!r} has shape {got}, the layout says {shape}")


def output_dim(layout: Layout, reduction: str, *, d: int = 4096, s: int = 1) -> int:
    """The length of the reduced vector."""
    if reduction == "full":
        return layout.total
    if reduction == "stride":
        return -(-layout.total // _check_stride(s))
    if reduction == "sketch":
        return _check_dim(d)
    raise ValueError(f"extract.reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_stride(s: int) -> int:
    if isinstance(s, bool) or int(s) != s or s < 1:
        raise ValueError(f"extract.stride must be an integer >= 1, got {s!r}")
    return int(s)


def _check_dim(d: int) -> int:
    if isinstance(d, bool) or int(d) != d or not 1 <= d < 2 ** 31:
        raise ValueError(f"extract.dim must be an integer in [1, 2**31), got {d!r}")
    return int(d)


# --------------------------------------------------------------------------------------------------
# full and stride
# --------------------------------------------------------------------------------------------------

def full_vector(flat: Mapping[str, jax.Array], layout: Layout) -> jax.Array:
    """The concatenation of the tensors, each flattened row-major: float32 [P]."""
    layout.check(flat)
    return jnp.concatenate([jnp.ravel(flat[n]).astype(jnp.float32) for n in layout.names])


def stride_start(offset: int, s: int) -> int:
    """First local index of a tensor starting at global `offset` whose global index is a multiple of s."""
    return (-offset) % s


def stride_vector(flat: Mapping[str, jax.Array], layout: Layout, s: int) -> jax.Array:
    """Coordinates 0, s, 2s, ... of the concatenation (the paper's stride-s subsampling): [ceil(P/s)].

    Each tensor contributes its own strided slice, so the concatenation itself is never built."""
    s = _check_stride(s)
    layout.check(flat)
    parts = [jnp.ravel(flat[n])[stride_start(o, s)::s].astype(jnp.float32)
             for n, o in zip(layout.names, layout.offsets)]
    return jnp.concatenate(parts)


# --------------------------------------------------------------------------------------------------
# CountSketch
# --------------------------------------------------------------------------------------------------

def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with good avalanche ("lowbias32", C. Wellons); uint32 in and out."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def tensor_key(seed, name: str) -> jax.Array:
    """The hash key (uint32) of one tensor: a function of the seed and its name only, so a tensor's sketch
    does not change when other tensors are filtered in or out. `seed` may be traced."""
    return _mix32(jnp.asarray(seed).astype(jnp.uint32) + jnp.uint32(0x2545F491)) ^ jnp.uint32(
        zlib.crc32(name.encode()) & 0xFFFFFFFF)


def hash_buckets(shape: Sequence[int], key, d: int) -> tuple[jax.Array, jax.Array]:
    """(bucket int32 in [0, d), sign float32 in {-1, +1}) for every element of a tensor of `shape`.

    Computed from the elements' row-major indices (broadcasted iotas, so XLA fuses it into its consumer).
    Tensors must have fewer than 2**32 elements."""
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) >= 2 ** 32:
        raise ValueError(f"sketch: a tensor of shape {shape} has >= 2**32 elements; split it")
    index = jnp.zeros(shape, jnp.uint32)
    step = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(step)
        step *= shape[axis]
    h = _mix32(_mix32(index ^ key) + jnp.uint32(0x9E3779B9))
    bucket = ((h >> 1) % jnp.uint32(d)).astype(jnp.int32)
    sign = jnp.where((h & 1) == 1, 1.0, -1.0).astype(jnp.float32)
    return bucket, sign


SKETCH_METHODS = ("scatter", "matmul")
MATMUL_LANES = 128  # the matmul form splits a bucket b = 128 q + r (d must be a multiple of 128)


def sketch_vector(flat: Mapping[str, jax.Array], layout: Layout, d: int, seed, method: str = "scatter") -> jax.Array:
    """CountSketch of the concatenation to d dims, float32 [d]: sum over coordinates i of sign(i) x_i
    added into bucket(i). E[<Sx, Sy>] = <x, y> (see the module docstring for the variance). `seed` may be
    traced (e.g. vmapped over seeds).

    `method` says how the bucket sums are formed; both compute the same linear map from the same hash:
    `scatter` (a scatter-add, tensor by tensor in layout order, each in row-major order: the reference) or
    `matmul` (bucket_sums_matmul: on the matrix units, for TPUs, where a scatter is sorted first; its sums
    are accumulated in another order, so they differ from scatter's in the last bits of float32)."""
    d = _check_dim(d)
    layout.check(flat)
    if method not in SKETCH_METHODS:
        raise ValueError(f"sketch method must be one of {SKETCH_METHODS}, got {method!r}")
    if method == "matmul" and d % MATMUL_LANES:
        raise ValueError(f"the matmul sketch needs extract.dim a multiple of {MATMUL_LANES}, got {d}")
    out = jnp.zeros((d,), jnp.float32)
    for i, (name, shape) in enumerate(zip(layout.names, layout.shapes)):
        key = tensor_key(seed, name)
        if i:  # one tensor at a time: the hashes depend on shapes only, and unchained XLA computed many
            # tensors' buckets at once (4 bytes a coordinate, 2x the gradient at 3B widths on a TPU)
            out, key = jax.lax.optimization_barrier((out, key))
        bucket, sign = hash_buckets(shape, key, d)
        values = sign * flat[name].astype(jnp.float32)
        # the tensor's own shape, not raveled: raveling a tensor sharded along a minor axis would gather it
        # whole onto every device; unraveled, each device sums its own shard and the [d] partials are added
        out = out + bucket_sums_matmul(values, bucket, d) if method == "matmul" else out.at[bucket].add(values)
    return out


def bucket_sums_matmul(values: jax.Array, bucket: jax.Array, d: int) -> jax.Array:
    """sum_i values_i e_bucket(i), float32 [d], as matmuls: with bucket = 128 q + r, the [d / 128, 128]
    matrix of sums is A^T B, A[i, q] = values_i [q_i = q], B[i, r] = [r_i = r], contracted over every
    element i. B is 0/1 and each value is split exactly into three bfloat16 parts (8 + 8 + 8 mantissa bits,
    by truncating its bits), so every product the matrix unit forms is exact and only the float32
    accumulation rounds. O(128 d) flops per element on the matrix units, against a sort of the elements
    for a scatter on a TPU."""
    lanes = MATMUL_LANES
    q, r = bucket // lanes, bucket % lanes
    axes = tuple(range(values.ndim))
    rows = (q[..., None] == jnp.arange(d // lanes, dtype=q.dtype)).astype(jnp.bfloat16)
    lane = (r[..., None] == jnp.arange(lanes, dtype=r.dtype)).astype(jnp.bfloat16)
    sums = 0.0
    for part in _bf16_parts(values):  # one matmul each: XLA fuses the one-hot products into the dot
        sums = sums + jax.lax.dot_general(rows * part[..., None], lane, ((axes, axes), ((), ())),
                                          preferred_element_type=jnp.float32)
    return sums.reshape(d)


def _bf16_parts(x: jax.Array) -> list[jax.Array]:
    """Three bfloat16 arrays whose float32 sum is x exactly: its top 8 mantissa bits, the next 8, the rest
    (bit truncation, so no compiler can round or fold the split away)."""
    def top(v):
        return jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)

    hi = top(x)
    mid = top(x - hi)
    return [p.astype(jnp.bfloat16) for p in (hi, mid, x - hi - mid)]


def reduce_flat(flat: Mapping[str, jax.Array], layout: Layout, reduction: str, *, d: int = 4096, s: int = 1,
                seed: int = 0, method: str = "scatter") -> jax.Array:
    """One gradient {name: array} -> float32 [output_dim]; jax.vmap it for a batch of gradients. `method`:
    the sketch's (sketch_vector)."""
    if reduction == "full":
        return full_vector(flat, layout)
    if reduction == "stride":
        return stride_vector(flat, layout, s)
    if reduction == "sketch":
        return sketch_vector(flat, layout, d, seed, method)
    raise ValueError(f"extract.reduction must be one of {REDUCTIONS}, got {reduction!r}")


# --------------------------------------------------------------------------------------------------
# Gram / cosine matrices and the calibration-stability curve (numpy / jnp on small arrays)
# --------------------------------------------------------------------------------------------------

def gram_blockwise(rows_td: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """G = X X^T (float64 [T, T]) of a [T, P] array (typically a disk memmap), reading `block` columns at a
    time: memory O(T * block), never the whole array."""
    t, p = rows_td.shape
    gram = np.zeros((t, t), np.float64)
    for start in range(0, p, block):
        x = np.asarray(rows_td[:, start:start + block], dtype=np.float64)
        gram += x @ x.T
    return gram


def cosine_from_gram(gram_tt: np.ndarray) -> np.ndarray:
    """Cosine matrix from a Gram matrix (float64 [T, T]); a zero diagonal entry is an error."""
    g = np.asarray(gram_tt, np.float64)
    diag = np.diag(g)
    if (diag <= 0).any() or not np.isfinite(g).all():
        raise ValueError(f"gram matrix: rows {np.flatnonzero(diag <= 0).tolist()} have zero norm, "
                         "or an entry is not finite")
    inv = 1.0 / np.sqrt(diag)
    cos = np.clip(g * inv[:, None] * inv[None, :], -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return cos


def example_weights(per_example: str, norms_n: np.ndarray, tokens_n: np.ndarray) -> np.ndarray:
    """The weight of each example's gradient in its task's mean (extract.per_example): mean -> 1,
    unit -> 1/|g_i| (mean of unit vectors), tokens -> supervised tokens of the example."""
    norms_n = np.asarray(norms_n, np.float64)
    if per_example == "mean":
        return np.ones_like(norms_n)
    if per_example == "unit":
        return 1.0 / np.maximum(norms_n, np.finfo(np.float64).tiny)
    if per_example == "tokens":
        return np.asarray(tokens_n, np.float64)
    raise ValueError(f"extract.per_example must be one of mean, unit, tokens, got {per_example!r}")


def stability_cosines(example_sketch_nd: np.ndarray, weights_n: np.ndarray, m: int, draws: int,
                      rng: np.random.Generator, reference_d: np.ndarray | None = None) -> np.ndarray:
    """Cosines [draws] between the weighted mean of m random examples (without replacement) and a reference
    (both in sketch space): `reference_d`, a mean over examples disjoint from these (the paper's protocol,
    unbiased), or, when None, the weighted mean of all n, which contains the subset and so reads high."""
    e = np.asarray(example_sketch_nd, np.float64)
    w = np.asarray(weights_n, np.float64)
    n = e.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"stability: subset size m={m} outside [1, n={n}]")
    ref = w @ e / w.sum() if reference_d is None else np.asarray(reference_d, np.float64)
    out = np.empty(draws)
    for k in range(draws):
        pick = rng.choice(n, size=m, replace=False)
        sub = w[pick] @ e[pick] / w[pick].sum()
        out[k] = sub @ ref / max(np.linalg.norm(sub) * np.linalg.norm(ref), np.finfo(np.float64).tiny)
    return out
