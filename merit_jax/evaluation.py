"""Evaluation (the evaluate stage's library: merit_jax/stages/evaluate.py): per-task held-out loss and
exact-match accuracy of any parameters with the template's structure, and the merge-readiness diagnostics
(displacement, train vs held-out, weight noise, linear mode connectivity, the merging gain of Theorem 1).
"""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from merit_jax import diagnostics
from merit_jax.io import checkpoint
from merit_jax.config import EvaluateSettings
from merit_jax.lmms_eval_functions import exact_match
from merit_jax.models import params as P
from merit_jax.models.generate import generate, left_pad
from merit_jax.io.load import load_model
from merit_jax.sharding import make_mesh
from merit_jax.training.heldout import HeldoutEval
from merit_jax.training.step import SplitModel

log = logging.getLogger(__name__)
DIAGNOSED = ("theta0", "merit", "joint", "joint2")  # models the merge diagnostics look at (with the branches)


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


# ------------------------------------------------------------------------------------------ diagnostics


def load_flat(path: pathlib.Path) -> dict:
    if checkpoint.is_checkpoint(path):
        return checkpoint.load(path)
    return P.flatten(load_model(path))


def evaluate_models(ev: Evaluator, models: dict[str, pathlib.Path], s: EvaluateSettings, seed: int,
                    merge_weights) -> dict:
    """{"models": {name: losses, accuracies, path}, "diagnostics": {...}} of every model (θ⁰ first);
    `merge_weights`: the merged model's branch weights (merging's record), for the merging gain."""
    results = {"models": {}}
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
            model_diagnostics(s, seed, ev, name, flat, theta0, result["mean_loss"], own)
        del flat
    results["diagnostics"] = {**branch_diagnostics(s, merge_weights, ev, models, theta0, results["models"]), **own}
    return results


def model_diagnostics(s: EvaluateSettings, seed: int, ev: Evaluator, name: str, flat: dict, theta0: dict,
                      heldout_loss: float, out: dict) -> None:
    """One model's merge-readiness numbers into `out`: displacement from θ⁰ (branches, merged, joint), train
    vs held-out loss (merged, joint) and loss under relative weight noise (merged, joint)."""
    if name in DIAGNOSED or name.startswith("branch"):
        out["displacement"][name] = float(diagnostics.displacement(flat, theta0)[0])
    if name in ("merit", "joint", "joint2"):
        out["train_vs_heldout"][name] = {"train": ev.mean_loss(flat, "train"), "heldout": heldout_loss}
    if name in ("merit", "joint"):
        rob = diagnostics.noise_robustness(ev.mean_loss, flat, list(s.noise_sigmas), int(s.noise_draws),
                                           jax.random.key(int(seed)))
        out["noise"][name] = {"clean": rob["clean"], "sigmas": {
            str(s): {"mean": v["mean"], "std": v["std"]} for s, v in rob["by_sigma"].items()}}


def branch_diagnostics(s: EvaluateSettings, merge_weights, ev: Evaluator, models: dict, theta0: dict,
                       results: dict) -> dict:
    """Linear-mode-connectivity barriers between θ⁰ and every branch, pairwise (the paper reports all of
    them), and the merging gain Σ_k w_k L(θ_k) − L(θ̄) of Theorem 1, on the mean held-out loss. Branches are
    loaded for each pair, so that at most two are in memory."""
    branches = [n for n in models if n.startswith("branch")]
    if not branches:
        return {}
    w = np.asarray(merge_weights, np.float64)
    ends = ["theta0", *branches]
    alphas = np.linspace(0.0, 1.0, int(s.lmc_points))
    lmc = []
    for i, a in enumerate(ends):
        params_a = theta0 if a == "theta0" else load_flat(models[a])
        for b in ends[i + 1:]:
            barrier, curve = diagnostics.lmc_barrier(ev.mean_loss, params_a, load_flat(models[b]), alphas)
            lmc.append({"a": a, "b": b, "barrier": float(barrier), "curve": [float(c) for c in curve]})
    # diagnostics.merging_gain's formula, from the losses already measured (θ̄ = the merged checkpoint)
    gain = np.dot(w / w.sum(), [results[b]["mean_loss"] for b in branches]) - results["merit"]["mean_loss"]
    return {"lmc": lmc, "merging_gain": float(gain)}
