"""What a run leaves besides its weights, and how it stops early: metrics.jsonl + TensorBoard events
(`MetricsLog`), the SIGTERM watch (`PreemptionWatch`) and `Preempted`, the exit after the state was saved."""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time
from typing import Mapping

import jax

from merit_jax import artifacts as wd

Path = pathlib.Path
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "terminated", after the state was saved


class Preempted(SystemExit):
    """SIGTERM arrived: the state was saved at `step`; the process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, ckpt_dir: Path):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.ckpt_dir = step, ckpt_dir

    def __str__(self):
        return f"preempted: state saved at step {self.step} in {self.ckpt_dir}; rerun the same command to resume"


class MetricsLog:
    """metrics.jsonl + TensorBoard events, written by process 0 only."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what a killed run logged after its last checkpoint: it is redone
            kept = [r for r in wd.read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        if not self.enabled or not values:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(k if "/" in k else f"{kind}/{k}", v, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------- preemption


class PreemptionWatch:
    """True at the step all processes agree to stop at, once any got SIGTERM.

    One process: a Python SIGTERM handler sets a flag. Several: JAX's preemption sync manager (set up by
    jax.distributed.initialize) catches SIGTERM and agrees on a common step without device collectives.
    """

    def __init__(self):
        self.flag = threading.Event()
        self.previous = None
        self.multi = jax.process_count() > 1
        if not self.multi and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag.is_set()

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
