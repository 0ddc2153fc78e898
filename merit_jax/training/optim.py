"""The optimizer, as pure optax pieces: the learning-rate schedule, the weight-decay mask, the frozen
parameters (train.freeze) and the chain clip -> AdamW | SGD that `make_optimizer` builds from TrainSettings."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from merit_jax.config import TrainSettings
from merit_jax.errors import ConfigError


def make_schedule(s: TrainSettings, num_steps: int) -> Callable[[Any], jax.Array]:
    """Learning rate of the update applied at 0-based `step`: linear warmup to the peak (never 0), then decay.

    Warmup: peak * (step + 1) / (warmup + 1) for step < warmup. Then `t` = (step - warmup) / (num_steps -
    warmup) runs from 0 towards 1: cosine from the peak to peak * min_lr_ratio (reached at step num_steps, one
    past the last update, so that no update is wasted at lr 0), linear the same, constant stays at the peak.
    """
    peak, end = float(s.learning_rate), float(s.learning_rate) * float(s.min_lr_ratio)
    warm = int(min(s.warmup_steps, max(num_steps - 1, 0)))
    decay_len = max(num_steps - warm, 1)

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warm) / decay_len, 0.0, 1.0)
        if s.schedule == "cosine":
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        elif s.schedule == "linear":
            after = peak + (end - peak) * t
        else:
            after = jnp.full_like(t, peak)
        return jnp.where(step < warm, peak * (step + 1.0) / (warm + 1.0), after)

    return lr


def decay_mask(names: Sequence[str], no_decay: Sequence[str]) -> dict[str, bool]:
    """{name: True if weight decay applies}: every parameter except those matching a `no_decay` regex."""
    patterns = [re.compile(rx) for rx in no_decay]
    return {n: not any(p.search(n) for p in patterns) for n in names}


def frozen_names(names: Sequence[str], freeze: Sequence[str]) -> set[str]:
    """The parameters matched by a train.freeze regex; a ConfigError if some regex matches nothing."""
    out = set()
    for rx in freeze:
        hit = {n for n in names if re.search(rx, n)}
        if not hit:
            raise ConfigError(f"train.freeze: {rx!r} matches no parameter (names look like {list(names)[:2]})")
        out |= hit
    if out and len(out) == len(names):
        raise ConfigError(f"train.freeze={list(freeze)} freezes every parameter: nothing would train")
    return out


def make_optimizer(s: TrainSettings, num_steps: int, param_names: Sequence[str]) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or SGD (+ decoupled weight decay on the masked parameters); frozen
    parameters (train.freeze) get zero updates and no optimizer state, and do not count in the clipping norm."""
    frozen = frozen_names(param_names, s.freeze)
    if frozen:
        labels = {n: "frozen" if n in frozen else "train" for n in param_names}
        inner = make_optimizer(dataclasses.replace(s, freeze=()), num_steps, param_names)
        return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
    lr = make_schedule(s, num_steps)
    mask = decay_mask(param_names, s.no_decay)
    if s.optimizer == "adamw":
        tx = optax.adamw(lr, b1=s.adam_b1, b2=s.adam_b2, eps=s.adam_eps, weight_decay=s.weight_decay, mask=mask)
    else:
        parts = [optax.add_decayed_weights(s.weight_decay, mask)] if s.weight_decay else []
        tx = optax.chain(*parts, optax.sgd(lr, momentum=s.momentum or None))
    return optax.chain(optax.clip_by_global_norm(s.grad_clip), tx) if s.grad_clip else tx

