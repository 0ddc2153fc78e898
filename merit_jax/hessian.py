"""Top Hessian eigenpairs of a loss by Lanczos on Hessian-vector products, never the dense Hessian.

    vals, vecs = hessian_top_eigs(loss_fn, params, k)     # re-exported by merit_jax.diagnostics

"Top" means the k largest *algebraic* eigenvalues (the most positive curvature: the paper's top-10
curvature directions), not the largest in magnitude. Algorithm (docs/SPLIT.md, "Hessian eigenpairs"):

- H v = d/dε ∇L(θ + ε v): forward-over-reverse (`jax.jvp` of `jax.grad`), jitted, costs about two
  forward+backward passes. The tangent has the parameter's dtype (`loss_fn` sees exactly the parameters
  it was given); the vectors and products are float32 (float64 for float64 leaves). With bf16 parameters
  each product's input is rounded to bf16, so eigenvalues are good to ~0.1 % and the residual check warns;
  pass float32 copies of the parameters (the same point) for tighter pairs.
- Lanczos with full reorthogonalisation: the Krylov basis V (m vectors) is a pytree whose leaves are the
  parameters' with a leading axis m, sharded like the parameters on the other axes, so every vector stays
  on its devices; inner products are tree reductions. Step j: w = H v_j, projected off the whole basis
  twice (classical Gram–Schmidt twice: orthogonal to rounding), v_{j+1} = w / β_j, β_j = ‖w‖. The
  projection coefficients are Vᵀ H v_j, i.e. column j of the projected matrix M = Vᵀ H V (upper triangle;
  tridiagonal in exact arithmetic), whose eigenpairs (θ_i, s_i) give the Ritz pairs (θ_i, y_i = V s_i).
  Per step only β_j and the m coefficients come to the host (M is at most m × m, eigh on the host).
  Every product, the start vector's insertion and the final Ritz vectors go through one compiled program.
- Breakdown (β_j ≈ 0: the Krylov space is invariant, e.g. a low-rank H): the next vector is a fresh random
  one orthogonal to the basis, and the search goes on. An eigenvalue of multiplicity > 1 inside the top k
  is invisible to exact single-vector Krylov methods; in floating point rounding brings its other copies
  in (on a 96-parameter quadratic both copies of a double top eigenvalue appear within 19 steps), but
  that is not guaranteed.
- Convergence: H y_i − θ_i y_i = β_j s_{j,i} v_{j+1}, so the residual of Ritz pair i is β_j |s_{j,i}|. The
  run stops once each of the top k has β_j |s_{j,i}| <= tol · max|θ| and at least max(k, min(iters, 2k))
  steps were taken (so that a direction the random start vector barely touched gets a chance to show), or
  after `iters` steps. Then k more products measure the true residuals ‖H y_i − θ_i y_i‖; not converged, or
  a residual above 10 · tol · max|θ|, logs a warning. (Eigenvalue error <= residual; eigenvector angle
  <= residual / distance to the rest of the spectrum.)
- Cost: (steps + k) Hessian-vector products, each about two forward+backward passes, and iters · P floats
  of device memory for the basis (plus four vectors). Default iters = min(P, max(2k + 20, 40)): Lanczos
  finds extreme, separated eigenvalues in a few tens of steps; for k = 10 that is at most 40 products and
  1.2 GB of basis per 7.5 M float32 parameters (for a billion-parameter model, restrict the parameters).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


class LanczosResult(NamedTuple):
    values: np.ndarray  # float64 [k], descending
    vectors: list  # k unit pytrees shaped (and sharded) like the parameters, in the work dtype
    residuals: np.ndarray  # float64 [k]: ‖H y − θ y‖, measured with k extra products
    steps: int  # Hessian-vector products in the Lanczos loop
    converged: bool  # the estimated residuals met the tolerance before `iters` ran out
    restarts: int  # fresh random directions taken after the Krylov space became invariant


def default_iters(k: int, n_params: int) -> int:
    return int(min(n_params, max(2 * k + 20, 40)))


def _work_dtype(dtype) -> np.dtype:
    return np.dtype(jax.dtypes.canonicalize_dtype(np.promote_types(np.dtype(dtype), np.float32)))


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _check_params(params: PyTree) -> list:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("hessian_top_eigs: params has no leaves")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"hessian_top_eigs: parameter {_leaf_name(path)} has dtype "
                             f"{jnp.result_type(leaf)}; every leaf must be floating point")
    return [leaf for _, leaf in leaves]


def _stacked_sharding(leaf):
    """The basis leaf [m, *shape]: replicated over m, sharded like the parameter on the other axes."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(None, *spec))
    return None


def hvp(loss_fn: Callable[[PyTree], Any]) -> Callable[[PyTree, PyTree], PyTree]:
    """(params, v) -> H(params) v by forward-over-reverse; v and the product in the work dtype."""

    def product(params, v):
        tangent = jax.tree.map(lambda t, p: t.astype(jnp.result_type(p)), v, params)
        _, hv = jax.jvp(jax.grad(loss_fn), (params,), (tangent,))
        return jax.tree.map(lambda h, t: h.astype(t.dtype), hv, v)

    return product


