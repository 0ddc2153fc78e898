"""Masked next-token cross-entropy, the loss of every stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_losses(logits_btv: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array):
    """(sum of cross-entropy over supervised tokens, number of supervised tokens), both float32 scalars."""
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)
    mask = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(ce_bt * mask), jnp.sum(mask)


def per_example_losses(logits_btv, targets_bt, loss_mask_bt):
    """Mean loss over each row's supervised tokens, [B] (0 for a row without any)."""
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)
    mask = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(ce_bt * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def mean_loss(logits_btv, targets_bt, loss_mask_bt):
    total, n = token_losses(logits_btv, targets_bt, loss_mask_bt)
    return total / jnp.maximum(n, 1.0)
