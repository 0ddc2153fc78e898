"""Qwen2.5-VL in Flax NNX, numerically the same as transformers' `Qwen2_5_VLForConditionalGeneration` (images).

    model = Qwen2_5_VLForConditionalGeneration.from_hf_config(hf_config_dict, rngs=nnx.Rngs(0))
    logits = model(input_ids, pixel_values=pv, image_grid_thw=thw)         # float32 [B, T, V]

`pixel_values` [P, C*2*14*14] and `image_grid_thw` [N, 3] mean what the Qwen2-VL image processor returns
(patches of all images concatenated; each image's (t, h, w) patch grid). Each image occupies
t*h*w/4 `<|image_pad|>` tokens in `input_ids`; their embeddings are replaced by the vision tower's output.

Parts, named as the Hugging Face checkpoint names its tensors (`visual.*`, `model.*`, `lm_head.*`), so that
`merit_jax.io.hf.hf_key` maps every flat parameter name to its HF tensor:
  visual   the vision tower: 3-D patch embedding (a Conv3d with stride = kernel, i.e. a matmul on flattened
           patches), `depth` blocks of RMSNorm + attention with 2-D rotary embeddings + RMSNorm + SwiGLU,
           window attention except in `fullatt_block_indexes`, and the 2x2 patch merger;
  model    the Qwen2 decoder (`merit_jax.models.qwen2.Qwen2Model`), driven with multimodal RoPE
           (`merit_jax.models.mrope`);
  lm_head  absent when the embeddings are tied.

Window attention: the reordering of patches into windows, its inverse and the attention segments are computed
on the host from `image_grid_thw` (`merit_jax.models.vision_layout`); under `jax.jit` pass
`vision_layout=vision_layout(image_grid_thw, model.vl_config.vision)` (`bucket=True` rounds the shapes up to
powers of two so that few recur). Attention runs per segment on a padded [segments, length] gather, so cost
grows with the frames' and windows' sizes, never with the whole batch squared.

Shapes: P patches (window order inside the tower), U = P/4 merged units, B batch, T sequence, D widths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax.models import attention
from merit_jax.models.config import ModelConfig
from merit_jax.models.generate import _init_caches, _sample, _with_index
from merit_jax.models.mrope import image_token_index, mrope_cos_sin, mrope_positions
from merit_jax.models.qwen2 import (_REMAT_POLICIES, DTypePolicy, Linear, Qwen2Model, RMSNorm, _param,
                                    make_attention_mask)
from merit_jax.models.vision_layout import SegmentGather, VisionLayout, next_pow2, vision_layout
from merit_jax.sharding import constrain

Array = jax.Array
VISION_NORM_EPS = 1e-6  # transformers hard-codes it for every vision norm


# ----------------------------------------------------------------------------------------------- config


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


@dataclasses.dataclass(frozen=True)
class VLConfig:
    text: ModelConfig
    vision: VisionConfig
    mrope_section: tuple[int, ...] = (16, 24, 24)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "VLConfig":
        """Reads a `qwen2_5_vl` config.json: transformers 5's nested `text_config` or the released flat one."""
        if hf.get("model_type") != "qwen2_5_vl":
            raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'qwen2_5_vl'")
        text = dict(hf.get("text_config") or {})
        for k, v in hf.items():  # flat (pre-v5) configs keep the text fields at the top level
            if k not in ("text_config", "vision_config"):
                text.setdefault(k, v)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if text.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing required text config field(s) {missing}")
        if text.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {text['hidden_act']!r} is not supported (only 'silu')")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only default/mrope)")
        n_heads = int(text["num_attention_heads"])
        head_dim = int(text["hidden_size"]) // n_heads  # transformers ignores any `head_dim` field here
        section = tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24)))
        if sum(section) != head_dim // 2:
            raise ValueError(f"{source}: mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}")
        tied = bool(hf.get("tie_word_embeddings") or (hf.get("text_config") or {}).get("tie_word_embeddings"))
        text_cfg = ModelConfig(
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]), num_layers=int(text["num_hidden_layers"]),
            num_heads=n_heads, num_kv_heads=int(text.get("num_key_value_heads") or n_heads), head_dim=head_dim,
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), tie_word_embeddings=tied,
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)))
        return cls(text=text_cfg, vision=_vision_from_hf(hf.get("vision_config") or {}, text_cfg, source),
                   mrope_section=section,
                   **{k: int(hf[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id") if hf.get(k) is not None})


def _vision_from_hf(v: dict, text: ModelConfig, source: str) -> VisionConfig:
    def scalar(key, default, alias=None):
        x = v.get(key, v.get(alias, default) if alias else default)
        if isinstance(x, (list, tuple)):
            if len(set(x)) != 1:
                raise ValueError(f"{source}: vision_config.{key}={x}: only square patches are supported")
            x = x[0]
        return int(x)

    rope = v.get("rope_parameters") or {}
    cfg = VisionConfig(
        depth=int(v.get("depth", 32)), hidden_size=int(v.get("hidden_size", 3584)),
        intermediate_size=int(v.get("intermediate_size", 3420)), num_heads=int(v.get("num_heads", 16)),
        out_hidden_size=int(v.get("out_hidden_size", 3584)), in_channels=scalar("in_channels", 3, "in_chans"),
        patch_size=scalar("patch_size", 14), temporal_patch_size=scalar("temporal_patch_size", 2),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)), window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        rope_theta=float(rope.get("rope_theta", 10000.0)), hidden_act=v.get("hidden_act", "silu"))
    if cfg.out_hidden_size != text.hidden_size:
        raise ValueError(f"{source}: vision_config.out_hidden_size={cfg.out_hidden_size} differs from the text "
                         f"hidden_size={text.hidden_size}")
    if cfg.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"{source}: vision_config.hidden_act {cfg.hidden_act!r} is not supported "
                         f"({sorted(_ACTIVATIONS)})")
    if cfg.window_units < 1:
        raise ValueError(f"{source}: vision_config.window_size={cfg.window_size} is smaller than one merged unit")
    return cfg


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
                "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


def _concrete(x, what: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"{what} is traced (inside jax.jit): compute it on the host and pass it in "
                         "(`vision_layout=vision_layout(image_grid_thw, model.vl_config.vision)`)") from None


# ------------------------------------------------------------------------------------------- vision tower


class PatchConv(nnx.Module):
    """Conv3d(kernel = stride = (2, 14, 14), no bias) on flattened patches: x [P, C*2*14*14] @ W^T.

    `weight` keeps HF's Conv3d layout [D, C, T, p, p] (so it converts as is)."""

    def __init__(self, cfg: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.weight = _param(rngs, shape, ("embed", None, None, None, None), policy.param_dtype)
        self.dtype = policy.compute_dtype

    def __call__(self, pixels_pc: Array) -> Array:
        w = self.weight[...].astype(self.dtype)
        return pixels_pc.astype(self.dtype) @ w.reshape(w.shape[0], -1).T


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.proj = PatchConv(cfg, policy, rngs)

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
    def __init__(self, cfg: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.qkv = Linear(d, 3 * d, ("embed", "heads"), bias=True, policy=policy, rngs=rngs)
        self.proj = Linear(d, d, ("heads", "embed"), bias=True, policy=policy, rngs=rngs)
        self.n, self.h = cfg.num_heads, cfg.head_dim
        self.implementation = None if policy.attention == "xla" else policy.attention

    def __call__(self, x_pd: Array, cos_ph: Array, sin_ph: Array, seg: SegmentGather) -> Array:
        p = x_pd.shape[0]
        qkv = self.qkv(x_pd).reshape(p, 3, self.n, self.h)
        q, k, v = _rotate(qkv[:, 0], cos_ph, sin_ph), _rotate(qkv[:, 1], cos_ph, sin_ph), qkv[:, 2]
        out = segment_attention(q, k, v, seg, self.implementation)
        return self.proj(out.reshape(p, self.n * self.h))


class VisionMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, cfg: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=True, policy=policy, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), bias=True, policy=policy, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), bias=True, policy=policy, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.down_proj(_ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS, policy)
        self.attn = VisionAttention(cfg, policy, rngs)
        self.norm2 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS, policy)
        self.mlp = VisionMLP(cfg, policy, rngs)

    def __call__(self, x_pd, cos_ph, sin_ph, seg):
        x_pd = x_pd + self.attn(self.norm1(x_pd), cos_ph, sin_ph, seg)
        return x_pd + self.mlp(self.norm2(x_pd))


