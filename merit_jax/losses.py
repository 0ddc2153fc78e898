"""Masked next-token cross-entropy, the loss of every stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_ce(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Cross-entropy of every position, float32 [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)


def token_losses(logits_btv: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array):
    """(sum of cross-entropy over supervised tokens, number of supervised tokens), both float32 scalars."""
    mask = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(token_ce(logits_btv, targets_bt) * mask), jnp.sum(mask)


def per_example_losses(logits_btv, targets_bt, loss_mask_bt):
    """Mean loss over each row's supervised tokens, [B] (0 for a row without any)."""
    mask = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(token_ce(logits_btv, targets_bt) * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def mean_loss(logits_btv, targets_bt, loss_mask_bt):
    total, n = token_losses(logits_btv, targets_bt, loss_mask_bt)
    return total / jnp.maximum(n, 1.0)


def chunked_token_ce(h_btd: jax.Array, logits_fn, targets_bt: jax.Array, chunk: int = 0, hits: bool = False):
    """token_ce(logits_fn(h), targets) [B, T] (and, with `hits`, whether the argmax is the target), with the
    logits computed `chunk` positions at a time: [B, chunk, V] float32 is the largest array, in the forward
    and, because each chunk is rematerialised (jax.checkpoint), in the backward too. At Qwen2.5's 152k
    vocabulary, whole logits of a 16 x 2048 batch take 20 GB (and as much again for their gradient).
    chunk <= 0 or >= T: one chunk (no scan)."""
    def one(h, y):
        logits = logits_fn(h)
        ce = token_ce(logits, y)
        return (ce, jnp.argmax(logits, -1) == y) if hits else ce

    b, t, d = h_btd.shape
    if chunk <= 0 or chunk >= t:
        return one(h_btd, targets_bt)
    pad = -t % chunk
    h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
    y = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)
    _, out = jax.lax.scan(lambda carry, xs: (carry, jax.checkpoint(one)(*xs)), None, (h, y))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :t], out)
