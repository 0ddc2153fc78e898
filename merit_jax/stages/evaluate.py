"""The `evaluate` stage: held-out loss and exact-match accuracy per task for θ⁰, every branch, the merged
model and the baselines the config asks for, plus the merge-readiness diagnostics (merit_jax/evaluation.py)
and the Hessian–PCA alignment (merit_jax/alignment.py).

Baselines are whole MERIT sub-runs with another config, in WORKDIR/baselines/NAME/ (each resumable and
skipped once done), all from the same θ⁰ and at the same training tokens as the main run:
  joint    split.method=none (one branch on every task), train.epochs as the main run
  joint2   the same with twice the epochs
  random   split.method=random (token-balanced, seeded), same depth
  conflict split.method=conflict (cosine k-means, see docs/SPLIT.md), same depth
  uniform  the main run's branches merged with equal weights (no training)
main.py runs them (its BASELINE_STAGES, on `baseline_config`) before this stage reads their merged models.
Results: WORKDIR/evaluate/results.json (the report stage turns it into tables and pictures).
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time

import numpy as np

from merit_jax import config
from merit_jax.io import checkpoint
from merit_jax import artifacts as wd
from merit_jax.data.mixture import load_mixture, load_tokenizer
from merit_jax.data.vision import is_vl_run, row_images_for
from merit_jax.evaluation import Evaluator, evaluate_models
from merit_jax.merging import MERGE_INFO_FILE, merge_checkpoints
from merit_jax.io.load import load_model
from merit_jax.stages import theta0_of

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- baselines


def baseline_config(cfg, workdir: pathlib.Path, name: str):
    """The config of baseline `name`: same θ⁰, data and hyperparameters, another split or schedule. For a
    baseline that trains, its work directory starts with the main run's extraction (the split reads it)."""
    sub = cfg.copy_and_resolve_references()
    data = config.data_settings(cfg)
    with sub.unlocked():
        sub.model.hf_path = str(theta0_of(cfg, workdir).absolute())
        sub.basin.enabled = False
        if not data.path and not data.tasks:  # share the main run's generated mixture
            from merit_jax.data.sources import synthetic_dir
            sub.data.path = str(synthetic_dir(data, workdir).absolute())
        sub.split.method = {"joint": "none", "joint2": "none"}.get(name, name)
        if name == "joint2":
            sub.train.epochs = 2 * cfg.train.epochs
        sub.evaluate.baselines = []
    sub_dir = wd.baseline_dir(workdir, name)
    if name != "uniform" and not wd.tasks_file(sub_dir).exists():
        shutil.copytree(wd.extract_dir(workdir), wd.extract_dir(sub_dir), dirs_exist_ok=True)
    log.info("baseline %s: split=%s epochs=%s in %s", name, sub.split.method, sub.train.epochs, sub_dir)
    return sub


def merge_uniform(workdir: pathlib.Path) -> pathlib.Path:
    """The `uniform` baseline: the main run's branches merged with equal weights (no training)."""
    out = wd.merged_dir(wd.baseline_dir(workdir, "uniform"))
    if checkpoint.is_checkpoint(out):
        return out
    branches = [wd.branch_final(workdir, k) for k in range(len(wd.read_partition(workdir)["groups"]))]
    return merge_checkpoints(branches, out, method="uniform", overwrite=True)


# ------------------------------------------------------------------------------------------------ stage


