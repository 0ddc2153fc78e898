"""Merge-readiness diagnostics, as pure functions on parameter pytrees (flat dicts or nested).

Leaves may be jax or numpy arrays; arithmetic is done in float32 at least (float64 leaves stay float64, which
the exact checks in the tests rely on) and results are cast back to each leaf's dtype. `loss_fn` is any
function params -> scalar loss (jit it yourself when it is a model).

  interpolate          θ(α) = θ_b + α (θ_a − θ_b)
  lmc_barrier          (max_α [L(θ(α)) − (α L(θ_a) + (1 − α) L(θ_b))] clipped at 0, the losses on the α grid)
  lmc_curve            the same with the chord and the excess
  displacement         (‖θ − θ⁰‖ over all tensors, {tensor: ‖θ − θ⁰‖})
  add_relative_noise   θ + σ·|θ|·ε, ε ~ N(0, 1) independently per entry
  noise_robustness     the loss under that noise, several σ and draws
  merging_gain         Σ_k w_k L(θ_k) − L(Σ_k w_k θ_k)  (≥ 0 in a quadratic basin: Theorem 1)
  quadratic_theorem1_terms   both sides of Theorem 1 on an explicit quadratic
  hessian_top_eigs     the k largest Hessian eigenvalues and unit eigenvectors, by Lanczos on Hessian-vector
                       products (merit_jax/hessian.py, re-exported here: the DESIGN.md entry point)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from merit_jax.hessian import hessian_top_eigs  # noqa: F401  (re-exported: the DESIGN.md entry point)

PyTree = Any
LossFn = Callable[[PyTree], Any]


def _work_dtype(dtype) -> np.dtype:
    """float32, or float64 for float64 leaves (bf16 / f16 are computed in float32)."""
    return np.promote_types(np.dtype(dtype), np.float32)


def _to_float(x) -> float:
    return float(np.asarray(x))


def _leaf_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def interpolate(params_a: PyTree, params_b: PyTree, alpha: float) -> PyTree:
    """α θ_a + (1 − α) θ_b, written θ_b + α (θ_a − θ_b) so that identical inputs give exactly θ_b."""

    def mix(a, b):
        dt = _work_dtype(a.dtype)
        b_w = b.astype(dt)
        return (b_w + dt.type(alpha) * (a.astype(dt) - b_w)).astype(a.dtype)

    return jax.tree_util.tree_map(mix, params_a, params_b)


def average_params(params_list: Sequence[PyTree], weights: Sequence[float]) -> PyTree:
    """Σ_k w_k θ_k with the weights normalised to sum to 1."""
    w = np.asarray(weights, np.float64)
    if len(params_list) != len(w) or len(w) == 0:
        raise ValueError(f"{len(params_list)} parameter sets but {len(w)} weights")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    w = w / w.sum()

    def avg(*leaves):
        dt = _work_dtype(leaves[0].dtype)
        acc = None
        for wk, leaf in zip(w, leaves):
            term = dt.type(wk) * leaf.astype(dt)
            acc = term if acc is None else acc + term
        return acc.astype(leaves[0].dtype)

    return jax.tree_util.tree_map(avg, *params_list)


def lmc_curve(loss_fn: LossFn, params_a: PyTree, params_b: PyTree, alphas: Sequence[float] | int = 5) -> dict:
    """The loss along the straight line from θ_b (α = 0) to θ_a (α = 1), and the barrier, in detail.

    alphas: the grid, or a number of evenly spaced points on [0, 1] (both ends are always evaluated, for the
    chord). Returns {"barrier": max(0, max_α excess), "alphas", "losses" L(θ(α)), "chord" α L_a + (1 − α) L_b,
    "excess" losses − chord, "loss_a", "loss_b"}.
    """
    if isinstance(alphas, int):
        if alphas < 2:
            raise ValueError("need at least 2 points on the α grid")
        alphas = np.linspace(0.0, 1.0, alphas).tolist()
    alphas = [float(a) for a in alphas]
    loss_a, loss_b = _to_float(loss_fn(params_a)), _to_float(loss_fn(params_b))
    losses, chord = [], []
    for alpha in alphas:
        if alpha == 1.0:
            loss = loss_a
        elif alpha == 0.0:
            loss = loss_b
        else:
            loss = _to_float(loss_fn(interpolate(params_a, params_b, alpha)))
        losses.append(loss)
        chord.append(loss_b + alpha * (loss_a - loss_b))  # exactly L_b when L_a == L_b
    excess = [l - c for l, c in zip(losses, chord)]
    return {"barrier": max(0.0, max(excess)), "alphas": alphas, "losses": losses, "chord": chord,
            "excess": excess, "loss_a": loss_a, "loss_b": loss_b}


def lmc_barrier(loss_fn: LossFn, params_a: PyTree, params_b: PyTree,
                alphas: Sequence[float] | int = 5) -> tuple[float, list[float]]:
    """(barrier, losses along the α grid): barrier = max(0, max_α [L(θ(α)) − (α L(θ_a) + (1 − α) L(θ_b))]).

    θ(α) = θ_b + α (θ_a − θ_b), so α = 1 is θ_a. See `lmc_curve` for the chord and the excess too.
    """
    curve = lmc_curve(loss_fn, params_a, params_b, alphas)
    return curve["barrier"], curve["losses"]


def displacement(params: PyTree, params0: PyTree) -> tuple[float, dict[str, float]]:
    """(‖θ − θ⁰‖₂ over all tensors, {tensor name: ‖θ − θ⁰‖₂}); names are the "/"-joined tree paths."""
    diff_sq = jax.tree_util.tree_map(
        lambda a, b: _to_float(((a.astype(_work_dtype(a.dtype)) - b.astype(_work_dtype(a.dtype))) ** 2).sum()),
        params, params0)
    per_tensor = {_leaf_name(path): math.sqrt(v) for path, v in jax.tree_util.tree_leaves_with_path(diff_sq)}
    return math.sqrt(sum(jax.tree_util.tree_leaves(diff_sq))), per_tensor


def global_norm(params: PyTree) -> float:
    """‖θ‖₂ over all tensors (to put a displacement in proportion)."""
    return math.sqrt(sum(_to_float((x.astype(_work_dtype(x.dtype)) ** 2).sum())
                         for x in jax.tree_util.tree_leaves(params)))


def add_relative_noise(params: PyTree, sigma: float, key: jax.Array) -> PyTree:
    """θ + σ·|θ|·ε per tensor, ε ~ N(0, 1) drawn independently for every entry (one key per leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = []
    for leaf, k in zip(leaves, keys):
        dt = np.dtype(jax.dtypes.canonicalize_dtype(_work_dtype(leaf.dtype)))  # float32 unless x64 is on
        x = jax.numpy.asarray(leaf).astype(dt)
        eps = jax.random.normal(k, x.shape, dt)
        noisy.append((x + dt.type(sigma) * jax.numpy.abs(x) * eps).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, noisy)


def noise_robustness(loss_fn: LossFn, params: PyTree, sigmas: Sequence[float], draws: int,
                     key: jax.Array) -> dict:
    """{"clean": L(θ), "by_sigma": {σ: {"losses": [...], "mean", "std"}}} under `add_relative_noise`."""
    out = {"clean": _to_float(loss_fn(params)), "by_sigma": {}}
    for i, sigma in enumerate(sigmas):
        losses = [_to_float(loss_fn(add_relative_noise(params, sigma, jax.random.fold_in(key, i * 100003 + d))))
                  for d in range(draws)]
        out["by_sigma"][float(sigma)] = {"losses": losses, "mean": float(np.mean(losses)),
                                         "std": float(np.std(losses))}
    return out


def merging_gain(loss_fn: LossFn, params_list: Sequence[PyTree], weights: Sequence[float], *,
                 branch_losses: Sequence[float] | None = None, merged: PyTree | None = None) -> float:
    """Σ_k w_k L(θ_k) − L(θ̄), θ̄ = Σ_k w_k θ_k (weights normalised).

    branch_losses / merged: pass what is already known to avoid recomputing it.
    """
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    if branch_losses is None:
        branch_losses = [_to_float(loss_fn(p)) for p in params_list]
    if merged is None:
        merged = average_params(params_list, w)
    return float(np.dot(w, np.asarray(branch_losses, np.float64)) - _to_float(loss_fn(merged)))


# -------------------------------------------------------------------------------- Theorem 1, quadratic


def quadratic_loss(eigvals: np.ndarray, eigvecs: np.ndarray, theta_star: np.ndarray,
                   l_star: float = 0.0) -> Callable[[np.ndarray], float]:
    """L(θ) = l* + ½ (θ − θ*)ᵀ H (θ − θ*), H = U diag(λ) Uᵀ (eigvecs U: [P, P] columns u_ℓ), in float64."""
    lam = np.asarray(eigvals, np.float64)
    u = np.asarray(eigvecs, np.float64)
    star = np.asarray(theta_star, np.float64)

    def loss(theta) -> float:
        z = u.T @ (np.asarray(theta, np.float64).ravel() - star)
        return float(l_star + 0.5 * np.sum(lam * z * z))

    return loss


def quadratic_theorem1_terms(eigvals: np.ndarray, eigvecs: np.ndarray, theta_star: np.ndarray,
                             thetas: np.ndarray, weights: Sequence[float], l_star: float = 0.0) -> dict:
    """Both sides of Theorem 1 for L of `quadratic_loss`, θ_i the rows of thetas [K, P]:

        lhs = Σ_i w_i L(θ_i) − L(θ̄_w),   rhs = ½ Σ_ℓ λ_ℓ Var_w(u_ℓᵀ δ),   δ_i = θ_i − θ̄_w,
        Var_w(x) = Σ_i w_i (x_i − Σ_j w_j x_j)².
    Returns {"lhs", "rhs", "per_direction" (½ λ_ℓ Var_w, [P]), "merged" θ̄_w}.
    """
    thetas = np.asarray(thetas, np.float64)
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    loss = quadratic_loss(eigvals, eigvecs, theta_star, l_star)
    merged = w @ thetas
    lhs = float(np.dot(w, [loss(t) for t in thetas]) - loss(merged))
    proj = (thetas - merged) @ np.asarray(eigvecs, np.float64)  # [K, P]: u_ℓᵀ δ_i
    var = w @ (proj - w @ proj) ** 2  # Var_w per direction ℓ
    per_direction = 0.5 * np.asarray(eigvals, np.float64) * var
    return {"lhs": lhs, "rhs": float(per_direction.sum()), "per_direction": per_direction, "merged": merged}
