"""The merge math: pure functions on arrays (numpy, or jax for the linear methods).

    θ̄ = Σ_k w_k θ_k                                    tokens (w_k = n_k / Σ n_j), uniform, weights
    θ⁰ + λ Σ_k w_k τ_k,  τ_k = θ_k − θ⁰               task_arithmetic
    TIES (trim, elect the sign, average the agreeing) and DARE (drop and rescale) on the τ_k

`merge_tensors` merges the K versions of one tensor; merging/stream.py applies it (or, for the linear methods,
`linear_coefficients` and `axpy_into` directly) piece by piece over whole checkpoints.
A new merge method: add its name to METHODS (LINEAR_METHODS when it is Σ_k c_k θ_k + c θ⁰, RELATIVE_METHODS
when it needs θ⁰) and its branch to `merge_tensors`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

LINEAR_METHODS = ("tokens", "uniform", "weights")
RELATIVE_METHODS = ("task_arithmetic", "ties", "dare")  # need θ⁰ (--base)
METHODS = LINEAR_METHODS + RELATIVE_METHODS


def resolve_weights(method: str, num_inputs: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """The normalised merge weights w (float64 [K], Σ w = 1) of a method.

    tokens: `weights` are the supervised token counts n_k; w_k = n_k / Σ n_j.
    uniform: w_k = 1/K (`weights` must be None).
    weights and the relative methods: explicit weights, normalised (a warning if they did not sum to 1);
      the relative methods default to uniform when none are given.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if num_inputs < 1:
        raise ValueError("nothing to merge: no inputs")
    if method == "uniform":
        if weights is not None and len(weights):
            raise ValueError("method 'uniform' takes no weights; use method 'weights' for explicit ones")
        return np.full(num_inputs, 1.0 / num_inputs)
    if weights is None or not len(weights):
        if method in RELATIVE_METHODS:
            return np.full(num_inputs, 1.0 / num_inputs)
        what = "token counts" if method == "tokens" else "weights"
        raise ValueError(f"method {method!r} needs {what} for the {num_inputs} inputs")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != num_inputs:
        raise ValueError(f"{w.shape[0]} weights given for {num_inputs} inputs")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights sum to {total}; at least one must be positive")
    if method != "tokens" and abs(total - 1.0) > 1e-6:
        logger.warning("merge weights %s sum to %.6g, not 1: normalising them", w.tolist(), total)
    return w / total


def _f32(x):
    """x as float32, numpy or jax alike (no copy when it already is)."""
    return x if x.dtype == np.float32 else x.astype(np.float32)


def ties_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Keeps the ceil(density · n) entries of largest magnitude of `tau` (exactly that many), zeroes the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    flat = np.ravel(tau)
    n = flat.size
    keep = min(n, int(math.ceil(density * n)))
    if keep >= n:
        return np.array(tau, copy=True)
    idx = np.argpartition(np.abs(flat), n - keep)[n - keep:]
    out = np.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(np.shape(tau))


