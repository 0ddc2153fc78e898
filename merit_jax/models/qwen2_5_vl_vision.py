"""The Qwen2.5-VL vision tower in Flax NNX, numerically the same as transformers' `Qwen2_5_VisionTransformer...`.

pixel_values [P, C*2*14*14] (processor order) -> a 3-D patch embedding (a Conv3d with stride = kernel, i.e. a
matmul on flattened patches) -> `depth` blocks of RMSNorm + attention with 2-D rotary embeddings + RMSNorm +
SwiGLU, window attention except in `fullatt_block_indexes` -> the 2x2 patch merger -> [U, out_hidden]
(processor order). The window order, its inverse and the attention segments come from the host
(`merit_jax.models.vision_layout`). Parameters are named as HF names its `visual.*` tensors.

Shapes: P patches (window order inside the tower), U = P/4 merged units, D widths.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from merit_jax.models import attention
from merit_jax.models.config import ModelConfig
from merit_jax.models.qwen2 import _REMAT_POLICIES, DTypePolicy, Linear, RMSNorm, _param, scan_blocks
from merit_jax.models.vision_layout import SegmentGather, VisionLayout

Array = jax.Array
VISION_NORM_EPS = 1e-6  # transformers hard-codes it for every vision norm


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int:
        """Side of a window in merged units (HF's `vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size



def vision_config_from_hf(v: dict, text: ModelConfig, source: str) -> VisionConfig:
    def scalar(key, default, alias=None):
        x = v.get(key, v.get(alias, default) if alias else default)
        if isinstance(x, (list, tuple)):
            if len(set(x)) != 1:
                raise ValueError(f"{source}: vision_config.{key}={x}: only square patches are supported")
            x = x[0]
        return int(x)

    rope = v.get("rope_parameters") or {}
    arch = VisionConfig(
        depth=int(v.get("depth", 32)), hidden_size=int(v.get("hidden_size", 3584)),
        intermediate_size=int(v.get("intermediate_size", 3420)), num_heads=int(v.get("num_heads", 16)),
        out_hidden_size=int(v.get("out_hidden_size", 3584)), in_channels=scalar("in_channels", 3, "in_chans"),
        patch_size=scalar("patch_size", 14), temporal_patch_size=scalar("temporal_patch_size", 2),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)), window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        rope_theta=float(rope.get("rope_theta", 10000.0)), hidden_act=v.get("hidden_act", "silu"))
    if arch.out_hidden_size != text.hidden_size:
        raise ValueError(f"{source}: vision_config.out_hidden_size={arch.out_hidden_size} differs from the text "
                         f"hidden_size={text.hidden_size}")
    if arch.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"{source}: vision_config.hidden_act {arch.hidden_act!r} is not supported "
                         f"({sorted(_ACTIVATIONS)})")
    if arch.window_units < 1:
        raise ValueError(f"{source}: vision_config.window_size={arch.window_size} is smaller than one merged unit")
    return arch


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
                "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


# ------------------------------------------------------------------------------------------- vision tower