class GELU(nnx.Module):
    """torch.nn.GELU() (exact erf form); a parameterless slot so the merger's layers keep HF's indices."""

    def __call__(self, x: Array) -> Array:
        return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 group of consecutive patches (4*D) -> Linear -> GELU -> Linear -> out width."""

    def __init__(self, cfg: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        d4 = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, VISION_NORM_EPS, policy)
        self.mlp = nnx.List([Linear(d4, d4, ("embed", "mlp"), bias=True, policy=policy, rngs=rngs), GELU(),
                             Linear(d4, cfg.out_hidden_size, ("mlp", "embed"), bias=True, policy=policy,
                                    rngs=rngs)])
        self.d4 = d4

    def __call__(self, x_pd: Array) -> Array:
        x = self.ln_q(x_pd).reshape(-1, self.d4)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nnx.Module):
    """pixel_values [P, C*T*p*p] (processor order) -> merged image features [U, out_hidden] (processor order)."""

    def __init__(self, cfg: VisionConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.patch_embed = PatchEmbed(cfg, policy, rngs)
        self.blocks = nnx.List([VisionBlock(cfg, policy, rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, policy, rngs)
        self.cfg, self.policy = cfg, policy

    def __call__(self, pixel_values: Array, layout: VisionLayout) -> Array:
        n = layout.patch_order.shape[0]
        if pixel_values.shape[0] > n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, the layout {n}")
        pixel_values = jnp.pad(pixel_values, ((0, n - pixel_values.shape[0]), (0, 0)))  # bucket padding
        x_pd = self.patch_embed(pixel_values)[jnp.asarray(layout.patch_order)]
        cos, sin = vision_rope(layout.rope_hw, self.cfg.head_dim, self.cfg.rope_theta)
        for i, block in enumerate(self.blocks):
            seg = layout.full if i in self.cfg.fullatt_block_indexes else layout.window
            if self.policy.remat != "none":  # jax.checkpoint over the block as a closure: under the jax.vmap over
                # rows (embed) nnx.remat fails to write the block's parameters back ("Cannot mutate Param from a
                # different trace level"), so no VL train step with remat could be traced
                block_fn = jax.checkpoint(lambda x, c, s_, g, blk=block: blk(x, c, s_, g),
                                          policy=_REMAT_POLICIES[self.policy.remat])
                x_pd = block_fn(x_pd, cos, sin, seg)
            else:
                x_pd = block(x_pd, cos, sin, seg)
        return self.merger(x_pd)[jnp.asarray(layout.unit_restore)]


# ------------------------------------------------------------------------------------------------ VL model


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """input_ids [B, T] (+ images) -> logits float32 [B, T, V].

    `config` is the language model's ModelConfig (so text-only tools, e.g. `generate`, work unchanged);
    `vl_config` the whole VLConfig."""

    def __init__(self, cfg: VLConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                 remat: str = "none", attention: str = "xla"):
        if remat not in ("none", *_REMAT_POLICIES):
            raise ValueError(f"model.remat={remat!r}: expected one of none, {', '.join(_REMAT_POLICIES)}")
        policy = DTypePolicy(jnp.dtype(param_dtype), jnp.dtype(compute_dtype), remat, attention)
        self.vl_config, self.config, self.policy = cfg, cfg.text, policy
        self.visual = VisionTransformer(cfg.vision, policy, rngs)
        self.model = Qwen2Model(cfg.text, policy, rngs)
        self.lm_head = (None if cfg.text.tie_word_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False,
                               policy=policy, rngs=rngs))

    @classmethod
    def from_hf_config(cls, hf_cfg: dict, *, rngs: nnx.Rngs, source: str = "config.json", **policy):
        return cls(VLConfig.from_hf(hf_cfg, source), rngs=rngs, **policy)

    def logits(self, h_btd: Array) -> Array:
        h_btd = h_btd.astype(self.policy.compute_dtype)
        out = self.model.embed_tokens.attend(h_btd) if self.lm_head is None else self.lm_head(h_btd)
        return constrain(out.astype(jnp.float32), ("batch", "seq", "act_vocab"))

    def image_features(self, pixel_values: Array, image_grid_thw=None, vision_layout: VisionLayout | None = None):
        """Merged image features [U, D_text] in the order of the images' tokens (bucket padding at the end).

        Called on concrete arrays it runs compiled (`jax.jit`); inside a trace, traced (needs vision_layout)."""
        if vision_layout is None:
            if image_grid_thw is None:
                raise ValueError("pixel_values needs image_grid_thw (or a precomputed vision_layout)")
            vision_layout = vision_layout_for(self, _concrete(image_grid_thw, "image_grid_thw"))
        if _is_traced(pixel_values, vision_layout):
            return self.visual(jnp.asarray(pixel_values), vision_layout)
        graphdef, state = nnx.split(self)
        return _jit_image_features(graphdef, state, jnp.asarray(pixel_values), vision_layout)

    def embed(self, input_ids: Array, pixel_values=None, image_grid_thw=None, vision_layout=None,
              valid_bt: Array | None = None) -> Array:
        """Token embeddings with each image token's replaced by its image feature (in order)."""
        x_btd = self.model.embed_tokens(input_ids).astype(self.policy.compute_dtype)
        if pixel_values is None:
            return x_btd
        if vision_layout is None:
            vision_layout = vision_layout_for(self, _concrete(image_grid_thw, "image_grid_thw"))
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.ndim == 3:  # per-row images [B, P, D], a stacked layout: each row picks its own
            feats_bud = jax.vmap(self.visual)(pixel_values, vision_layout).astype(x_btd.dtype)
            is_image = input_ids == self.vl_config.image_token_id
            if valid_bt is not None:
                is_image &= valid_bt
            k = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats_bud.shape[1] - 1)
            picked = jnp.take_along_axis(feats_bud, k[..., None], axis=1)
            return jnp.where(is_image[..., None], picked, x_btd)
        feats_ud = self.visual(pixel_values, vision_layout).astype(x_btd.dtype)
        is_image, k = image_token_index(input_ids, self.vl_config.image_token_id, valid_bt)
        picked = feats_ud[jnp.clip(k, 0, feats_ud.shape[0] - 1)]
        return jnp.where(is_image[..., None], picked, x_btd)

    def check_image_tokens(self, input_ids, image_grid_thw, attention_mask=None) -> None:
        """ValueError unless input_ids hold as many image tokens as image_grid_thw implies (concrete arrays)."""
        ids = np.asarray(input_ids)
        is_image = ids == self.vl_config.image_token_id
        if attention_mask is not None:
            is_image &= np.asarray(attention_mask).astype(bool)
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        want = int(np.prod(grid, axis=-1).sum()) // self.vl_config.vision.merge_unit
        if int(is_image.sum()) != want:
            raise ValueError(f"Image features and image tokens do not match: {int(is_image.sum())} <|image_pad|> "
                             f"tokens (id {self.vl_config.image_token_id}) in input_ids, image_grid_thw "
                             f"{grid.tolist()} implies {want}")

    def rope(self, input_ids, image_grid_thw=None, attention_mask=None, segment_ids=None, positions=None):
        """(cos, sin) [B, T, H] for M-RoPE; `positions` may be given as [3, B, T] (or [B, T]: text only)."""
        c = self.vl_config
        if positions is None:
            positions, _ = mrope_positions(input_ids, image_grid_thw, image_token_id=c.image_token_id,
                                           spatial_merge_size=c.vision.spatial_merge_size,
                                           attention_mask_bt=attention_mask, segment_ids_bt=segment_ids)
        elif positions.ndim == 2:
            if image_grid_thw is not None:
                raise ValueError("2-D positions with images: pass positions=None (M-RoPE positions are computed "
                                 "from input_ids, image_grid_thw and segment_ids) or M-RoPE positions [3, B, T]")
            positions = jnp.broadcast_to(positions, (3, *positions.shape))
        return mrope_cos_sin(positions, c.text.head_dim, c.text.rope_theta, c.mrope_section)

    def __call__(self, input_ids: Array, pixel_values: Array | None = None, image_grid_thw: Array | None = None,
                 attention_mask: Array | None = None, positions: Array | None = None,
                 segment_ids: Array | None = None, vision_layout: VisionLayout | None = None,
                 pixel_values_videos=None, video_grid_thw=None) -> Array:
        """Full-sequence forward: HF's meanings of input_ids, pixel_values, image_grid_thw, attention_mask
        ([B, T], 1 = real token); packed rows by `segment_ids` [B, T] (M-RoPE restarts per segment).

        On concrete arrays: checks the image tokens, computes the layout on the host and runs one compiled
        forward. Inside a trace (jit, grad) images need `vision_layout` (see `vision_layout`)."""
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise NotImplementedError("Qwen2.5-VL videos are not supported yet (images only)")
        if pixel_values is None:
            image_grid_thw = vision_layout = None
        args = dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    attention_mask=attention_mask, positions=positions, segment_ids=segment_ids,
                    vision_layout=vision_layout)
        if _is_traced(*args.values()):
            return self.forward(**args)
        if pixel_values is not None and np.ndim(pixel_values) == 2:  # per-row [B, P, D] come with their layout
            if image_grid_thw is None:
                raise ValueError("pixel_values needs image_grid_thw")
            valid = attention_mask if segment_ids is None else np.asarray(segment_ids) > 0
            self.check_image_tokens(input_ids, image_grid_thw, valid)
            if vision_layout is None:
                args["vision_layout"] = vision_layout_for(self, np.asarray(image_grid_thw))
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, jax.tree.map(jnp.asarray, args))

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, positions=None,
                segment_ids=None, vision_layout=None) -> Array:
        """The traced forward behind __call__ (no host-side checks)."""
        return self.logits(self.hidden(input_ids, pixel_values, image_grid_thw, attention_mask, positions,
                                       segment_ids, vision_layout))

    def hidden(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, positions=None,
               segment_ids=None, vision_layout=None) -> Array:
        """The final hidden states h [B, T, D] (traced; images need `vision_layout`), as Qwen2ForCausalLM.hidden."""
        input_ids = jnp.asarray(input_ids)
        valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        x_btd = self.embed(input_ids, pixel_values, image_grid_thw, vision_layout, valid)
        cos, sin = self.rope(input_ids, image_grid_thw, attention_mask, segment_ids, positions)
        b, t = input_ids.shape
        order_bt = jnp.broadcast_to(jnp.arange(t), (b, t))  # causality is by index, not by position id
        mask = make_attention_mask(order_bt, segment_ids, attention_mask)
        if self.policy.attention == "splash":  # the kernel takes segment ids (0: padding), never a [T, S] mask
            mask = segment_ids if segment_ids is not None else (
                attention_mask if attention_mask is not None else jnp.ones((b, t), jnp.int32))
        h_btd, _ = self.model(input_ids, cos_sin(cos, sin), mask, inputs_embeds_btd=x_btd)
        return h_btd


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jit_forward(graphdef, state, args):
    return nnx.merge(graphdef, state).forward(**args)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jit_image_features(graphdef, state, pixel_values, layout):
    return nnx.merge(graphdef, state).visual(pixel_values, layout)


