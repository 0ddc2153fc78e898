"""Stage 2 of MERIT, the library: the conflict-aware split of a task mixture (docs/SPLIT.md has the math and
decisions).

    task gradients [T, d] --cosine--> C [T, T] --centred PCA--> scores [T, r]
                          --recursive token-weighted median split--> K = 2**depth groups of task rows

Baselines, chosen by `split.method`: `random` (seeded, token-balanced), `conflict` (token-balanced kernel
k-means on C: no PCA, no median) and `none` (one group: joint training).

The math is pure functions on arrays: the cosine matrix and the eigendecomposition in jnp, the discrete
split logic (sorting, cuts, local search) in numpy; they take plain arguments, never the ConfigDict. The
pipeline stage that reads extract/ and writes split/ is merit_jax/stages/split.py.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

METHODS = ("merit", "random", "conflict", "none")
AXES = ("global", "local")
_HIGHEST = jax.lax.Precision.HIGHEST  # accelerators would otherwise use reduced-precision matmuls


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------

def _task_label(i: int, names: Sequence[str] | None) -> str:
    return f"row {i} (task {names[i]!r})" if names is not None else f"row {i}"


def _check_names(names: Sequence[str] | None, t: int) -> list[str] | None:
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) != t:
        raise ValueError(f"names: {len(names)} task names for {t} tasks")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"names: task name {name!r} appears twice (rows {seen[name]} and {i})")
        seen[name] = i
    return names


def _check_tokens(tokens: Any, t: int, names: Sequence[str] | None = None) -> np.ndarray:
    """Supervised-token counts float64[T]; every task must carry a positive, finite count."""
    tok = np.asarray(tokens, dtype=np.float64)
    if tok.ndim != 1 or tok.shape[0] != t:
        raise ValueError(f"tokens: expected shape [{t}] (one count per task), got {list(tok.shape)}")
    for i in range(t):
        if not np.isfinite(tok[i]) or tok[i] <= 0:
            raise ValueError(f"tokens: {_task_label(i, names)} has {tok[i]} supervised tokens; "
                             "every task needs a positive count")
    return tok


def _check_depth(depth: int, t: int) -> int:
    if isinstance(depth, bool) or int(depth) != depth or depth < 0:
        raise ValueError(f"split depth must be an integer >= 0, got {depth!r}")
    depth = int(depth)
    if 2 ** depth > t:
        raise ValueError(f"split depth {depth} asks for {2 ** depth} groups but there are only {t} tasks "
                         "(tasks are indivisible); lower the depth")
    return depth


def _check_cosine(cos_tt: Any, names: Sequence[str] | None = None) -> np.ndarray:
    cos = np.asarray(cos_tt, dtype=np.float32)
    if cos.ndim != 2 or cos.shape[0] != cos.shape[1] or cos.shape[0] == 0:
        raise ValueError(f"cosine matrix: expected a non-empty square [T, T] array, got {list(cos.shape)}")
    bad = np.flatnonzero(~np.isfinite(cos).all(axis=1))
    if bad.size:
        raise ValueError(f"cosine matrix: {_task_label(int(bad[0]), names)} has a non-finite entry")
    return cos


def _tie_rank(names: Sequence[str] | None, t: int) -> np.ndarray:
    """Secondary sort key: the task's rank by name, so ties do not depend on the input row order."""
    if names is None:
        return np.arange(t)
    rank = np.empty(t, dtype=np.int64)
    rank[np.argsort(np.asarray(names, dtype=object), kind="stable")] = np.arange(t)
    return rank


# --------------------------------------------------------------------------------------------------
# Cosine matrix and centred PCA
# --------------------------------------------------------------------------------------------------

