"""Held-out evaluation: per-task loss and token accuracy of any parameters of a model, on the mesh, in
fixed-size batches (one compilation). The one held-out evaluator: the trainer runs it at its eval points and
the evaluate stage for every model it scores."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from merit_jax.models.inputs import TEXT_KEYS, batch_keys
from merit_jax.sharding import batch_sharding
from merit_jax.training.feed import process_rows, to_global
from merit_jax.training.step import SplitModel, make_eval_step


def jit_eval_step(model: SplitModel, num_tasks: int, mesh: Mesh, param_shardings, vl: bool, xla_options=None,
                  logits_chunk: int = 0) -> Callable:
    """jax.jit of make_eval_step with explicit shardings: batch rows (and `task_id` [B]) over the data axes,
    per-task sums replicated (what HeldoutEval runs, and what merit_jax.plan compiles)."""
    keys = batch_keys(vl)
    batch_sh = {k: batch_sharding(mesh, nd) for k, nd in keys.items()} | {"task_id": batch_sharding(mesh, 1)}
    return jax.jit(make_eval_step(model, num_tasks, logits_chunk), in_shardings=(param_shardings, batch_sh),
                   out_shardings=(NamedSharding(mesh, PartitionSpec()),) * 3, compiler_options=xla_options or None)


class HeldoutEval:
    """Per-task held-out loss and token accuracy, one example per row, in fixed-size batches (one compile).

    heldout: {task: [Example]}; rows: examples per batch, global (a multiple of the data-parallel devices);
    make_images: for a Qwen2.5-VL model, examples -> RowImages (data.vision.row_images_for); params: the flat
    parameter dict, placed (or put) with `param_shardings`.
    """

    def __init__(self, model: SplitModel, heldout: Mapping[str, Sequence], mesh: Mesh, seq_len: int, rows: int,
                 param_shardings, xla_options=None, make_images: Callable | None = None, logits_chunk: int = 0):
        self.tasks = [t for t in sorted(heldout) if heldout[t]]
        self.examples = [(i, ex) for i, t in enumerate(self.tasks) for ex in heldout[t]]
        self.mesh, self.rows, self.seq_len = mesh, rows, seq_len
        self.shard, count = process_rows(batch_sharding(mesh, 2), rows)
        self.per_process = rows // count
        self.images = None  # VL: per-row image inputs, sized once for every held-out example
        if make_images is not None and self.examples:
            self.images = make_images([ex for _, ex in self.examples]).fit([[i] for i in range(len(self.examples))])
        self.step = jit_eval_step(model, max(len(self.tasks), 1), mesh, param_shardings, self.images is not None,
                                  xla_options, logits_chunk)

    def _local_batch(self, first: int) -> dict[str, np.ndarray]:
        """This process's rows of the eval batch starting at example `first` (padded with empty rows)."""
        from merit_jax.data.packing import pad_batch

        lo = first + self.shard * self.per_process
        chunk = self.examples[lo:min(lo + self.per_process, first + self.rows)]
        batch = pad_batch([ex for _, ex in chunk], self.seq_len) if chunk else {}
        batch["task_id"] = np.array([i for i, _ in chunk], np.int32)
        n_pad = self.per_process - len(chunk)  # empty rows carry no supervised token: they change no sum
        out = {}
        for k in (*TEXT_KEYS, "task_id"):
            shape = (self.seq_len,) if k != "task_id" else ()
            dtype = np.float32 if k == "loss_mask" else np.int32
            pad = np.zeros((n_pad, *shape), dtype)
            out[k] = np.concatenate([batch[k].astype(dtype), pad]) if chunk else pad
        if self.images is not None:
            out = self.images.add(out, [[lo + j] for j in range(len(chunk))])
        return out

    def sums(self, params) -> np.ndarray:
        """[3, tasks] float64: per task, the summed cross-entropy, supervised tokens and correct tokens."""
        sums = np.zeros((3, len(self.tasks)))
        with jax.set_mesh(self.mesh):
            for first in range(0, len(self.examples), self.rows):
                out = self.step(params, to_global(self._local_batch(first), self.mesh, self.rows))
                sums += np.stack([np.asarray(o, np.float64) for o in out])
        return sums

    def task_losses(self, params) -> dict[str, float]:
        """{task: mean held-out cross-entropy per supervised token}, tasks in name order."""
        ce, n, _ = self.sums(params)
        return {t: float(ce[i] / max(n[i], 1)) for i, t in enumerate(self.tasks)}

    def __call__(self, params) -> dict[str, float]:
        """The trainer's eval record: eval/loss, eval/accuracy (token accuracy) and both per task."""
        if not self.tasks:
            return {}
        ce, n, right = self.sums(params)
        metrics = {"eval/loss": float(ce.sum() / max(n.sum(), 1)),
                   "eval/accuracy": float(right.sum() / max(n.sum(), 1))}
        for i, t in enumerate(self.tasks):
            metrics[f"eval/{t}/loss"] = float(ce[i] / max(n[i], 1))
            metrics[f"eval/{t}/accuracy"] = float(right[i] / max(n[i], 1))
        return metrics