def models_to_evaluate(cfg, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    models = {"theta0": theta0_of(cfg, workdir)}
    k = len(wd.read_partition(workdir)["groups"])
    if k > 1:
        models.update({f"branch{i}": wd.branch_final(workdir, i) for i in range(k)})
    models["merit"] = wd.merged_dir(workdir)
    for name in config.evaluate_settings(cfg).baselines:
        models[name] = wd.merged_dir(wd.baseline_dir(workdir, name))
        if not checkpoint.is_checkpoint(models[name]):
            raise FileNotFoundError(f"baseline {name}: no merged model at {models[name]} (run the evaluate stage "
                                    "through merit_jax.main, which runs the baselines first)")
    return models


def run(cfg, workdir: pathlib.Path) -> dict:
    workdir = pathlib.Path(workdir)
    out_file = wd.results_file(workdir)
    if out_file.is_file():
        log.info("evaluate: %s exists, skipping", out_file)
        alignment_diagnostic(cfg, workdir)
        return wd.read_json(out_file)
    data, model, s = config.data_settings(cfg), config.model_settings(cfg), config.evaluate_settings(cfg)
    models = models_to_evaluate(cfg, workdir)
    tokenizer = load_tokenizer(data)
    mixture = load_mixture(data, tokenizer, workdir)
    template = load_model(models["theta0"])
    ev = Evaluator(template, mixture, tokenizer, max_len=data.max_len, batch=s.batch_size,
                   max_new_tokens=s.max_new_tokens, make_images=row_images_for(data, template),
                   logits_chunk=model.logits_chunk)
    merge_weights = wd.read_json(wd.merged_dir(workdir) / MERGE_INFO_FILE)["weights"]
    results = {"models": {}, "families": {n: t.family for n, t in mixture.tasks.items()},
               "data": {"records": mixture.stats["records"], "truncated": mixture.stats["truncated"],
                        "skipped": mixture.stats["skipped"], "max_len": int(data.max_len),
                        "truncation": data.truncation,
                        "train_examples": {n: len(t.train) for n, t in mixture.tasks.items()},
                        "heldout_examples": {n: len(t.heldout) for n, t in mixture.tasks.items()}}}
    results.update(evaluate_models(ev, models, s, int(cfg.get("seed", 0)), merge_weights))
    wd.write_json(out_file, results)
    alignment_diagnostic(cfg, workdir, mixture)
    return results


def alignment_diagnostic(cfg, workdir: pathlib.Path, mixture=None) -> dict | None:
    """Hessian–PCA alignment at θ⁰ (merit_jax.alignment) into WORKDIR/evaluate/hessian_alignment.json (its own
    file, written after results.json: a failure here costs no model's evaluation), or {"skipped": why} where it
    does not apply; None when evaluate.hessian_alignment is off. Skipped when the file exists."""
    from merit_jax import alignment
    from merit_jax.partition import pca_scores

    e, data, model_s = config.evaluate_settings(cfg), config.data_settings(cfg), config.model_settings(cfg)
    out_file = wd.alignment_file(workdir)
    if not e.hessian_alignment:
        return None
    if out_file.is_file():
        return wd.read_json(out_file)
    partition = wd.read_partition(workdir)
    record = wd.read_tasks_record(wd.tasks_file(workdir))
    n_params, k = int(record["params"]["coordinates"]), int(e.hessian_k)
    need, budget = alignment.basis_bytes(n_params, k), int(e.hessian_max_bytes)
    why = ("the split did not cut along principal axes (split.method is not merit)"
           if partition.get("method") != "merit" or not partition.get("depth") else
           "Qwen2.5-VL calibration batches carry images; text models only for now" if is_vl_run(data) else
           f"the Lanczos basis would take {need / 2**30:.1f} GiB for {n_params:,} parameters, over "
           f"evaluate.hessian_max_bytes={budget / 2**30:.1f} GiB (narrow extract.include)" if need > budget else None)
    if why:
        log.warning("evaluate: Hessian–PCA alignment skipped: %s", why)
        wd.write_json(out_file, {"skipped": why})
        return {"skipped": why}
    start = time.time()
    if mixture is None:
        mixture = load_mixture(data, load_tokenizer(data), workdir)
    tasks = [mixture.tasks[t["name"]].calib for t in record["tasks"]]
    cos = np.load(wd.cosine_file(workdir))
    # global axes: level l cut along axis l; local axes: only the first cut is along a global one
    axes = int(partition["depth"]) if partition.get("axes", "global") == "global" else 1
    pca = pca_scores(cos, axes, center=bool(partition.get("center", True)))
    row_norms = np.sqrt(np.diag(np.load(wd.gram_file(workdir))))
    full = np.load(wd.task_grads_file(workdir), mmap_mode="r") if record["reduction"] == "full" else None
    mesh = config.mesh_for(cfg)
    model = load_model(theta0_of(cfg, workdir), mesh=mesh, compute_dtype=model_s.compute_dtype)
    out = alignment.hessian_alignment(model, record["params"]["names"], tasks, record["per_example"], pca.axes_tr,
                                      row_norms, task_grads_tp=full, k=k, hessian_examples=int(e.hessian_examples),
                                      seed=int(cfg.get("seed", 0)), logits_chunk=model_s.logits_chunk,
                                      mesh=mesh)
    out["seconds"] = round(time.time() - start, 1)
    log.info("evaluate: Hessian–PCA alignment %s (random %.2e) in %.1fs", ", ".join(f"{a:.3f}" for a in out["axes"]),
             out["random_mean"], out["seconds"])
    wd.write_json(out_file, out)
    return out