# ----------------------------------------------------------------------------- tree linear algebra (jnp)

def _dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y, precision=_HIGHEST) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _scaled(alpha, x: PyTree) -> PyTree:
    return jax.tree.map(lambda xi: alpha.astype(xi.dtype) * xi, x)


def _combine(basis: PyTree, s: jax.Array) -> PyTree:
    """V s: the combination of the basis rows with coefficients s [m]."""
    return jax.tree.map(lambda b: jnp.tensordot(s.astype(b.dtype), b, axes=1, precision=_HIGHEST), basis)


def _project_off(basis: PyTree, w: PyTree) -> tuple[PyTree, jax.Array]:
    """w − V (Vᵀ w), twice (classical Gram–Schmidt twice keeps w orthogonal to V to rounding), and the
    total coefficients [m]: Vᵀ w to rounding. Rows of V not filled yet are zero and contribute nothing."""
    total = 0.0
    for _ in range(2):
        coef = sum(jnp.tensordot(b, x, axes=x.ndim, precision=_HIGHEST)
                   for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w)))
        w = jax.tree.map(lambda x, y: x - y, w, _combine(basis, coef))
        total = total + coef
    return w, total


def _krylov_step(matvec, operand, basis, s, z, use_z, write_row, write):
    """The one compiled program of the method (every product goes through it, so it compiles once).

    v = V s / ‖V s‖; h = H v (or the given vector z when use_z: a start or restart vector); θ = vᵀh and
    the residual ‖h − θ v‖ (of a Ritz vector when s holds its coefficients); w = h projected off V, and
    β = ‖w‖; row `write_row` of V becomes w / β when `write`. Returns (V, v, Vᵀh [m], β, θ, residual, Σ v).
    """
    v = _combine(basis, s)
    v = _scaled(1.0 / jnp.maximum(jnp.sqrt(_dot(v, v)), jnp.finfo(jnp.float32).tiny), v)
    h = jax.lax.cond(use_z, lambda: z, lambda: matvec(operand, v))
    theta = _dot(h, v)
    residual = jax.tree.map(lambda hi, vi: hi - theta.astype(hi.dtype) * vi, h, v)
    w, coef = _project_off(basis, h)
    beta = jnp.sqrt(_dot(w, w))
    new_row = _scaled(1.0 / jnp.maximum(beta, jnp.finfo(jnp.float32).tiny), w)

    def update(b, x):
        old = jax.lax.dynamic_index_in_dim(b, write_row, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(b, jnp.where(write, x[None], old), write_row, 0)

    basis = jax.tree.map(update, basis, new_row)
    total = sum(jnp.sum(x) for x in jax.tree.leaves(v))
    return basis, v, coef, beta, theta, jnp.sqrt(_dot(residual, residual)), total


def _random_vector(leaves, treedef, dtypes, seed: int, draw: int) -> PyTree:
    """Gaussian entries drawn on the host (numpy, per leaf, independent of the sharding) and placed like
    the parameters: once per run (and per restart), so the cost is one host copy of the parameters; a
    jitted jax.random draw over hundreds of leaves would cost more in compilation than in transfer."""
    out = []
    for i, (x, dt) in enumerate(zip(leaves, dtypes)):
        z = np.random.default_rng([seed, draw, i]).standard_normal(np.shape(x)).astype(dt)
        sharding = getattr(x, "sharding", None)
        out.append(jax.device_put(z, sharding) if isinstance(sharding, NamedSharding) else jnp.asarray(z))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- Lanczos


def lanczos(matvec: Callable[[PyTree, PyTree], PyTree], operand: PyTree, k: int, *, iters: int | None = None,
            seed: int = 0, tol: float = 1e-5) -> LanczosResult:
    """Top-k eigenpairs (largest algebraic) of the symmetric operator v -> matvec(operand, v) on pytrees
    shaped like `operand` (the parameters: their shapes, shardings and work dtypes define the vectors)."""
    leaves = _check_params(operand)
    n = int(sum(np.prod(np.shape(x), dtype=np.int64) for x in leaves))
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
        raise ValueError(f"hessian_top_eigs: k must be an integer in [1, {n}] (the parameter count), got {k!r}")
    k = int(k)
    m = default_iters(k, n) if iters is None else int(iters)
    if not k <= m <= n:
        raise ValueError(f"hessian_top_eigs: iters must be in [k={k}, P={n}], got {iters!r}")

    treedef = jax.tree.structure(operand)
    coef_dtype = np.dtype(jax.dtypes.canonicalize_dtype(np.float64))  # float64 when x64 is on
    dtypes = [_work_dtype(jnp.result_type(x)) for x in leaves]
    # Sharded parameters (every leaf with a NamedSharding): the vectors follow them; else jit decides.
    sharded = all(isinstance(getattr(x, "sharding", None), NamedSharding) for x in leaves)
    vec_shardings = jax.tree.unflatten(treedef, [x.sharding for x in leaves]) if sharded else None
    basis_shardings = jax.tree.unflatten(treedef, [_stacked_sharding(x) for x in leaves]) if sharded else None
    step = jax.jit(functools.partial(_krylov_step, matvec), donate_argnums=1,
                   out_shardings=(basis_shardings, vec_shardings) + (None,) * 5 if sharded else None)
    basis, no_z = jax.jit(lambda: (jax.tree.unflatten(treedef, [jnp.zeros((m, *np.shape(x)), dt)
                                                                for x, dt in zip(leaves, dtypes)]),
                                   jax.tree.unflatten(treedef, [jnp.zeros(np.shape(x), dt)
                                                                for x, dt in zip(leaves, dtypes)])),
                          out_shardings=(basis_shardings, vec_shardings) if sharded else None)()

    def insert_random(basis, row: int, draw: int):
        z = _random_vector(leaves, treedef, dtypes, seed, draw)
        return step(operand, basis, np.zeros(m, coef_dtype), z, True, row, True)[0]

    basis = insert_random(basis, 0, 0)
    upper = np.zeros((m, m))  # upper[i, j] = v_iᵀ H v_j for i <= j: the projected matrix M = Vᵀ H V
    row_sums = np.zeros(m)  # Σ entries of each basis row, for the sign of the returned vectors
    restarts, converged, steps = 0, False, 0
    for j in range(m):
        e_j = np.zeros(m, coef_dtype)
        e_j[j] = 1.0
        basis, _, coef, beta, _, _, total = step(operand, basis, e_j, no_z, False, min(j + 1, m - 1), j + 1 < m)
        steps = j + 1
        upper[:steps, j] = np.asarray(coef, np.float64)[:steps]
        row_sums[j] = float(total)
        t = np.triu(upper[:steps, :steps])
        ritz, ritz_s = np.linalg.eigh(t + np.triu(t, 1).T)
        ritz, ritz_s = ritz[::-1], ritz_s[:, ::-1]
        beta = float(beta)
        scale = max(float(np.max(np.abs(ritz))), np.finfo(np.float32).tiny)
        # H y_i − θ_i y_i = β_j s_{j,i} v_{j+1}: the residual of Ritz pair i is β_j |s_{j,i}|.
        if steps >= max(k, min(m, 2 * k)) and np.all(beta * np.abs(ritz_s[-1, :k]) <= tol * scale):
            converged = True
            break
        if steps < m and beta <= 0.1 * tol * scale:  # invariant subspace: restart orthogonally to V
            restarts += 1
            basis = insert_random(basis, j + 1, restarts)

    values, vectors, residuals = [], [], []
    for i in range(k):
        s = np.zeros(m)
        s[:steps] = ritz_s[:, i]
        s *= -1.0 if float(s[:steps] @ row_sums[:steps]) < 0 else 1.0  # the sum of the entries is >= 0
        basis, y, _, _, theta, residual, _ = step(operand, basis, s.astype(coef_dtype), no_z, False, 0, False)
        values.append(float(theta))  # the Rayleigh quotient of the returned vector
        residuals.append(float(residual))
        vectors.append(y)
    residuals = np.asarray(residuals)
    if not converged or np.any(residuals > 10 * tol * scale):
        log.warning("hessian_top_eigs: after %d steps (%d restarts) the top-%d residuals ‖Hy − θy‖ / max|θ| "
                    "reach %.2e (tol %.0e)%s", steps, restarts, k, residuals.max() / scale, tol,
                    "" if converged else "; raise iters")
    order = np.argsort(-np.asarray(values), kind="stable")
    return LanczosResult(np.asarray(values)[order], [vectors[i] for i in order], residuals[order], steps,
                         converged, restarts)


def hessian_top_eigs(loss_fn: Callable[[PyTree], Any], params: PyTree, k: int, *, iters: int | None = None,
                     seed: int = 0, tol: float = 1e-5) -> tuple[np.ndarray, list]:
    """The k largest (algebraic) eigenvalues of the Hessian of `loss_fn` at `params`, descending, as numpy
    float64 [k], and their unit eigenvectors: k pytrees shaped and sharded like `params` (float32, or float64
    for float64 leaves), each signed so that the sum of its entries is >= 0. Lanczos with full
    reorthogonalisation on jitted Hessian-vector products; see the module docstring for the default
    `iters` (at most that many products, plus k to check the residuals) and the convergence test (`tol`,
    relative to the largest |Ritz value|). `loss_fn` is traced inside jit: arrays it closes over (a batch)
    become constants of the compiled products."""
    res = lanczos(hvp(loss_fn), params, k, iters=iters, seed=seed, tol=tol)
    return res.values, res.vectors