class PatchConv(nnx.Module):
    """Conv3d(kernel = stride = (2, 14, 14), no bias) on flattened patches: x [P, C*2*14*14] @ W^T.

    `weight` keeps HF's Conv3d layout [D, C, T, p, p] (so it converts as is)."""

    def __init__(self, arch: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        shape = (arch.hidden_size, arch.in_channels, arch.temporal_patch_size, arch.patch_size, arch.patch_size)
        self.weight = _param(rngs, shape, ("embed", None, None, None, None), policy.param_dtype)
        self.dtype = policy.compute_dtype

    def __call__(self, pixels_pc: Array) -> Array:
        w = self.weight[...].astype(self.dtype)
        return pixels_pc.astype(self.dtype) @ w.reshape(w.shape[0], -1).T


class PatchEmbed(nnx.Module):
    def __init__(self, arch: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.proj = PatchConv(arch, policy, rngs)

    def __call__(self, pixels_pc: Array) -> Array:
        return self.proj(pixels_pc)


def vision_rope(rope_hw_p2: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin float32 [P, H]: the first quarter of frequencies rotates by row, the second by column,
    and the halves repeat (HF's axial layout)."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = jnp.asarray(rope_hw_p2).astype(jnp.float32)[..., None] * inv_freq  # [P, 2, H/4]
    freqs = freqs.reshape(freqs.shape[0], -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x_pnh: Array, cos_ph: Array, sin_ph: Array) -> Array:
    x32 = x_pnh.astype(jnp.float32)  # HF rotates vision q/k in fp32
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos_ph[:, None] + rotated * sin_ph[:, None]).astype(x_pnh.dtype)


def segment_attention(q_pnh: Array, k_pnh: Array, v_pnh: Array, seg: SegmentGather, implementation=None) -> Array:
    """Bidirectional attention inside each segment; [P, N, H] in and out. `implementation="splash"`: the
    Pallas kernel (no [L, L] scores) for segment lengths that are multiples of 128."""
    q, k, v = (x[seg.gather] for x in (q_pnh, k_pnh, v_pnh))  # [S, L, N, H]
    piece = jnp.asarray(seg.piece)
    if implementation == "splash" and attention.supported(piece.shape[1]):
        out = attention.splash_segments(q, k, v, piece)  # empty slots (-1) attend among themselves: unused
    else:
        mask = ((piece[:, :, None] == piece[:, None, :]) & (piece[:, None, :] >= 0))[:, None]  # [S, 1, L, L]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                           implementation=None if implementation == "splash" else implementation)
    s, length, n, h = out.shape
    return out.reshape(s * length, n, h)[seg.scatter]


class VisionAttention(nnx.Module):
    def __init__(self, arch: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        d = arch.hidden_size
        self.qkv = Linear(d, 3 * d, ("embed", "heads"), bias=True, policy=policy, rngs=rngs)
        self.proj = Linear(d, d, ("heads", "embed"), bias=True, policy=policy, rngs=rngs)
        self.n, self.h = arch.num_heads, arch.head_dim
        self.implementation = None if policy.attention == "xla" else policy.attention

    def __call__(self, x_pd: Array, cos_ph: Array, sin_ph: Array, seg: SegmentGather) -> Array:
        p = x_pd.shape[0]
        qkv = self.qkv(x_pd).reshape(p, 3, self.n, self.h)
        q, k, v = _rotate(qkv[:, 0], cos_ph, sin_ph), _rotate(qkv[:, 1], cos_ph, sin_ph), qkv[:, 2]
        out = segment_attention(q, k, v, seg, self.implementation)
        return self.proj(out.reshape(p, self.n * self.h))


class VisionMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, arch: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        d, f = arch.hidden_size, arch.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=True, policy=policy, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), bias=True, policy=policy, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), bias=True, policy=policy, rngs=rngs)
        self.act = arch.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.down_proj(_ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, arch: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(arch.hidden_size, VISION_NORM_EPS, policy)
        self.attn = VisionAttention(arch, policy, rngs)
        self.norm2 = RMSNorm(arch.hidden_size, VISION_NORM_EPS, policy)
        self.mlp = VisionMLP(arch, policy, rngs)

    def __call__(self, x_pd, cos_ph, sin_ph, seg):
        x_pd = x_pd + self.attn(self.norm1(x_pd), cos_ph, sin_ph, seg)
        return x_pd + self.mlp(self.norm2(x_pd))


class GELU(nnx.Module):
    """torch.nn.GELU() (exact erf form); a parameterless slot so the merger's layers keep HF's indices."""

    def __call__(self, x: Array) -> Array:
        return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 group of consecutive patches (4*D) -> Linear -> GELU -> Linear -> out width."""

    def __init__(self, arch: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        d4 = arch.hidden_size * arch.merge_unit
        self.ln_q = RMSNorm(arch.hidden_size, VISION_NORM_EPS, policy)
        self.mlp = nnx.List([Linear(d4, d4, ("embed", "mlp"), bias=True, policy=policy, rngs=rngs), GELU(),
                             Linear(d4, arch.out_hidden_size, ("mlp", "embed"), bias=True, policy=policy,
                                    rngs=rngs)])
        self.d4 = d4

    def __call__(self, x_pd: Array) -> Array:
        x = self.ln_q(x_pd).reshape(-1, self.d4)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nnx.Module):
    """pixel_values [P, C*T*p*p] (processor order) -> merged image features [U, out_hidden] (processor order)."""

    def __init__(self, arch: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.patch_embed = PatchEmbed(arch, policy, rngs)
        self.blocks = nnx.List([VisionBlock(arch, policy, rngs) for _ in range(arch.depth)])
        self.merger = PatchMerger(arch, policy, rngs)
        self.arch, self.policy = arch, policy

    def __call__(self, pixel_values: Array, layout: VisionLayout) -> Array:
        n = layout.patch_order.shape[0]
        if pixel_values.shape[0] > n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, the layout {n}")
        pixel_values = jnp.pad(pixel_values, ((0, n - pixel_values.shape[0]), (0, 0)))  # bucket padding
        x_pd = self.patch_embed(pixel_values)[jnp.asarray(layout.patch_order)]
        cos, sin = vision_rope(layout.rope_hw, self.arch.head_dim, self.arch.rope_theta)
        full = tuple(i in self.arch.fullatt_block_indexes for i in range(len(self.blocks)))
        blocks = self._scanned if self.policy.scan_layers else self._unrolled
        return self.merger(blocks(x_pd, cos, sin, layout, full))[jnp.asarray(layout.unit_restore)]

    def _unrolled(self, x_pd, cos, sin, layout: VisionLayout, full: tuple[bool, ...]) -> Array:
        for block, is_full in zip(self.blocks, full):
            seg = layout.full if is_full else layout.window
            if self.policy.remat != "none":  # jax.checkpoint over the block as a closure: under the jax.vmap over
                # rows (embed) nnx.remat fails to write the block's parameters back ("Cannot mutate Param from a
                # different trace level"), so no VL train step with remat could be traced
                block_fn = jax.checkpoint(lambda x, c, s_, g, blk=block: blk(x, c, s_, g),
                                          policy=_REMAT_POLICIES[self.policy.remat])
                x_pd = block_fn(x_pd, cos, sin, seg)
            else:
                x_pd = block(x_pd, cos, sin, seg)
        return x_pd

    def _scanned(self, x_pd, cos, sin, layout: VisionLayout, full: tuple[bool, ...]) -> Array:
        """The blocks as one scan (`scan_blocks`). Window and full-attention blocks differ only in their segments
        (of different shapes), so each step picks its attention by the block's flag with a `lax.cond`: one
        branch runs per block (the flag is not batched by the vmap over rows)."""
        def step(block, x, is_full):
            if all(full) or not any(full):
                return block(x, cos, sin, layout.full if full[0] else layout.window)
            return jax.lax.cond(is_full, lambda x: block(x, cos, sin, layout.full),
                                lambda x: block(x, cos, sin, layout.window), x)

        return scan_blocks(self.blocks, x_pd, step, dtype=self.policy.compute_dtype, remat=self.policy.remat,
                           per_block=jnp.asarray(full))