def cosine_matrix(task_grads_td: Any, names: Sequence[str] | None = None) -> np.ndarray:
    """Cosine similarity of the tasks' gradients: float32 [T, T], symmetric, exact 1 on the diagonal.

    A row that is all zeros or holds a NaN/inf has no direction: that is an error naming the row (and the
    task, when `names` are given), never a silent 0.
    """
    g = np.asarray(task_grads_td)
    if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
        raise ValueError(f"task gradients: expected a non-empty [T, d] array, got shape {list(g.shape)}")
    names = _check_names(names, g.shape[0])
    finite = np.isfinite(g).all(axis=1)
    for i in np.flatnonzero(~finite):
        raise ValueError(f"task gradients: {_task_label(int(i), names)} holds NaN or inf")
    # Rows are first scaled by their largest |entry| so that the norm cannot overflow float32.
    peak = np.abs(g).max(axis=1)
    for i in np.flatnonzero(peak == 0):
        raise ValueError(f"task gradients: {_task_label(int(i), names)} is all zeros (no direction)")
    scaled = (g / peak[:, None]).astype(np.float32)  # in the input's precision, before any cast
    return np.asarray(_cosine_core(jnp.asarray(scaled)), dtype=np.float32)


@jax.jit
def _cosine_core(x_td: jax.Array) -> jax.Array:
    x = x_td / jnp.linalg.norm(x_td, axis=1, keepdims=True)
    cos = jnp.matmul(x, x.T, precision=_HIGHEST)
    cos = jnp.clip(0.5 * (cos + cos.T), -1.0, 1.0)  # exact symmetry; rounding can exceed |1|
    return cos.at[jnp.diag_indices(cos.shape[0])].set(1.0)


class PCA(NamedTuple):
    """Principal components of the tasks, each task described by its row of the cosine matrix."""
    scores_tr: np.ndarray  # float32 [T, r]: task coordinates on the top-r axes (sign-fixed)
    axes_tr: np.ndarray  # float32 [T, r]: the unit principal axes (columns), in feature space
    eigenvalues_r: np.ndarray  # float32 [r]: variance along each axis, descending
    explained_r: np.ndarray  # float32 [r]: eigenvalue / sum of all eigenvalues
    mean_t: np.ndarray  # float32 [T]: the mean row that was subtracted (zeros when uncentred)


def _orient(scores_tr: np.ndarray, axes_tr: np.ndarray) -> None:
    """Fixes each component's sign in place (an eigenvector's sign is arbitrary).

    Rule: the task with the largest |score| scores positive. If tasks of opposite signs tie for the
    largest |score| (relative 1e-5), the sign making the third moment sum(score**3) positive; if that is
    zero too (a symmetric cloud), eigh's sign is kept. The rule is equivariant under reordering the tasks.
    (A "sum of scores positive" rule would not work: centred scores sum to zero.)
    """
    for c in range(scores_tr.shape[1]):
        s = scores_tr[:, c].astype(np.float64)
        mag = np.abs(s)
        top = mag.max()
        if top == 0:
            continue
        near = mag >= top * (1.0 - 1e-5)
        signs = np.unique(np.sign(s[near]))
        if signs.size == 1:
            flip = signs[0] < 0
        else:
            m3 = float(np.sum(s ** 3))
            flip = m3 < 0 and abs(m3) > 1e-6 * float(np.sum(mag ** 3))
        if flip:
            scores_tr[:, c] *= -1
            axes_tr[:, c] *= -1


@functools.partial(jax.jit, static_argnums=1)
def _pca_core(x_tt: jax.Array, center: bool):
    """Mean row [T], eigenvalues [T] (descending), axes [T, T] (columns) and scores [T, T] of the rows of
    x. One compiled function per shape: the local-axes option calls it on many group sizes."""
    t = x_tt.shape[0]
    mean = x_tt.mean(axis=0) if center else jnp.zeros((t,), x_tt.dtype)
    xc = x_tt - mean[None, :]
    cov = jnp.matmul(xc.T, xc, precision=_HIGHEST) / max(t - 1, 1)
    evals, evecs = jnp.linalg.eigh(0.5 * (cov + cov.T))  # ascending
    evals, evecs = evals[::-1], evecs[:, ::-1]
    return mean, evals, evecs, jnp.matmul(xc, evecs, precision=_HIGHEST)


