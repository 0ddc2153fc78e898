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
