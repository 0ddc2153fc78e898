"""Greedy / sampled decoding with a KV cache: one jit-compiled prefill + `lax.fori_loop` of decode steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax.models.qwen2 import make_attention_mask


def _init_caches(config, batch: int, length: int, dtype) -> list[dict]:
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.int32(0)}
            for _ in range(config.num_layers)]


def _with_index(caches, index):
    return [dict(c, index=index) for c in caches]


def _sample(logits_bv, key, temperature: float, top_k: int):
    if temperature <= 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / temperature
    if top_k:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    return jax.random.categorical(key, logits_bv).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, input_ids_bt, mask_bt, key, eos_id, pad_id, *, max_new_tokens: int,
              temperature: float, top_k: int):
    model = nnx.merge(graphdef, state)
    b, t = input_ids_bt.shape
    total = t + max_new_tokens
    key_valid_bs = jnp.concatenate([mask_bt, jnp.ones((b, max_new_tokens), mask_bt.dtype)], axis=1)
    order_bs = jnp.broadcast_to(jnp.arange(total), (b, total))
    positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=-1) - 1, 0).astype(jnp.int32)
    caches = _init_caches(model.config, b, total, model.policy.compute_dtype)

    # prefill: the whole prompt at cache index 0
    mask = make_attention_mask(order_bs[:, :t], None, key_valid_bs, order_bs)
    h_btd, caches = model.model(input_ids_bt, positions_bt, mask, _with_index(caches, jnp.int32(0)))
    key, sub = jax.random.split(key)
    token_b = _sample(model.logits(h_btd[:, -1:])[:, 0], sub, temperature, top_k)
    next_pos_b = positions_bt[:, -1] + 1
    out_bn = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_b)
    done_b = token_b == eos_id

    def step(i, carry):  # i = index of the token being fed (already generated), 0-based
        out_bn, caches, done_b, key = carry
        token_b = out_bn[:, i]
        index = jnp.int32(t) + i
        mask = make_attention_mask(jnp.full((b, 1), index), None, key_valid_bs, order_bs)
        h_btd, caches = model.model(token_b[:, None], (next_pos_b + i)[:, None], mask,
                                    _with_index(caches, index))
        key, sub = jax.random.split(key)
        new_b = _sample(model.logits(h_btd)[:, 0], sub, temperature, top_k)
        new_b = jnp.where(done_b, pad_id, new_b)
        return out_bn.at[:, i + 1].set(new_b), caches, done_b | (new_b == eos_id), key

    out_bn, *_ = jax.lax.fori_loop(0, max_new_tokens - 1, step, (out_bn, caches, done_b, key))
    return out_bn


def generate(model: nnx.Module, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, eos_id: int = -1, pad_id: int = 0,
             seed: int = 0) -> np.ndarray:
    """New tokens [B, max_new_tokens] after left-padded prompts `input_ids` [B, T] (mask 1 = real token).

    Greedy when temperature == 0. After `eos_id` a row emits `pad_id`.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, input_ids, mask, jax.random.key(seed), jnp.int32(eos_id), jnp.int32(pad_id),
                    max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k))
    return np.asarray(out)


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into ([B, T] ids, [B, T] mask)."""
    t = max(len(s) for s in sequences)
    ids = np.full((len(sequences), t), pad_id, np.int32)
    mask = np.zeros((len(sequences), t), np.int32)
    for i, s in enumerate(sequences):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask
