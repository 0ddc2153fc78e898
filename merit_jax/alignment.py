"""Hessian–PCA alignment at θ⁰: do the split's conflict directions point along high curvature? (docs/SPLIT.md)

The paper's bridge between Proposition 1 and the split: the PCA conflict directions reach |cos| = 0.133 with
the span of the top-10 Hessian eigenvectors of the training loss at θ⁰, against 5.6e-5 for random unit vectors.

    directions = conflict_directions(model, names, calib, coefficients)   # r parameter-space directions
    alignment(directions, eigvecs, seed=0)                                # {"axes", "random", "expected_random"}

Conflict direction l. The split orders the tasks along principal axis l of the cosine matrix of the reduced
task gradients r_j = R g_j (R: the reduction, linear): task i's score is r̂_i · ρ_l − const with
ρ_l = Σ_j v_lj r̂_j = Σ_j c_lj r_j, c_lj = v_lj / ‖r_j‖ (v_l: the unit axis; centring only shifts the scores).
The parameter-space direction the axis weighs is d_l = Σ_j c_lj g_j, so that R d_l = ρ_l exactly. It is
computed exactly for every reduction by one gradient pass over the calibration examples:
d_l = ∇θ Σ_j c_lj Σ_i a_ji L_ji(θ⁰), with a_ji example i's weight in task j's mean (extract.per_example:
1/n_j, or its tokens / the task's tokens; `unit` weights need per-example norms and are not supported here).
With `full` reduction d_l is the axis's exact preimage; with `sketch` or `stride` it combines the same task
gradients with the coefficients that the reduced cosine matrix gave.

Alignment of a direction: ‖Qᵀ d̂‖, Q an orthonormal basis of the top-k eigenvectors (the |cos| between d̂ and
that span). For a random unit vector its expectation is about sqrt(k / P).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax import extract as X
from merit_jax.data.packing import pad_batch
from merit_jax.hessian import hessian_top_eigs
from merit_jax.models.inputs import batch_token_ce

log = logging.getLogger(__name__)


def axis_coefficients(axes_tr: np.ndarray, row_norms_t: np.ndarray) -> np.ndarray:
    """c [r, T]: c_lj = v_lj / ‖r_j‖, the task-gradient combination that principal axis l weighs."""
    return (np.asarray(axes_tr, np.float64) / np.asarray(row_norms_t, np.float64)[:, None]).T


def example_weights(tasks: Sequence[Sequence[Any]], per_example: str) -> list[np.ndarray]:
    """a_j [n_j] per task: each calibration example's weight in its task's mean gradient."""
    if per_example == "unit":
        raise ValueError("hessian alignment: extract.per_example=unit weighs examples by their gradient norms; "
                         "the conflict directions are computed for mean and tokens only")
    out = []
    for examples in tasks:
        w = np.array([ex.supervised_tokens if per_example == "tokens" else 1.0 for ex in examples], np.float64)
        out.append(w / w.sum())
    return out


def _flat_f32(tree) -> dict[str, jax.Array]:
    return {k: v.astype(jnp.float32) for k, v in X._flat(tree).items()}


def conflict_directions(model: nnx.Module, names: Sequence[str], tasks: Sequence[Sequence[Any]],
                        weights: Sequence[np.ndarray], coefficients_rt: np.ndarray, *, chunk: int = 16,
                        logits_chunk: int = 0) -> list[dict[str, jax.Array]]:
    """d_l = Σ_j c_lj Σ_i a_ji ∇L_ji(θ⁰) for every row l of `coefficients_rt`, as flat {name: float32 array}
    over the selected parameters: one batched gradient pass over the tasks' calibration examples per
    direction (examples of one task share a padded length; chunks of `chunk` rows)."""
    graphdef, selected, rest = X.split_model(model, names)
    step = jax.jit(lambda sel, batch, w: X._weighted_grad(graphdef, sel, rest, batch, w, logits_chunk)[1])
    directions = []
    for c_t in np.asarray(coefficients_rt, np.float64):
        acc = None
        for examples, a, c in zip(tasks, weights, c_t):
            batch = pad_batch(list(examples), X.seq_bucket(max(len(ex) for ex in examples)))
            for start in range(0, len(examples), chunk):
                rows = {k: v[start:start + chunk] for k, v in batch.items()}
                w = (c * a[start:start + chunk]).astype(np.float32)
                pad = chunk - len(w)  # every chunk one shape: one compilation per padded length
                if pad:
                    rows = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in rows.items()}
                    w = np.concatenate([w, np.zeros(pad, np.float32)])
                g = step(selected, {k: jnp.asarray(v) for k, v in rows.items()}, jnp.asarray(w))
                acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
        directions.append({k: v.astype(jnp.float32) for k, v in acc.items()})
    return directions


def training_loss(model: nnx.Module, names: Sequence[str], examples: Sequence[Any], logits_chunk: int = 0):
    """(loss_fn over the selected parameters, those parameters as an nnx.State): the token-weighted mean
    cross-entropy of a fixed batch of examples (the training loss at θ⁰, on a sample)."""
    graphdef, selected, rest = X.split_model(model, names)
    batch = {k: jnp.asarray(v) for k, v in pad_batch(list(examples),
                                                       X.seq_bucket(max(len(ex) for ex in examples))).items()}

    def loss_fn(sel):
        ce = batch_token_ce(nnx.merge(graphdef, sel, rest), batch, logits_chunk)
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_fn, selected


def _norm(tree: Mapping[str, jax.Array]) -> float:
    return math.sqrt(sum(float(jnp.vdot(v, v)) for v in tree.values()))


def span_cosine(direction: Mapping[str, jax.Array], basis: Sequence[Mapping[str, jax.Array]]) -> float:
    """‖Qᵀ d̂‖: the |cos| between `direction` and the span of `basis` (orthonormalised here)."""
    q = []
    for b in basis:  # Gram–Schmidt (the eigenvectors are orthonormal to rounding already)
        v = dict(b)
        for u in q:
            dot = sum(jnp.vdot(u[k], v[k]) for k in v)
            v = {k: v[k] - dot * u[k] for k in v}
        n = _norm(v)
        if n > 1e-6:
            q.append({k: x / n for k, x in v.items()})
    d = _norm(direction)
    coords = [float(sum(jnp.vdot(u[k], direction[k]) for k in u)) / d for u in q]
    return float(np.sqrt(np.sum(np.square(coords))))


def alignment(directions: Sequence[Mapping[str, jax.Array]], eigvecs: Sequence[Mapping[str, jax.Array]], *,
              n_random: int = 20, seed: int = 0) -> dict[str, Any]:
    """Alignment of each direction with the top-k eigenvector span, against random unit directions."""
    k = len(eigvecs)
    n_params = sum(int(np.prod(v.shape)) for v in eigvecs[0].values())
    key = jax.random.key(seed)
    random = []
    for i in range(n_random):
        leaves = jax.random.split(jax.random.fold_in(key, i), len(eigvecs[0]))
        u = {name: jax.random.normal(kk, v.shape, jnp.float32) for kk, (name, v) in zip(leaves, eigvecs[0].items())}
        random.append(span_cosine(u, eigvecs))
    return {"axes": [span_cosine(d, eigvecs) for d in directions], "random_mean": float(np.mean(random)),
            "random_std": float(np.std(random)), "expected_random": math.sqrt(k / n_params), "k": k,
            "parameters": n_params}


def hessian_alignment(model: nnx.Module, names: Sequence[str], tasks: Sequence[Sequence[Any]], per_example: str,
                      axes_tr: np.ndarray, row_norms_t: np.ndarray, *, k: int = 10, hessian_examples: int = 64,
                      iters: int | None = None, seed: int = 0, logits_chunk: int = 0) -> dict[str, Any]:
    """The whole diagnostic: top-k Hessian eigenpairs of the training loss at θ⁰ (on up to `hessian_examples`
    calibration examples, spread over the tasks), the r conflict directions, and their alignments."""
    per_task = max(1, hessian_examples // len(tasks))
    sample = [ex for examples in tasks for ex in list(examples)[:per_task]]
    loss_fn, params = training_loss(model, names, sample, logits_chunk)
    vals, vecs = hessian_top_eigs(loss_fn, params, k, iters=iters, seed=seed)
    vecs = [_flat_f32(v) for v in vecs]
    coefficients = axis_coefficients(axes_tr, row_norms_t)
    directions = conflict_directions(model, names, tasks, example_weights(tasks, per_example), coefficients,
                                     logits_chunk=logits_chunk)
    out = alignment(directions, vecs, seed=seed)
    out.update(eigenvalues=[float(v) for v in vals], hessian_examples=len(sample))
    return out