def cos_sin(cos_bth: Array, sin_bth: Array) -> Array:
    """The precomputed-RoPE argument of `Qwen2Model`: [2, B, T, H], which unpacks into (cos, sin). (A plain
    tuple trips Qwen2Model's `positions.ndim == 2` test, which runs before it unpacks the pair.)"""
    return jnp.stack([cos_bth, sin_bth])


def vision_layout_for(model: Qwen2_5_VLForConditionalGeneration, image_grid_thw, bucket: bool = False):
    return vision_layout(image_grid_thw, model.vl_config.vision, bucket=bucket)


def language_model_filter(name: str) -> bool:
    """True for parameters of the language side (what gradient extraction uses by default)."""
    return not name.startswith("visual/")


# ---------------------------------------------------------------------------------------------- generate


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate_vl(graphdef, state, input_ids_bt, mask_bt, pixel_values, image_grid_thw, layout, key, eos_id,
                 pad_id, *, max_new_tokens: int, temperature: float, top_k: int):
    model = nnx.merge(graphdef, state)
    b, t = input_ids_bt.shape
    total = t + max_new_tokens
    key_valid_bs = jnp.concatenate([mask_bt, jnp.ones((b, max_new_tokens), mask_bt.dtype)], axis=1)
    order_bs = jnp.broadcast_to(jnp.arange(total), (b, total))
    caches = _init_caches(model.config, b, total, model.policy.compute_dtype)
    c = model.vl_config

    # prefill: image features scattered into the embeddings, M-RoPE positions
    valid = mask_bt.astype(bool)
    x_btd = model.embed(input_ids_bt, pixel_values, image_grid_thw, layout, valid)
    positions, deltas_b = mrope_positions(input_ids_bt, image_grid_thw, image_token_id=c.image_token_id,
                                          spatial_merge_size=c.vision.spatial_merge_size, attention_mask_bt=mask_bt)
    cos, sin = mrope_cos_sin(positions, c.text.head_dim, c.text.rope_theta, c.mrope_section)
    mask = make_attention_mask(order_bs[:, :t], None, key_valid_bs, order_bs)
    h_btd, caches = model.model(input_ids_bt, cos_sin(cos, sin), mask, _with_index(caches, jnp.int32(0)),
                                inputs_embeds_btd=x_btd)
    key, sub = jax.random.split(key)
    token_b = _sample(model.logits(h_btd[:, -1:])[:, 0], sub, temperature, top_k)
    # decoding is text-like: all three axes at (real tokens so far) + rope_delta = max position + 1 + i
    next_pos_b = valid.sum(axis=1).astype(jnp.int32) + deltas_b
    out_bn = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_b)
    done_b = token_b == eos_id

    def step(i, carry):
        out_bn, caches, done_b, key = carry
        index = jnp.int32(t) + i
        mask = make_attention_mask(jnp.full((b, 1), index), None, key_valid_bs, order_bs)
        h_btd, caches = model.model(out_bn[:, i][:, None], (next_pos_b + i)[:, None], mask,
                                    _with_index(caches, index))
        key, sub = jax.random.split(key)
        new_b = jnp.where(done_b, pad_id, _sample(model.logits(h_btd)[:, 0], sub, temperature, top_k))
        return out_bn.at[:, i + 1].set(new_b), caches, done_b | (new_b == eos_id), key

    out_bn, *_ = jax.lax.fori_loop(0, max_new_tokens - 1, step, (out_bn, caches, done_b, key))
    return out_bn


