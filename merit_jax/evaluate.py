"""The `evaluate` stage: held-out loss and exact-match accuracy per task for θ⁰, every branch, the merged
model and the baselines the config asks for, plus the merge-readiness diagnostics.

Baselines are whole MERIT sub-runs with another config, in WORKDIR/baselines/NAME/ (each resumable and
skipped once done), all from the same θ⁰ and at the same training tokens as the main run:
  joint    split.method=none (one branch on every task), train.epochs as the main run
  joint2   the same with twice the epochs
  random   split.method=random (token-balanced, seeded), same depth
  conflict split.method=conflict (cosine k-means, see docs/SPLIT.md), same depth
  uniform  the main run's branches merged with equal weights (no training)
Results: WORKDIR/evaluate/results.json (the report stage turns it into tables and pictures).
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from merit_jax.config import data_settings
from merit_jax import checkpoint, diagnostics
from merit_jax import merging as merge  # the merge library (merge_checkpoints, MERGE_INFO_FILE)
from merit_jax import workdir as wd
from merit_jax.data.mixture import load_mixture, load_tokenizer
from merit_jax.data.vision import is_vl_run, row_images_for
from merit_jax.lmms_eval_functions import exact_match
from merit_jax.models import params as P
from merit_jax.models.generate import generate, left_pad
from merit_jax.models.io import load_model
from merit_jax.sharding import make_mesh
from merit_jax.training.heldout import HeldoutEval
from merit_jax.training.step import SplitModel

log = logging.getLogger(__name__)
RESULTS = "evaluate/results.json"
DIAGNOSED = ("theta0", "merit", "joint", "joint2")  # models the merge diagnostics look at (with the branches)


# ------------------------------------------------------------------------------------------- baselines


def baseline_config(cfg, workdir: pathlib.Path, name: str):
    """The config of baseline `name`: same θ⁰, data and hyperparameters, another split or schedule."""
    sub = cfg.copy_and_resolve_references()
    with sub.unlocked():
        sub.model.hf_path = str(wd.theta0(cfg, workdir).absolute())
        sub.basin.enabled = False
        if not cfg.data.path and not list(cfg.data.tasks):  # share the main run's generated mixture
            from merit_jax.data.sources import synthetic_dir
            sub.data.path = str(synthetic_dir(data_settings(cfg), workdir).absolute())
        sub.split.method = {"joint": "none", "joint2": "none"}.get(name, name)
        if name == "joint2":
            sub.train.epochs = 2 * cfg.train.epochs
        sub.evaluate.baselines = []
    return sub


def run_baseline(cfg, workdir: pathlib.Path, name: str) -> pathlib.Path:
    """Trains (or reuses) baseline `name`; returns its merged checkpoint."""
    from merit_jax.stages import merge as merge_stage
    from merit_jax.stages import split, train

    sub_dir = workdir / "baselines" / name
    out = wd.merged_dir(sub_dir)
    if checkpoint.is_checkpoint(out):
        return out
    if name == "uniform":
        branches = [wd.branch_final(workdir, k) for k in range(len(wd.read_partition(workdir)["groups"]))]
        return merge.merge_checkpoints(branches, out, method="uniform", overwrite=True)
    sub = baseline_config(cfg, workdir, name)
    if not (sub_dir / "extract" / "tasks.json").exists():  # the split reads the main run's gradients
        shutil.copytree(wd.extract_dir(workdir), sub_dir / "extract", dirs_exist_ok=True)
    log.info("baseline %s: split=%s epochs=%s in %s", name, sub.split.method, sub.train.epochs, sub_dir)
    split.run(sub, sub_dir)
    train.run(sub, sub_dir)
    merge_stage.run(sub, sub_dir)
    return out


# ------------------------------------------------------------------------------------------- evaluator


class Evaluator:
    """Per-task held-out loss and exact-match accuracy of any parameters with the template's structure.

    Losses come from the trainer's held-out evaluator (merit_jax.training.heldout) on this process's first
    device; shapes are fixed (rows of `batch` examples padded to `max_len`), so everything compiles once.
    """

    def __init__(self, template: nnx.Module, mixture, tokenizer, *, max_len: int, batch: int = 32,
                 max_new_tokens: int = 16, make_images=None, logits_chunk: int = 0):
        self.template, self.tokenizer = template, tokenizer
        self.make_images = make_images  # Qwen2.5-VL: examples -> RowImages (images per row, generate_vl)
        self.tasks = list(mixture.tasks)
        self.heldout = [(name, ex) for name in self.tasks for ex in mixture.tasks[name].heldout]
        if not self.heldout:
            raise ValueError("evaluate: no held-out examples (data.heldout_fraction is 0?)")
        self.train_sample = [(name, ex) for name in self.tasks for ex in mixture.tasks[name].calib[:8]]
        self.max_len, self.batch, self.max_new_tokens = max_len, batch, max_new_tokens
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.eos_id is None or self.eos_id == tokenizer.unk_token_id:
            self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id or 0
        self._split = SplitModel(template)
        mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
        self._shardings = self._split.shardings(mesh)
        self._losses = {key: HeldoutEval(self._split, _by_task(items), mesh, max_len, batch, self._shardings,
                                         make_images=make_images, logits_chunk=logits_chunk)
                        for key, items in (("heldout", self.heldout), ("train", self.train_sample))}
        self._gen_images = self._fit_generation_images()

    def _fit_generation_images(self):
        """Qwen2.5-VL: (RowImages for the processor, LayoutSizes, images per batch) fitted on every generation
        batch of the held-out set (their images in one flat list each), so that generate_vl compiles once for
        all of them; None for a text model or images-free held-out set."""
        if self.make_images is None:
            return None
        from merit_jax.models.vision_layout import layout_sizes

        images = self.make_images([ex for _, ex in self.heldout])
        batches = [images.grids(range(i, min(i + self.batch, len(self.heldout))))
                   for i in range(0, len(self.heldout), self.batch)]
        if not any(len(g) for g in batches):
            return None
        return images, layout_sizes(batches, self.template.vl_config.vision), max(len(g) for g in batches)

    def state_of(self, flat: dict) -> nnx.State:
        P.unflatten_into(self.template, flat)
        return nnx.split(self.template)[1]

    def task_losses(self, flat: dict, which: str = "heldout") -> dict[str, float]:
        """{task: mean cross-entropy per supervised token} over the held-out set (or the train sample)."""
        self.state_of(flat)  # names checked, dtypes the template's
        params = jax.device_put(SplitModel.params_of(self.template), self._shardings)
        losses = self._losses[which].task_losses(params)
        return {name: losses[name] for name in self.tasks if name in losses}

    def mean_loss(self, flat: dict, which: str = "heldout") -> float:
        return float(np.mean(list(self.task_losses(flat, which).values())))

    def answers(self, flat: dict) -> list[str]:
        """The greedy answer to every held-out example (in `self.heldout` order): generated up to the end of
        turn or max_new_tokens, decoded without special tokens (what lmms-eval's Qwen2.5-VL model returns)."""
        self.state_of(flat)
        prompts = [ex.input_ids[:ex.prompt_len].tolist() for _, ex in self.heldout]
        width = max(len(p) for p in prompts)
        texts = []
        for i in range(0, len(prompts), self.batch):
            chunk = prompts[i:i + self.batch]
            chunk += [[self.pad_id]] * (self.batch - len(chunk))
            ids, mask = left_pad(chunk, self.pad_id)
            ids = np.pad(ids, ((0, 0), (width - ids.shape[1], 0)), constant_values=self.pad_id)
            mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
            out = self._generate(ids, mask, [ex for _, ex in self.heldout[i:i + self.batch]])
            for row in out[:len(self.heldout) - i]:
                toks = row.tolist()
                toks = toks[:toks.index(self.eos_id)] if self.eos_id in toks else toks
                texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        return texts

    def accuracy(self, flat: dict) -> dict[str, float]:
        """Per-task exact match of the answers (exact_match: both stripped, one definition with the lmms-eval
        task's)."""
        correct = {name: [] for name in self.tasks}
        for text, (name, ex) in zip(self.answers(flat), self.heldout):
            correct[name].append(exact_match(text, ex.answer))
        return {name: float(np.mean(v)) for name, v in correct.items() if v}

    def _generate(self, ids, mask, examples):
        """Greedy answers to left-padded prompts (their images too, for a Qwen2.5-VL template)."""
        kw = dict(max_new_tokens=self.max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id)
        if self.make_images is None:
            return generate(self.template, ids, mask, **kw)
        from merit_jax.data.vision import load_pixels
        from merit_jax.models.qwen2_5_vl import generate_vl
        from merit_jax.models.vision_layout import vision_layout

        if self._gen_images is None:
            return generate_vl(self.template, ids, mask, **kw)
        images, sizes, n_images = self._gen_images
        pixel_values, grid = load_pixels(examples, images.processor, images.max_image_pixels)
        if not len(grid):
            return generate_vl(self.template, ids, mask, **kw)
        # one layout size and image count for every batch (fitted on all of them): one compilation
        layout = vision_layout(grid, self.template.vl_config.vision, sizes=sizes)
        grid = np.pad(grid, ((0, n_images - len(grid)), (0, 0)))  # zero rows own no tokens
        return generate_vl(self.template, ids, mask, pixel_values, grid, vision_layout=layout, **kw)

    def evaluate(self, flat: dict) -> dict:
        loss, acc = self.task_losses(flat), self.accuracy(flat)
        return {"loss": loss, "accuracy": acc, "mean_loss": float(np.mean(list(loss.values()))),
                "mean_accuracy": float(np.mean(list(acc.values())))}


def _by_task(items) -> dict[str, list]:
    out = {}
    for name, ex in items:
        out.setdefault(name, []).append(ex)
    return out


# ------------------------------------------------------------------------------------------------ stage


def models_to_evaluate(cfg, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    models = {"theta0": wd.theta0(cfg, workdir)}
    k = len(wd.read_partition(workdir)["groups"])
    if k > 1:
        models.update({f"branch{i}": wd.branch_final(workdir, i) for i in range(k)})
    models["merit"] = wd.merged_dir(workdir)
    for name in cfg.evaluate.baselines:
        models[name] = run_baseline(cfg, workdir, name)
    return models


def load_flat(path: pathlib.Path) -> dict:
    if checkpoint.is_checkpoint(path):
        return checkpoint.load(path)
    return P.flatten(load_model(path))


def run(cfg, workdir: pathlib.Path) -> dict:
    workdir = pathlib.Path(workdir)
    out_file = workdir / RESULTS
    if out_file.is_file():
        log.info("evaluate: %s exists, skipping", out_file)
        alignment_diagnostic(cfg, workdir)
        return wd.read_json(out_file)
    models = models_to_evaluate(cfg, workdir)
    tokenizer = load_tokenizer(data_settings(cfg))
    mixture = load_mixture(data_settings(cfg), tokenizer, workdir)
    template = load_model(models["theta0"])
    ev = Evaluator(template, mixture, tokenizer, max_len=cfg.data.max_len,
                   batch=cfg.evaluate.get("batch_size", 32), max_new_tokens=cfg.evaluate.max_new_tokens,
                   make_images=row_images_for(data_settings(cfg), template), logits_chunk=int(cfg.model.get("logits_chunk", 0)))
    results = {"models": {}, "families": {n: t.family for n, t in mixture.tasks.items()},
               "data": {"records": mixture.stats["records"], "truncated": mixture.stats["truncated"],
                        "skipped": mixture.stats["skipped"], "max_len": int(cfg.data.max_len),
                        "truncation": cfg.data.truncation,
                        "train_examples": {n: len(t.train) for n, t in mixture.tasks.items()},
                        "heldout_examples": {n: len(t.heldout) for n, t in mixture.tasks.items()}}}
    # One model in host memory at a time besides θ⁰ (K = 8 branches of a 3B model would otherwise take
    # ~150 GB): each model's own diagnostics are taken while it is loaded, the pairwise ones reload.
    theta0, own = None, {"displacement": {}, "train_vs_heldout": {}, "noise": {}}
    for name, path in tqdm(models.items(), desc="evaluate", unit="model"):
        flat = load_flat(path)
        result = results["models"][name] = dict(ev.evaluate(flat), path=str(path))
        log.info("evaluate %-8s held-out loss %.4f  exact match %.3f", name, result["mean_loss"],
                 result["mean_accuracy"])
        if name == "theta0":
            theta0 = flat
        else:
            model_diagnostics(cfg, ev, name, flat, theta0, result["mean_loss"], own)
        del flat
    results["diagnostics"] = {**branch_diagnostics(cfg, workdir, ev, models, theta0, results["models"]), **own}
    wd.write_json(out_file, results)
    alignment_diagnostic(cfg, workdir, mixture)
    return results


ALIGNMENT = "evaluate/hessian_alignment.json"


def alignment_diagnostic(cfg, workdir: pathlib.Path, mixture=None) -> dict | None:
    """Hessian–PCA alignment at θ⁰ (merit_jax.alignment) into WORKDIR/evaluate/hessian_alignment.json (its own
    file, written after results.json: a failure here costs no model's evaluation), or {"skipped": why} where it
    does not apply; None when evaluate.hessian_alignment is off. Skipped when the file exists."""
    from merit_jax import alignment
    from merit_jax.config import mesh_for
    from merit_jax.partition import pca_scores

    e = cfg.evaluate
    out_file = workdir / ALIGNMENT
    if not e.get("hessian_alignment", False):
        return None
    if out_file.is_file():
        return wd.read_json(out_file)
    partition = wd.read_partition(workdir)
    record = wd.read_tasks_record(wd.tasks_file(workdir))
    n_params, k = int(record["params"]["coordinates"]), int(e.get("hessian_k", 10))
    need, budget = alignment.basis_bytes(n_params, k), int(e.get("hessian_max_bytes", 4 << 30))
    why = ("the split did not cut along principal axes (split.method is not merit)"
           if partition.get("method") != "merit" or not partition.get("depth") else
           "Qwen2.5-VL calibration batches carry images; text models only for now" if is_vl_run(data_settings(cfg)) else
           f"the Lanczos basis would take {need / 2**30:.1f} GiB for {n_params:,} parameters, over "
           f"evaluate.hessian_max_bytes={budget / 2**30:.1f} GiB (narrow extract.include)" if need > budget else None)
    if why:
        log.warning("evaluate: Hessian–PCA alignment skipped: %s", why)
        wd.write_json(out_file, {"skipped": why})
        return {"skipped": why}
    start = time.time()
    if mixture is None:
        mixture = load_mixture(data_settings(cfg), load_tokenizer(data_settings(cfg)), workdir)
    tasks = [mixture.tasks[t["name"]].calib for t in record["tasks"]]
    cos = np.load(wd.split_dir(workdir) / "cosine.npy")
    # global axes: level l cut along axis l; local axes: only the first cut is along a global one
    axes = int(partition["depth"]) if partition.get("axes", "global") == "global" else 1
    pca = pca_scores(cos, axes, center=bool(partition.get("center", True)))
    row_norms = np.sqrt(np.diag(np.load(wd.extract_dir(workdir) / "gram.npy")))
    full = np.load(wd.extract_dir(workdir) / "task_grads.npy", mmap_mode="r") if record["reduction"] == "full" else None
    mesh = mesh_for(cfg)
    model = load_model(wd.theta0(cfg, workdir), mesh=mesh, compute_dtype=cfg.model.compute_dtype)
    out = alignment.hessian_alignment(model, record["params"]["names"], tasks, record["per_example"], pca.axes_tr,
                                      row_norms, task_grads_tp=full, k=k, hessian_examples=int(e.get("hessian_examples", 64)),
                                      seed=int(cfg.get("seed", 0)), logits_chunk=int(cfg.model.get("logits_chunk", 0)),
                                      mesh=mesh)
    out["seconds"] = round(time.time() - start, 1)
    log.info("evaluate: Hessian–PCA alignment %s (random %.2e) in %.1fs", ", ".join(f"{a:.3f}" for a in out["axes"]),
             out["random_mean"], out["seconds"])
    wd.write_json(out_file, out)
    return out


def model_diagnostics(cfg, ev: Evaluator, name: str, flat: dict, theta0: dict, heldout_loss: float,
                      out: dict) -> None:
    """One model's merge-readiness numbers into `out`: displacement from θ⁰ (branches, merged, joint), train
    vs held-out loss (merged, joint) and loss under relative weight noise (merged, joint)."""
    if name in DIAGNOSED or name.startswith("branch"):
        out["displacement"][name] = float(diagnostics.displacement(flat, theta0)[0])
    if name in ("merit", "joint", "joint2"):
        out["train_vs_heldout"][name] = {"train": ev.mean_loss(flat, "train"), "heldout": heldout_loss}
    if name in ("merit", "joint"):
        rob = diagnostics.noise_robustness(ev.mean_loss, flat, list(cfg.evaluate.noise_sigmas),
                                           int(cfg.evaluate.noise_draws), jax.random.key(int(cfg.seed)))
        out["noise"][name] = {"clean": rob["clean"], "sigmas": {
            str(s): {"mean": v["mean"], "std": v["std"]} for s, v in rob["by_sigma"].items()}}


def branch_diagnostics(cfg, workdir, ev: Evaluator, models: dict, theta0: dict, results: dict) -> dict:
    """Linear-mode-connectivity barriers between θ⁰ and every branch, pairwise (the paper reports all of
    them), and the merging gain Σ_k w_k L(θ_k) − L(θ̄) of Theorem 1, on the mean held-out loss. Branches are
    loaded for each pair, so that at most two are in memory."""
    branches = [n for n in models if n.startswith("branch")]
    if not branches:
        return {}
    w = np.asarray(wd.read_json(wd.merged_dir(workdir) / merge.MERGE_INFO_FILE)["weights"], np.float64)
    ends = ["theta0", *branches]
    alphas = np.linspace(0.0, 1.0, int(cfg.evaluate.lmc_points))
    lmc = []
    for i, a in enumerate(ends):
        params_a = theta0 if a == "theta0" else load_flat(models[a])
        for b in ends[i + 1:]:
            barrier, curve = diagnostics.lmc_barrier(ev.mean_loss, params_a, load_flat(models[b]), alphas)
            lmc.append({"a": a, "b": b, "barrier": float(barrier), "curve": [float(c) for c in curve]})
    # diagnostics.merging_gain's formula, from the losses already measured (θ̄ = the merged checkpoint)
    gain = np.dot(w / w.sum(), [results[b]["mean_loss"] for b in branches]) - results["merit"]["mean_loss"]
    return {"lmc": lmc, "merging_gain": float(gain)}
