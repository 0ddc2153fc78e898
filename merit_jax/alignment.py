"""Hessian–PCA alignment at θ⁰: do the split's conflict directions point along high curvature? (docs/SPLIT.md)

The paper's bridge between Proposition 1 and the split: the PCA conflict directions reach |cos| = 0.133 with
the span of the top-10 Hessian eigenvectors of the training loss at θ⁰, against 5.6e-5 for random unit vectors.

    out = hessian_alignment(model, names, calib_examples_per_task, per_example, pca.axes_tr, row_norms, k=10)
    # {"axes": [|cos| per split axis], "random_mean", "random_std", "expected_random", "eigenvalues", ...}

Conflict direction l. The split orders the tasks along principal axis l of the cosine matrix of the reduced
task gradients r_j = R g_j (R: the reduction, linear): task i's score is r̂_i · ρ_l − const with
ρ_l = Σ_j v_lj r̂_j = Σ_j c_lj r_j, c_lj = v_lj / ‖r_j‖ (v_l: the unit axis; centring only shifts the scores).
The parameter-space direction the axis weighs is d_l = Σ_j c_lj g_j, so that R d_l = ρ_l exactly. It is
computed exactly for every reduction: the task gradients g_j are those of the extraction (its `full` vectors when
it kept them, else one pass of the extract stage's own compiled function over the calibration examples, with the
same per-example weights), each read once into the r accumulators. With `full` reduction d_l is the axis's exact
preimage; with `sketch` or `stride` it combines the same task gradients with the coefficients that the reduced
cosine matrix gave.

Alignment of a direction: ‖Qᵀ d̂‖, Q an orthonormal basis of the top-k eigenvectors (the |cos| between d̂ and
that span). For a random unit vector its expectation is about sqrt(k / P).
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax import gradients as X
from merit_jax import sketch as sk
from merit_jax.io.hf import to_host
from merit_jax.data.packing import pad_batch
from merit_jax.hessian import hessian_top_eigs
from merit_jax.models.inputs import batch_token_ce

log = logging.getLogger(__name__)


def axis_coefficients(axes_tr: np.ndarray, row_norms_t: np.ndarray) -> np.ndarray:
    """c [r, T]: c_lj = v_lj / ‖r_j‖, the task-gradient combination that principal axis l weighs."""
    return (np.asarray(axes_tr, np.float64) / np.asarray(row_norms_t, np.float64)[:, None]).T


def task_gradients(model: nnx.Module, names: Sequence[str], tasks: Sequence[Sequence[Any]], per_example: str,
                   *, micro_chunk: int = 16, logits_chunk: int = 0, mesh=None):
    """Yields each task's mean gradient g_j at θ⁰ as float32 [P] (the extraction's `full` reduction, tensors in
    layout order), one task at a time: the extract stage's own compiled function, batched where it can be."""
    options = X.ExtractOptions(reduction="full", per_example=per_example, micro_chunk=micro_chunk,
                               keep_example_sketches=False, logits_chunk=logits_chunk)
    extractor = X.TaskExtractor(model, names, options, mesh=mesh)
    chunks = extractor.chunks_for(max(len(t) for t in tasks))
    for j, examples in enumerate(tasks):
        batch = pad_batch(list(examples), X.seq_bucket(max(len(ex) for ex in examples)))
        yield extractor(batch, task=f"task {j}", chunks=chunks).vector, extractor.layout


def conflict_directions(gradients, coefficients_rt: np.ndarray) -> np.ndarray:
    """d_l = Σ_j c_lj g_j, float64 [r, P], from the task gradients g_j (an iterable of [P] vectors, in the
    coefficients' column order), each read once."""
    c = np.asarray(coefficients_rt, np.float64)
    out = None
    for j, g in enumerate(gradients):
        g = np.asarray(g, np.float64)
        out = np.outer(c[:, j], g) if out is None else out + np.outer(c[:, j], g)
    return out


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


def sample_examples(tasks: Sequence[Sequence[Any]], budget: int) -> list:
    """Up to `budget` examples taken round-robin over the tasks (every task represented while budget allows)."""
    out, i = [], 0
    while len(out) < budget and any(i < len(t) for t in tasks):
        out += [t[i] for t in tasks if i < len(t)][:budget - len(out)]
        i += 1
    return out


def span_alignment(directions_rp: np.ndarray, basis_kp: np.ndarray, *, n_random: int = 20,
                   seed: int = 0) -> dict[str, Any]:
    """‖Qᵀ d̂‖ for each direction (Q: an orthonormal basis of the rows of `basis_kp`, the |cos| with their span),
    against `n_random` random unit directions and the expectation √(k/P) for one."""
    q, _ = np.linalg.qr(np.asarray(basis_kp, np.float64).T)  # [P, k]
    d = np.asarray(directions_rp, np.float64)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    random = [np.linalg.norm(q.T @ (u / np.linalg.norm(u))) for u in rng.normal(size=(n_random, q.shape[0]))]
    k, p = q.shape[1], q.shape[0]
    return {"axes": np.linalg.norm(d @ q, axis=1).tolist(), "random_mean": float(np.mean(random)),
            "random_std": float(np.std(random)), "expected_random": math.sqrt(k / p), "k": k, "parameters": p}


def hessian_alignment(model: nnx.Module, names: Sequence[str], tasks: Sequence[Sequence[Any]], per_example: str,
                      axes_tr: np.ndarray, row_norms_t: np.ndarray, *, task_grads_tp: np.ndarray | None = None,
                      k: int = 10, hessian_examples: int = 64, iters: int | None = None, seed: int = 0,
                      logits_chunk: int = 0, mesh=None) -> dict[str, Any]:
    """The whole diagnostic: top-k Hessian eigenpairs of the training loss at θ⁰ (on up to `hessian_examples`
    calibration examples taken round-robin over the tasks), the conflict directions of the given axes, and
    their alignments. `task_grads_tp`: the tasks' full gradients when extraction kept them (`full`); else one
    gradient pass over the calibration examples computes them."""
    loss_fn, params = training_loss(model, names, sample_examples(tasks, hessian_examples), logits_chunk)
    vals, vecs = hessian_top_eigs(loss_fn, params, k, iters=iters, seed=seed)
    layout = None
    if task_grads_tp is None:
        stream = task_gradients(model, names, tasks, per_example, logits_chunk=logits_chunk, mesh=mesh)
        first, layout = next(stream)
        gradients = itertools.chain([first], (g for g, _ in stream))
    else:
        gradients = iter(task_grads_tp)
    directions = conflict_directions(gradients, axis_coefficients(axes_tr, row_norms_t))
    if layout is None:
        layout = sk.Layout.of(X._flat(X.split_model(model, names)[1]))
    basis = np.stack([np.concatenate([np.asarray(to_host(f[n]), np.float64).ravel() for n in layout.names])
                      for f in (X._flat(v) for v in vecs)])
    out = span_alignment(directions, basis, seed=seed)
    out.update(eigenvalues=[float(v) for v in vals], hessian_examples=min(hessian_examples, sum(map(len, tasks))))
    return out


def basis_bytes(n_params: int, k: int, iters: int | None = None) -> int:
    """Device bytes of the Lanczos basis and work vectors (float32) for `n_params` selected parameters."""
    from merit_jax.hessian import default_iters

    return 4 * n_params * ((iters or default_iters(k, n_params)) + 4)