def generate_vl(model: Qwen2_5_VLForConditionalGeneration, input_ids, attention_mask=None, pixel_values=None,
                image_grid_thw=None, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                eos_id: int = -1, pad_id: int = 0, seed: int = 0, bucket: bool = False,
                vision_layout: VisionLayout | None = None) -> np.ndarray:
    """New tokens [B, max_new_tokens] after left-padded image prompts (greedy when temperature == 0).

    The prompt is prefilled with image features and M-RoPE positions; each new token then sits at the
    row's largest position + 1 + its index on all three axes (transformers' rope_deltas rule).
    bucket: pad the images' arrays to powers of two (zero patches, zero grid rows), so that calls with other
    images reuse a few compilations (evaluation loops).
    vision_layout: the images' layout computed on the host with fixed `sizes` (vision_layout.vision_layout;
    `pixel_values` is padded to its patches; pad `image_grid_thw` with zero rows yourself): one compilation
    for every batch of an evaluation (merit_jax.evaluate fits the sizes on all its generation batches).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    layout = None
    if pixel_values is not None:
        image_grid_thw = np.asarray(image_grid_thw).reshape(-1, 3)
        layout = vision_layout if vision_layout is not None else vision_layout_for(model, image_grid_thw, bucket)
        layout = jax.tree.map(jnp.asarray, layout)
        if bucket or vision_layout is not None:
            pixel_values = np.pad(pixel_values, ((0, layout.num_patches - len(pixel_values)), (0, 0)))
        if bucket:
            image_grid_thw = np.pad(image_grid_thw, ((0, next_pow2(len(image_grid_thw)) - len(image_grid_thw)), (0, 0)))
        pixel_values, image_grid_thw = jnp.asarray(pixel_values), jnp.asarray(image_grid_thw, jnp.int32)
        model.check_image_tokens(input_ids, image_grid_thw, mask)
    else:
        image_grid_thw = None
    graphdef, state = nnx.split(model)
    out = _generate_vl(graphdef, state, input_ids, mask, pixel_values, image_grid_thw, layout,
                       jax.random.key(seed), jnp.int32(eos_id), jnp.int32(pad_id), max_new_tokens=max_new_tokens,
                       temperature=float(temperature), top_k=int(top_k))
    return np.asarray(out)


def num_params(model: nnx.Module) -> dict[str, int]:
    """{"visual": n, "language": n}: parameter counts of the two sides."""
    from merit_jax.models.params import flatten

    out = {"visual": 0, "language": 0}
    for name, x in flatten(model).items():
        out["visual" if name.startswith("visual/") else "language"] += math.prod(x.shape)
    return out


TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, mrope_section=(2, 3, 3), rms_norm_eps=1e-6,
                 max_position_embeddings=1024)
TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=(1, 3),
                   window_size=56, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)


def tiny_vl_hf_config(vocab_size: int, token_ids: dict[str, int], *, text: dict | None = None,
                      vision: dict | None = None, tie_word_embeddings: bool = True) -> dict[str, Any]:
    """A Qwen2.5-VL `config.json` dict (transformers' own config class) for a random tiny model.

    token_ids: {"<|image_pad|>": id, "<|video_pad|>": id, "<|vision_start|>": id, "<|vision_end|>": id}
    (e.g. `merit_jax.data.vision.vision_token_ids(tokenizer)`); text / vision override TINY_TEXT / TINY_VISION.
    """
    import transformers

    t = dict(TINY_TEXT, **(text or {}))
    v = dict(TINY_VISION, **(vision or {}))
    rope = {"rope_type": "default", "rope_theta": float(t.pop("rope_theta")),
            "mrope_section": list(t.pop("mrope_section"))}
    v["fullatt_block_indexes"] = list(v["fullatt_block_indexes"])
    ids = {"image_token_id": token_ids["<|image_pad|>"], "vision_start_token_id": token_ids["<|vision_start|>"],
           "vision_end_token_id": token_ids["<|vision_end|>"],
           "video_token_id": token_ids.get("<|video_pad|>", token_ids["<|image_pad|>"])}
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, rope_parameters=rope, bos_token_id=None, eos_token_id=None, **t),
        vision_config=dict(out_hidden_size=t["hidden_size"], **v), tie_word_embeddings=tie_word_embeddings, **ids)
    d = cfg.to_dict()
    d["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    return d
