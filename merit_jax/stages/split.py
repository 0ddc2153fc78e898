"""The split stage: extract/{tasks.json, task_grads.npy} -> split/{partition.json, cosine.npy, cosine.png,
pca.png} (the math: merit_jax/partition.py, docs/SPLIT.md).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np

from merit_jax import workdir as wd
from merit_jax.partition import (METHODS, _check_depth, _check_names, _check_tokens, cosine_matrix, cosine_summary,
                                 family_separation, labels_from_groups, literal_agreement, partition, pca_scores,
                                 top_level)

log = logging.getLogger(__name__)


write_json, write_npy = wd.write_json, wd.write_npy  # atomic (temp file + rename)


def load_tasks(path: pathlib.Path) -> list[dict[str, Any]]:
    """extract/tasks.json: a list of {"name", "n_calib", "train_tokens", "family"?} (or {"tasks": list})."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the extract stage first")
    data = wd.read_tasks(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of tasks")
    for i, task in enumerate(data):
        if not isinstance(task, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        for key in ("name", "train_tokens"):
            if key not in task:
                raise ValueError(f"{path}: entry {i} ({task.get('name', '?')!r}) has no {key!r}")
        if "n_calib" in task and not task["n_calib"] >= 1:
            raise ValueError(f"{path}: task {task['name']!r} has n_calib={task['n_calib']}: "
                             "no calibration example, so no gradient")
    return data


def load_task_grads(path: pathlib.Path, n_tasks: int) -> np.ndarray:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the extract stage first")
    g = np.load(path)
    if g.ndim != 2 or g.shape[0] != n_tasks:
        raise ValueError(f"{path}: shape {list(g.shape)}, but tasks.json lists {n_tasks} tasks "
                         f"(expected [{n_tasks}, d], rows in tasks.json order)")
    return g.astype(np.float32, copy=False)


def _cfg_get(section: Any, key: str, default: Any) -> Any:
    if section is None:
        return default
    if hasattr(section, "get"):
        return section.get(key, default)
    return getattr(section, key, default)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def run(cfg: Any, workdir: pathlib.Path, force: bool = False) -> dict[str, Any]:
    """The split stage: extract/{tasks.json, task_grads.npy} -> split/{partition.json, cosine.npy, *.png}.

    Config: split.method (merit|random|conflict|none), split.depth, split.seed, and optional
    split.axes (global|local), split.center (True), split.restarts (16, the conflict baseline).
    Skipped when split/partition.json exists (it is written last) unless `force`. Returns the partition.
    """
    from merit_jax import plots  # matplotlib is only needed here

    workdir = pathlib.Path(workdir)
    out = workdir / "split"
    part_path = out / "partition.json"
    if part_path.exists() and not force:
        log.info("split: %s exists, skipping", part_path)
        return wd.read_json(part_path)

    scfg = _cfg_get(cfg, "split", None)
    method = str(_cfg_get(scfg, "method", "merit"))
    if method not in METHODS:
        raise ValueError(f"split.method must be one of {METHODS}, got {method!r}")
    depth = 0 if method == "none" else _cfg_get(scfg, "depth", 1)
    seed = int(_cfg_get(scfg, "seed", 0))
    axes = str(_cfg_get(scfg, "axes", "global"))
    center = bool(_cfg_get(scfg, "center", True))
    restarts = int(_cfg_get(scfg, "restarts", 16))

    tasks_path = workdir / "extract" / "tasks.json"
    tasks = load_tasks(tasks_path)
    names = _check_names([t["name"] for t in tasks], len(tasks))
    tokens = _check_tokens([t["train_tokens"] for t in tasks], len(tasks), names)
    grads = load_task_grads(workdir / "extract" / "task_grads.npy", len(tasks))
    n_tasks = len(tasks)
    depth = _check_depth(depth, n_tasks)

    cos = cosine_matrix(grads, names)
    n_axes = min(max(depth, 2), n_tasks)
    pca = pca_scores(cos, n_axes, center=center)
    groups = partition(method, cos, tokens, depth, seed=seed, names=names, axes=axes, center=center,
                       restarts=restarts, pca=pca)
    labels = labels_from_groups(groups, n_tasks)
    group_tokens = [float(tokens[g].sum()) for g in groups]
    total = float(sum(group_tokens))

    record: dict[str, Any] = {
        "method": method,
        "depth": depth,
        "groups": [[names[i] for i in g] for g in groups],
        "tokens": [_number(n) for n in group_tokens],
        "weights": [n / total for n in group_tokens],
        "seed": seed,
        "axes": axes,
        "center": center,
        "n_tasks": n_tasks,
        "group_rows": groups,
        "token_imbalance": max(group_tokens) / min(group_tokens),
        "largest_task_share": float(tokens.max() / total),
        "explained_variance": pca.explained_r.tolist(),  # of the top max(depth, 2) global components
        "pca_eigenvalues": pca.eigenvalues_r.tolist(),
        "cosine": cosine_summary(cos, labels, len(groups)),
    }
    if len(groups) > 1:
        record["literal_agreement"] = literal_agreement(cos, tokens, groups, names)
    families = [t.get("family") for t in tasks]
    if all(f is not None for f in families) and len(groups) > 1:
        record["family_separation"] = family_separation(groups, families, tokens)
        if method == "merit" and depth >= 2:
            record["family_separation_top_level"] = family_separation(top_level(groups), families, tokens)

    write_npy(out / "cosine.npy", cos)
    plots.cosine_heatmap(cos, names, groups, out / "cosine.png",
                         title=f"task gradient cosine ({method}, K={len(groups)})")
    plots.pca_scatter(pca.scores_tr, names, labels, out / "pca.png", explained=pca.explained_r,
                      title=f"tasks on the top principal axes ({method}, K={len(groups)})")
    write_json(part_path, record)  # last: its presence marks the stage done
    log.info("split: %s depth=%d -> %d groups of %s tasks, token shares %s", method, depth, len(groups),
             [len(g) for g in groups], ", ".join(f"{w:.3f}" for w in record["weights"]))
    return record
