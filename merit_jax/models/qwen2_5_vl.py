"""Qwen2.5-VL in Flax NNX, numerically the same as transformers' `Qwen2_5_VLForConditionalGeneration` (images).

    model = Qwen2_5_VLForConditionalGeneration.from_hf_config(hf_config_dict, rngs=nnx.Rngs(0))
    logits = model(input_ids, pixel_values=pv, image_grid_thw=thw)         # float32 [B, T, V]

`pixel_values` [P, C*2*14*14] and `image_grid_thw` [N, 3] mean what the Qwen2-VL image processor returns
(patches of all images concatenated; each image's (t, h, w) patch grid). Each image occupies
t*h*w/4 `<|image_pad|>` tokens in `input_ids`; their embeddings are replaced by the vision tower's output.

Parts, named as the Hugging Face checkpoint names its tensors (`visual.*`, `model.*`, `lm_head.*`), so that
`merit_jax.io.hf.hf_key` maps every flat parameter name to its HF tensor:
  visual   the vision tower (`merit_jax.models.qwen2_5_vl_vision`): 3-D patch embedding, `depth` blocks of
           RMSNorm + attention with 2-D rotary embeddings + RMSNorm + SwiGLU, window attention except in
           `fullatt_block_indexes`, and the 2x2 patch merger;
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

from merit_jax.models.attention import row_axes
from merit_jax.models.config import ModelConfig
from merit_jax.models.generate import _init_caches, _sample, _with_index
from merit_jax.models.mrope import image_token_index, mrope_cos_sin, mrope_positions
from merit_jax.models.qwen2 import Linear, Qwen2Model, make_attention_mask, make_policy
from merit_jax.models.qwen2_5_vl_vision import (VISION_NORM_EPS, VisionConfig,  # noqa: F401 (re-exported)
                                                VisionTransformer, vision_config_from_hf)
from merit_jax.models.vision_layout import VisionLayout, next_pow2, vision_layout
from merit_jax.sharding import constrain

Array = jax.Array


# ----------------------------------------------------------------------------------------------- config


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
        return cls(text=text_cfg, vision=vision_config_from_hf(hf.get("vision_config") or {}, text_cfg, source),
                   mrope_section=section,
                   **{k: int(hf[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id") if hf.get(k) is not None})


def _concrete(x, what: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"{what} is traced (inside jax.jit): compute it on the host and pass it in "
                         "(`vision_layout=vision_layout(image_grid_thw, model.vl_config.vision)`)") from None


# ------------------------------------------------------------------------------------------------ VL model


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """input_ids [B, T] (+ images) -> logits float32 [B, T, V].

    `config` is the language model's ModelConfig (so text-only tools, e.g. `generate`, work unchanged);
    `vl_config` the whole VLConfig."""

    def __init__(self, arch: VLConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                 remat: str = "none", attention: str = "xla", scan_layers: bool = False, max_segments: int = 16):
        policy = make_policy(param_dtype, compute_dtype, remat, attention, scan_layers, max_segments)
        self.vl_config, self.config, self.policy = arch, arch.text, policy
        self.visual = VisionTransformer(arch.vision, policy, rngs)
        self.model = Qwen2Model(arch.text, policy, rngs)
        self.lm_head = (None if arch.text.tie_word_embeddings else
                        Linear(arch.text.hidden_size, arch.text.vocab_size, ("embed", "vocab"), bias=False,
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
            # splash attention in the tower runs per shard: the vmap says which mesh axes hold the rows
            spmd = row_axes(pixel_values.shape[0]) if self.policy.attention == "splash" else None
            feats_bud = jax.vmap(self.visual, spmd_axis_name=spmd)(pixel_values, vision_layout).astype(x_btd.dtype)
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
        if self.policy.attention in ("splash", "cudnn"):  # kernels take segment ids (0: padding), never [T, S]
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
    hf = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, rope_parameters=rope, bos_token_id=None, eos_token_id=None, **t),
        vision_config=dict(out_hidden_size=t["hidden_size"], **v), tie_word_embeddings=tie_word_embeddings, **ids)
    d = hf.to_dict()
    d["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    return d
