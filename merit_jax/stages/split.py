"""The split stage: extract/{tasks.json, task_grads.npy} -> split/{partition.json, cosine.npy, cosine.png,
pca.png} (the math: merit_jax/partition.py, docs/SPLIT.md).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from merit_jax import config
from merit_jax import artifacts as wd
from merit_jax.partition import (_check_depth, _check_names, _check_tokens, cosine_matrix, cosine_summary,
                                 family_separation, labels_from_groups, literal_agreement, partition, pca_scores,
                                 top_level)

log = logging.getLogger(__name__)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def run(cfg: Any, workdir: pathlib.Path, force: bool = False) -> dict[str, Any]:
    """The split stage: extract/{tasks.json, task_grads.npy} -> split/{partition.json, cosine.npy, *.png}.

    Settings: config.SplitSettings (split.method merit|random|conflict|none, depth, seed, axes global|local,
    center, restarts of the conflict baseline).
    Skipped when split/partition.json exists (it is written last) unless `force`. Returns the partition.
    """
    from merit_jax import plots  # matplotlib is only needed here

    workdir = pathlib.Path(workdir)
    out = wd.split_dir(workdir)
    part_path = wd.partition_file(workdir)
    if part_path.exists() and not force:
        log.info("split: %s exists, skipping", part_path)
        return wd.read_partition(workdir)

    s = config.split_settings(cfg)  # depth 0 for method none
    method, depth, seed, axes = s.method, s.depth, int(s.seed), str(s.axes)
    center, restarts = bool(s.center), int(s.restarts)

    tasks = wd.read_tasks(wd.tasks_file(workdir), require=("train_tokens",))
    names = _check_names([t["name"] for t in tasks], len(tasks))
    tokens = _check_tokens([t["train_tokens"] for t in tasks], len(tasks), names)
    grads = wd.read_task_grads(wd.task_grads_file(workdir), len(tasks))
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

    wd.write_npy(out / "cosine.npy", cos)
    plots.cosine_heatmap(cos, names, groups, out / "cosine.png",
                         title=f"task gradient cosine ({method}, K={len(groups)})")
    plots.pca_scatter(pca.scores_tr, names, labels, out / "pca.png", explained=pca.explained_r,
                      title=f"tasks on the top principal axes ({method}, K={len(groups)})")
    wd.write_json(part_path, record)  # last: its presence marks the stage done
    log.info("split: %s depth=%d -> %d groups of %s tasks, token shares %s", method, depth, len(groups),
             [len(g) for g in groups], ", ".join(f"{w:.3f}" for w in record["weights"]))
    return record