def pca_scores(cos_tt: Any, r: int, *, center: bool = True) -> PCA:
    """Top-r PCA of the tasks, features = their rows of the cosine matrix.

    center=True (the default, and MERIT's): the rows are centred across tasks before the decomposition.
    Real task gradients share a large common component (plain language modelling), which makes every
    cosine large and positive; an uncentred decomposition puts that shared direction first and would split
    on nothing. A constant added to every cosine adds the same row to every task, which centring removes.
    center=False: eigenvectors of C itself (since C is symmetric, the uncentred PCA of its rows has the
    eigenvectors of C as axes, and scores = C v = lambda v); kept for the ablation that shows the problem.
    """
    cos = _check_cosine(cos_tt)
    t = cos.shape[0]
    if isinstance(r, bool) or int(r) != r or not 1 <= r <= t:
        raise ValueError(f"pca_scores: r must be an integer in [1, T={t}], got {r!r}")
    r = int(r)
    mean, evals, evecs, scores_all = _pca_core(jnp.asarray(cos, jnp.float32), center)
    axes, scores = evecs[:, :r], scores_all[:, :r]
    evals_np = np.maximum(np.asarray(evals, dtype=np.float64), 0.0)  # rounding can give tiny negatives
    total = evals_np.sum()
    explained = evals_np[:r] / total if total > 0 else np.zeros(r)
    scores_np = np.array(scores, dtype=np.float32)
    axes_np = np.array(axes, dtype=np.float32)
    _orient(scores_np, axes_np)
    return PCA(scores_np, axes_np, evals_np[:r].astype(np.float32), explained.astype(np.float32),
               np.asarray(mean, dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# MERIT: recursive token-weighted median split
# --------------------------------------------------------------------------------------------------

def weighted_median_cut(scores_n: Any, tokens_n: Any, *, min_side: int = 1,
                        tie_key_n: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Cuts n indivisible tasks, sorted by score, where the two sides' token totals are closest.

    Returns (low, high): positions into the inputs, each in ascending score order. Among the cuts that
    leave at least `min_side` tasks on each side, the one minimising |tokens(low) - tokens(high)| wins;
    ties go to the larger score gap at the cut (the more natural boundary), then to the cut with fewer
    tasks on the low side. Equal scores are ordered by `tie_key_n` (default: position).
    Guarantee (when min_side does not bind): |tokens(low) - total/2| <= max task tokens / 2.
    """
    s = np.asarray(scores_n, dtype=np.float64)
    tok = np.asarray(tokens_n, dtype=np.float64)
    n = s.shape[0]
    if n < 2 or tok.shape != (n,):
        raise ValueError(f"weighted_median_cut: need >= 2 tasks with one token count each, "
                         f"got scores {list(s.shape)} and tokens {list(tok.shape)}")
    if not 1 <= min_side <= n // 2:
        raise ValueError(f"weighted_median_cut: min_side={min_side} impossible for {n} tasks")
    key = np.arange(n) if tie_key_n is None else np.asarray(tie_key_n)
    order = np.lexsort((key, s))
    s_sorted, t_sorted = s[order], tok[order]
    cuts = np.arange(min_side, n - min_side + 1)  # c tasks on the low side
    low = np.cumsum(t_sorted)[cuts - 1]
    imbalance = np.abs(2.0 * low - t_sorted.sum())
    gap = s_sorted[cuts] - s_sorted[cuts - 1]
    best = cuts[np.lexsort((cuts, -gap, imbalance))[0]]
    return order[:best], order[best:]


def merit_groups(cos_tt: Any, tokens: Any, depth: int, *, names: Sequence[str] | None = None,
                 axes: str = "global", center: bool = True, pca: PCA | None = None) -> list[list[int]]:
    """MERIT's partition of the tasks from their cosine matrix: K = 2**depth lists of row indices.

    Level l (0-based) cuts every current group in two by the token-weighted median along principal axis l:
    axes="global" uses component l of the PCA of the whole cosine matrix (the paper: "top-r PCA, then
    recursive token-weighted median split"); axes="local" recomputes a PCA on each group's own cosine
    sub-matrix and cuts along its first component. A side keeps at least 2**(levels left) tasks, so every
    final group is non-empty. Groups are listed low side first; row indices ascend within a group.
    """
    cos = _check_cosine(cos_tt, names)
    t = cos.shape[0]
    names = _check_names(names, t)
    tok = _check_tokens(tokens, t, names)
    depth = _check_depth(depth, t)
    if axes not in AXES:
        raise ValueError(f"split axes must be one of {AXES}, got {axes!r}")
    rank = _tie_rank(names, t)
    if depth > 0 and axes == "global" and pca is None:
        pca = pca_scores(cos, depth, center=center)
    if pca is not None and axes == "global" and pca.scores_tr.shape[1] < depth:
        raise ValueError(f"merit_groups: the given PCA has {pca.scores_tr.shape[1]} components, "
                         f"depth {depth} needs {depth}")
    groups = [np.arange(t)]
    for level in range(depth):
        if axes == "global" and pca.explained_r[level] < 1e-6:
            log.warning("split: principal axis %d explains %.2e of the variance; its cut is arbitrary",
                        level, pca.explained_r[level])
        min_side = 2 ** (depth - level - 1)
        next_groups = []
        for g in groups:
            if axes == "global":
                s = pca.scores_tr[g, level]
            else:
                s = pca_scores(cos[np.ix_(g, g)], 1, center=center).scores_tr[:, 0]
            low, high = weighted_median_cut(s, tok[g], min_side=min_side, tie_key_n=rank[g])
            next_groups += [g[low], g[high]]
        groups = next_groups
    return [sorted(int(i) for i in g) for g in groups]


def conflict_split(task_grads: Any, tokens: Any, depth: int, *, names: Sequence[str] | None = None,
                   axes: str = "global", center: bool = True) -> list[list[int]]:
    """MERIT's split (the DESIGN.md entry point): [T, d] gradients, [T] tokens, depth r -> K = 2**r lists
    of row indices. Deterministic, and invariant to the order of the rows (up to exact score ties, which
    `names` break by name)."""
    return merit_groups(cosine_matrix(task_grads, names), tokens, depth, names=names, axes=axes,
                        center=center)


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------

def _canonical_order(names: Sequence[str] | None, t: int) -> np.ndarray:
    """Rows in name order when names are known, so that seeded baselines ignore the input row order."""
    return np.arange(t) if names is None else np.argsort(np.asarray(names, dtype=object), kind="stable")


def _check_k(k: int, t: int) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= t:
        raise ValueError(f"split: {k!r} groups asked for {t} tasks; need 1 <= k <= T (tasks are indivisible)")
    return int(k)


def _greedy_balance(order: np.ndarray, tok: np.ndarray, k: int) -> np.ndarray:
    """Labels [T]: tasks taken in `order`, each to the group with the fewest tokens so far (lowest index
    on ties). List scheduling bound: max group - min group <= the largest task."""
    labels = np.empty(tok.shape[0], dtype=np.int64)
    load = np.zeros(k)
    for i in order:
        g = int(np.argmin(load))
        labels[i] = g
        load[g] += tok[i]
    return labels


def _groups_from_labels(labels: np.ndarray, k: int) -> list[list[int]]:
    return [sorted(int(i) for i in np.flatnonzero(labels == g)) for g in range(k)]


def random_split(tokens: Any, k: int, seed: int = 0, *, names: Sequence[str] | None = None) -> list[list[int]]:
    """The `random` baseline: a seeded random order, then greedy token balancing (each task to the
    lightest group). Every group's tokens are within the largest task's count of every other's.
    With `names`, the result (as task identities) does not depend on the input row order."""
    if np.ndim(tokens) != 1:
        raise ValueError(f"tokens: expected shape [T] (one count per task), got {list(np.shape(tokens))}")
    t = int(np.size(tokens))
    names = _check_names(names, t)
    tok = _check_tokens(tokens, t, names)
    k = _check_k(k, t)
    canon = _canonical_order(names, t)
    order = canon[np.random.default_rng(seed).permutation(t)]
    return _groups_from_labels(_greedy_balance(order, tok, k), k)


def kmeans_objective(cos_tt: Any, labels: Any, k: int) -> float:
    """sum_k (1/|G_k|) sum_{i,j in G_k} C_ij: k-means on the unit task gradients, as a kernel objective.
    Invariant to a constant added to every cosine (it adds T), unlike the plain within-group sum."""
    c = np.asarray(cos_tt, dtype=np.float64)
    lab = np.asarray(labels)
    total = 0.0
    for g in range(k):
        m = lab == g
        if m.any():
            total += c[np.ix_(m, m)].sum() / m.sum()
    return total


def _kmeans_local_search(c: np.ndarray, tok: np.ndarray, labels: np.ndarray, k: int,
                         tol: float) -> np.ndarray:
    """Steepest ascent on kmeans_objective by single moves and pair swaps that keep every group's tokens
    within `tol` of the mean (and every group non-empty). Ties: first in row order."""
    t = c.shape[0]
    labels = labels.copy()
    target = tok.sum() / k
    d = np.diag(c)
    for _ in range(20 * t):
        onehot = np.eye(k)[labels]  # [T, K]
        s = c @ onehot  # s[i, g] = sum_{j in g} C_ij
        n = onehot.sum(0)
        load = tok @ onehot
        a = (s * onehot).sum(0)  # within-group sums A_g
        s_own = s[np.arange(t), labels]
        # Moves: i from its group a to group b.
        a_from = a[labels] - 2 * s_own + d  # [T]
        n_from = n[labels] - 1
        a_to = a[None, :] + 2 * s + d[:, None]  # [T, K]
        gain_mv = (a_from / np.maximum(n_from, 1))[:, None] + a_to / (n[None, :] + 1) \
            - (a / n)[labels][:, None] - (a / n)[None, :]  # groups are never empty: n >= 1
        ok_mv = ((onehot == 0) & (n_from[:, None] > 0)
                 & (np.abs(load[labels] - tok - target)[:, None] <= tol)
                 & (np.abs(load[None, :] + tok[:, None] - target) <= tol))
        gain_mv = np.where(ok_mv, gain_mv, -np.inf)
        # Swaps: i (in a) <-> j (in b), counts unchanged.
        s_other = s[:, labels]  # s_other[j, i] = s[j, labels[i]]
        da = -2 * s_own[:, None] + 2 * s_other.T - 2 * c + d[:, None] + d[None, :]
        db = -2 * s_own[None, :] + 2 * s_other - 2 * c + d[:, None] + d[None, :]
        gain_sw = da / n[labels][:, None] + db / n[labels][None, :]
        dt = tok[None, :] - tok[:, None]  # load change of i's group
        ok_sw = ((labels[:, None] < labels[None, :])
                 & (np.abs(load[labels][:, None] + dt - target) <= tol)
                 & (np.abs(load[labels][None, :] - dt - target) <= tol))
        gain_sw = np.where(ok_sw, gain_sw, -np.inf)
        best_mv, best_sw = gain_mv.max(), gain_sw.max()
        if max(best_mv, best_sw) <= 1e-9 * max(1.0, abs(a.sum())):
            break
        if best_mv >= best_sw:
            i, b = np.unravel_index(np.argmax(gain_mv), gain_mv.shape)
            labels[i] = b
        else:
            i, j = np.unravel_index(np.argmax(gain_sw), gain_sw.shape)
            labels[i], labels[j] = labels[j], labels[i]
    return labels


def cosine_kmeans_split(cos_tt: Any, tokens: Any, k: int, seed: int = 0, *,
                        names: Sequence[str] | None = None, restarts: int = 16,
                        balance_tol: float | None = None) -> list[list[int]]:
    """The `conflict` baseline: conflict-aware grouping without PCA or a median.

    Maximises kmeans_objective (mean within-group cosine, summed over groups; the same as k-means on the
    unit-normalised task gradients), so tasks that conflict (negative cosine) land in different groups,
    under a token-balance constraint: every group's tokens within `balance_tol` (default: the largest
    task's count) of the mean. Local search by moves and swaps from `restarts` seeded token-balanced random
    starts; the best objective wins (ties: the earliest restart). With `names`, the result does not depend
    on the input row order.
    """
    cos = _check_cosine(cos_tt, names)
    t = cos.shape[0]
    names = _check_names(names, t)
    tok = _check_tokens(tokens, t, names)
    k = _check_k(k, t)
    if restarts < 1:
        raise ValueError(f"cosine_kmeans_split: restarts must be >= 1, got {restarts}")
    tol = float(tok.max()) if balance_tol is None else float(balance_tol)
    canon = _canonical_order(names, t)  # work in name order, map back at the end
    c = cos.astype(np.float64)[np.ix_(canon, canon)]
    tk = tok[canon]
    rng = np.random.default_rng(seed)
    best_labels, best_obj = None, -np.inf
    for _ in range(restarts):
        start = _greedy_balance(rng.permutation(t), tk, k)
        labels = _kmeans_local_search(c, tk, start, k, tol)
        obj = kmeans_objective(c, labels, k)
        if obj > best_obj + 1e-9 * max(1.0, abs(obj)):
            best_labels, best_obj = labels, obj
    labels = np.empty(t, dtype=np.int64)
    labels[canon] = best_labels
    rank = _tie_rank(names, t)
    return sorted(_groups_from_labels(labels, k), key=lambda g: int(rank[g].min()))  # canonical order


def partition(method: str, cos_tt: Any, tokens: Any, depth: int, *, seed: int = 0,
              names: Sequence[str] | None = None, axes: str = "global", center: bool = True,
              restarts: int = 16, pca: PCA | None = None) -> list[list[int]]:
    """Dispatch on split.method: merit | random | conflict (K = 2**depth groups) | none (one group)."""
    cos = _check_cosine(cos_tt, names)
    t = cos.shape[0]
    if method == "none":
        _check_tokens(tokens, t, _check_names(names, t))
        return [list(range(t))]
    depth = _check_depth(depth, t)
    if method == "merit":
        return merit_groups(cos, tokens, depth, names=names, axes=axes, center=center, pca=pca)
    if method == "random":
        return random_split(tokens, 2 ** depth, seed, names=names)
    if method == "conflict":
        return cosine_kmeans_split(cos, tokens, 2 ** depth, seed, names=names, restarts=restarts)
    raise ValueError(f"split.method must be one of {METHODS}, got {method!r}")


# --------------------------------------------------------------------------------------------------
# Measures of a split
# --------------------------------------------------------------------------------------------------

def labels_from_groups(groups: Sequence[Sequence[int]], t: int) -> np.ndarray:
    """int64[T] group index of each row; every row must appear in exactly one group."""
    labels = np.full(t, -1, dtype=np.int64)
    for g, rows in enumerate(groups):
        for i in rows:
            if not 0 <= i < t:
                raise ValueError(f"groups: row {i} out of range for {t} tasks")
            if labels[i] >= 0:
                raise ValueError(f"groups: row {i} is in groups {labels[i]} and {g}")
            labels[i] = g
    missing = np.flatnonzero(labels < 0)
    if missing.size:
        raise ValueError(f"groups: rows {missing.tolist()} are in no group")
    return labels


def _codes(labels: Sequence[Any]) -> np.ndarray:
    _, codes = np.unique(np.asarray([str(x) for x in labels]), return_inverse=True)
    return codes


def adjusted_rand_index(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> float:
    """Adjusted Rand index of two labelings of the same items (1: identical partitions, ~0: chance)."""
    a, b = _codes(labels_a), _codes(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"adjusted_rand_index: {a.shape[0]} and {b.shape[0]} labels")
    n = a.shape[0]
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.float64)
    np.add.at(table, (a, b), 1.0)

    def pairs(x: np.ndarray) -> float:
        return float(np.sum(x * (x - 1) / 2))

    sum_ab, sum_a, sum_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    total = n * (n - 1) / 2
    expected = sum_a * sum_b / total if total > 0 else 0.0
    max_index = 0.5 * (sum_a + sum_b)
    if max_index == expected:  # both partitions trivial (all-in-one or all singletons)
        return 1.0 if sum_ab == expected else 0.0
    return float((sum_ab - expected) / (max_index - expected))


def family_purity(groups: Sequence[Sequence[int]], families: Sequence[Any]) -> float:
    """Fraction of tasks that belong to their group's most common family (1: no group mixes families)."""
    labels = labels_from_groups(groups, len(families))
    fam = _codes(families)
    hits = sum(np.bincount(fam[labels == g]).max() for g in range(len(groups)) if (labels == g).any())
    return float(hits / len(families))


def family_separation(groups: Sequence[Sequence[int]], families: Sequence[Any], tokens: Any,
                      n_random: int = 100) -> dict[str, float]:
    """ARI and purity of `groups` against the task families, next to the same for `n_random` seeded
    random token-balanced splits with as many groups (the chance level to beat)."""
    t = len(families)
    fam = list(families)
    ari = adjusted_rand_index(labels_from_groups(groups, t), fam)
    rand_ari, rand_pur = [], []
    for seed in range(n_random):
        rg = random_split(tokens, len(groups), seed)
        rand_ari.append(adjusted_rand_index(labels_from_groups(rg, t), fam))
        rand_pur.append(family_purity(rg, fam))
    return {"ari": ari, "purity": family_purity(groups, fam),
            "random_ari_mean": float(np.mean(rand_ari)), "random_ari_std": float(np.std(rand_ari)),
            "random_purity_mean": float(np.mean(rand_pur)), "n_random": n_random,
            "random_ari_rank": float(np.mean(np.asarray(rand_ari) < ari))}


# --------------------------------------------------------------------------------------------------
# The run's split against the paper's literal reading; cosine summary
# --------------------------------------------------------------------------------------------------

def top_level(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """The first cut of a recursive split (groups listed low side first): the first half of the groups
    against the second."""
    half = len(groups) // 2
    return [sorted(sum(map(list, groups[:half]), [])), sorted(sum(map(list, groups[half:]), []))]


def literal_agreement(cos_tt: Any, tokens: Any, groups: Sequence[Sequence[int]],
                      names: Sequence[str] | None = None) -> dict[str, Any]:
    """How far a split is from the paper's literal reading on the same gradients: MERIT's recursive median
    split along the principal axes of the *uncentred* cosine matrix, at the same depth. ARI of the top-level
    cut and of the whole partition (1: identical, ~0: unrelated)."""
    t = np.asarray(cos_tt).shape[0]
    depth = max(1, int(round(math.log2(len(groups)))))
    literal = merit_groups(cos_tt, tokens, depth, names=names, axes="global", center=False)
    top_run = labels_from_groups(top_level(groups), t)
    top_literal = labels_from_groups(top_level(literal), t)
    return {"reference": "merit split of the uncentred cosine matrix (configs/paper_literal.py), same gradients",
            "ari_top_level": adjusted_rand_index(top_run, top_literal),
            "ari": adjusted_rand_index(labels_from_groups(groups, t), labels_from_groups(literal, t)),
            "literal_groups": [[(names[i] if names else i) for i in g] for g in literal]}


def cosine_summary(cos: np.ndarray, labels: np.ndarray, k: int) -> dict[str, Any]:
    """Mean off-diagonal cosine within each group and across groups (conflict the split left inside)."""
    c = cos.astype(np.float64)
    off = ~np.eye(c.shape[0], dtype=bool)
    same = labels[:, None] == labels[None, :]
    within = []
    for g in range(k):
        m = np.outer(labels == g, labels == g) & off
        within.append(float(c[m].mean()) if m.any() else None)
    cross = c[~same]
    return {"mean_all": float(c[off].mean()) if off.any() else None, "mean_within": within,
            "mean_cross": float(cross.mean()) if cross.size else None,
            "negative_fraction": float((c[off] < 0).mean()) if off.any() else None}
