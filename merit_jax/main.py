"""The MERIT pipeline:

    python -m merit_jax.main --config configs/default.py [--workdir DIR] [--stage STAGE] [--branch K] \
        [--config.KEY=VALUE ...]

STAGE: all (default) | basin | extract | split | train | merge | export | evaluate | report.
Each stage skips what it finds finished and resumes what it finds interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import time

import jax
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from merit_jax import config as config_lib
from merit_jax import artifacts as wd
from merit_jax.stages import basin, evaluate, export, extract, merge, report, split, train

# The pipeline, in order: each stage reads what the earlier ones wrote into the work directory.
STAGES = {
    "basin": basin.run,  # θ⁰: a short joint pre-alignment run (when basin.enabled)
    "extract": extract.run,  # dataset-level task gradients at θ⁰
    "split": split.run,  # cosine matrix, PCA, recursive median split into K groups
    "train": train.run,  # one branch per group from θ⁰ (--branch K: one of them)
    "merge": merge.run,  # θ̄ = Σ_k w_k θ_k
    "export": export.run,  # θ̄ as a Hugging Face checkpoint
    "evaluate": evaluate.run,  # every model on the held-out sets, diagnostics; after the baselines below
    "report": report.run,  # tables and pictures
}
# Baselines (evaluate.baselines) are sub-pipelines in WORKDIR/baselines/NAME, each on its own config
# (stages/evaluate.baseline_config: the run's θ⁰, data and extraction, another split or schedule), run before
# the evaluate stage; `uniform` trains nothing: it re-merges the run's branches with equal weights.
BASELINE_STAGES = ("split", "train", "merge")
log = logging.getLogger("merit_jax")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file (a .py with get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: the config's `workdir`).")
_STAGE = flags.DEFINE_enum("stage", "all", ("all", *STAGES), "Stage to run.")
_BRANCH = flags.DEFINE_integer("branch", None, "With --stage train: train only this branch (0-based).")


def run_baselines(cfg, workdir: pathlib.Path) -> None:
    """Each baseline of evaluate.baselines, resumable and skipped once its merged model exists."""
    for name in config_lib.evaluate_settings(cfg).baselines:
        if name == "uniform":
            evaluate.merge_uniform(workdir)
            continue
        sub_cfg, sub_dir = evaluate.baseline_config(cfg, workdir, name), wd.baseline_dir(workdir, name)
        for stage in BASELINE_STAGES:
            STAGES[stage](sub_cfg, sub_dir)


def stages_to_run(cfg, stage: str) -> list[str]:
    if stage != "all":
        return [stage]
    return [s for s in STAGES if s != "basin" or config_lib.basin_settings(cfg).enabled]


def run_stage(name: str, cfg, workdir: pathlib.Path, branch: int | None = None) -> None:
    kwargs = {"branch": branch} if name == "train" else {}
    start = time.time()
    log.info("stage %s: start", name)
    if name == "evaluate":
        run_baselines(cfg, workdir)
    STAGES[name](cfg, workdir, **kwargs)
    # Every process finishes a stage before any starts the next (process 0 alone writes some outputs).
    multihost_utils.sync_global_devices(f"merit_jax stage {name}")
    log.info("stage %s: done in %.1fs", name, time.time() - start)
    if jax.process_index() == 0:  # one file per branch job: parallel branch jobs never race on one file
        key = name if branch is None else f"{name}-{branch}"
        wd.write_json(wd.timings_file(workdir, key), {"stage": key, "seconds": round(time.time() - start, 2)})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def save_resolved(cfg, workdir: pathlib.Path) -> None:
    """Writes WORKDIR/config.json; warns when it differs from the config the work directory was made with
    (finished stages are skipped, so their outputs would not follow the change)."""
    if jax.process_index() != 0:
        return
    path = wd.config_file(workdir)
    new = json.loads(cfg.to_json_best_effort())
    if path.is_file():
        old = _flat(json.loads(path.read_text()))
        changed = {k: (old.get(k), v) for k, v in _flat(new).items() if old.get(k) != v and k != "workdir"}
        if changed:
            logging.getLogger("merit_jax").warning(
                "config differs from the one %s was made with: %s. Finished stages are skipped and keep their "
                "outputs; delete the outputs of the stages these keys affect to redo them.", workdir,
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))
    wd.write_json(path, new)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every save at INFO
    from merit_jax import distributed

    distributed.initialize()
    cfg = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value or cfg.workdir).absolute()
    try:
        config_lib.validate(cfg, stage=_STAGE.value, branch=_BRANCH.value)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    save_resolved(cfg, workdir)
    try:
        for name in stages_to_run(cfg, _STAGE.value):
            run_stage(name, cfg, workdir, _BRANCH.value)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        if os.environ.get("MERIT_DEBUG"):
            raise
        print(f"error: {e}\n(set MERIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    log.info("finished: %s", workdir)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