def dare_drop(tau: np.ndarray, drop_p: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: zeroes each entry with probability `drop_p` and rescales the survivors by 1 / (1 − drop_p)."""
    if not 0.0 <= drop_p < 1.0:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {drop_p}")
    keep = rng.random(np.shape(tau)) >= drop_p
    return np.where(keep, tau * np.float32(1.0 / (1.0 - drop_p)), np.float32(0.0)).astype(np.float32)


def _dare_rng(seed: int | Sequence[int], k: int) -> np.random.Generator:
    seed = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    return np.random.default_rng([*seed, k])


def merge_tensors(
    tensors_k: Sequence[Any],
    weights: Sequence[float] | None,
    method: str = "weights",
    base: Any = None,
    *,
    lam: float = 1.0,
    density: float = 0.2,
    drop_p: float = 0.9,
    seed: int | Sequence[int] = 0,
) -> Any:
    """Merges the K versions of one tensor; returns float32 (numpy, or jax for jax inputs on linear methods).

    tensors_k: K arrays of one shape (any float dtype). A lazy sequence works too: it is indexed k = 0..K−1
      once per pass (one pass for the linear methods and DARE, two for TIES), so at most a few tensors are
      alive at a time whatever K is.
    weights: as `resolve_weights(method, K, weights)` takes them (token counts for "tokens").
    base: θ⁰'s version of the tensor, needed by the relative methods, with τ_k = θ_k − θ⁰:
      task_arithmetic: θ⁰ + lam · Σ_k w_k τ_k
      ties: trim each τ_k to its top `density` fraction by magnitude, elect the sign γ = sign(Σ_k w_k τ̂_k),
            θ⁰ + lam · Σ_{k: sign τ̂_k = γ} w_k τ̂_k / Σ_{k: sign τ̂_k = γ} w_k   (0 where no k agrees)
      dare: θ⁰ + lam · Σ_k w_k · dare_drop(τ_k, drop_p), drop masks from numpy Generator([*seed, k])
    The linear methods (tokens, uniform, weights) give Σ_k w_k θ_k.
    """
    num = len(tensors_k)
    w = resolve_weights(method, num, weights)
    if method in RELATIVE_METHODS and base is None:
        raise ValueError(f"method {method!r} is relative to θ⁰: pass base")

    if method in LINEAR_METHODS or method == "task_arithmetic":
        coefs, base_coef = linear_coefficients(method, w, lam)
        acc = None
        for k in range(num):
            if coefs[k] != 0.0:
                acc = axpy_into(acc, coefs[k], tensors_k[k])
        if base_coef != 0.0:
            acc = axpy_into(acc, base_coef, base)
        return acc

    base32 = _f32(np.asarray(base))
    if method == "dare":
        acc = np.zeros(base32.shape, np.float32)
        for k in range(num):
            tau = _f32(np.asarray(tensors_k[k])) - base32
            acc += np.float32(w[k]) * dare_drop(tau, drop_p, _dare_rng(seed, k))
        return base32 + np.float32(lam) * acc

    # TIES: pass 1 elects the sign from the trimmed mass, pass 2 averages the agreeing entries.
    mass = np.zeros(base32.shape, np.float32)
    for k in range(num):
        mass += np.float32(w[k]) * ties_trim(_f32(np.asarray(tensors_k[k])) - base32, density)
    sign = np.sign(mass)
    total = np.zeros(base32.shape, np.float32)
    weight_sum = np.zeros(base32.shape, np.float32)
    for k in range(num):
        trimmed = ties_trim(_f32(np.asarray(tensors_k[k])) - base32, density)
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        total += np.where(agree, np.float32(w[k]) * trimmed, np.float32(0.0))
        weight_sum += np.where(agree, np.float32(w[k]), np.float32(0.0))
    tau = np.divide(total, weight_sum, out=np.zeros_like(total), where=weight_sum > 0)
    return base32 + np.float32(lam) * tau


def linear_coefficients(method: str, weights: np.ndarray, lam: float = 1.0) -> tuple[np.ndarray, float]:
    """(c_k for the inputs, c for θ⁰) such that the merge is Σ_k c_k θ_k + c θ⁰ (linear methods only).

    task_arithmetic: θ⁰ + lam Σ w_k (θ_k − θ⁰) = Σ (lam w_k) θ_k + (1 − lam) θ⁰ since Σ w = 1.
    """
    if method in LINEAR_METHODS:
        return np.asarray(weights, np.float64), 0.0
    if method == "task_arithmetic":
        return lam * np.asarray(weights, np.float64), 1.0 - lam
    raise ValueError(f"method {method!r} is not linear")


AXPY_BLOCK_BYTES = 16 << 20  # float32 bytes of the product computed at a time


def axpy_into(acc, c: float, x):
    """acc + c·x in float32; for numpy in place, the product taken in row blocks of AXPY_BLOCK_BYTES.

    The blocks keep the temporary c·x small: a whole-tensor product would cost as much memory as the
    accumulator itself (the largest term of the merge's peak for a big embedding).
    """
    if acc is None:
        if isinstance(x, np.ndarray):
            return np.multiply(x, np.float32(c), dtype=np.float32)
        return np.float32(c) * _f32(x)
    if isinstance(acc, np.ndarray) and isinstance(x, np.ndarray) and acc.ndim:
        rows = acc.shape[0]
        step = max(1, AXPY_BLOCK_BYTES // max(1, acc[:1].nbytes))
        tmp = np.empty((min(step, rows), *acc.shape[1:]), np.float32)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = tmp[: stop - start]
            np.multiply(x[start:stop], np.float32(c), out=block, dtype=np.float32)
            acc[start:stop] += block
        return acc
    return acc + np.float32(c) * _f32(x)
