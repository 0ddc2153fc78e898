"""The MERIT pipeline:

    python -m merit_jax.main --config configs/default.py [--workdir DIR] [--stage STAGE] [--branch K] \
        [--config.KEY=VALUE ...]

STAGE: all (default) | basin | extract | split | train | merge | export | evaluate | report.
Each stage skips what it finds finished and resumes what it finds interrupted.
"""

from __future__ import annotations

import importlib
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
from merit_jax import workdir as wd

STAGES = ("basin", "extract", "split", "train", "merge", "export", "evaluate", "report")
log = logging.getLogger("merit_jax")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file (a .py with get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: the config's `workdir`).")
_STAGE = flags.DEFINE_enum("stage", "all", ("all", *STAGES), "Stage to run.")
_BRANCH = flags.DEFINE_integer("branch", None, "With --stage train: train only this branch (0-based).")


def stages_to_run(cfg, stage: str) -> list[str]:
    if stage != "all":
        return [stage]
    return [s for s in STAGES if s != "basin" or cfg.basin.enabled]


def run_stage(name: str, cfg, workdir: pathlib.Path, branch: int | None = None) -> None:
    package = "merit_jax.stages" if name in ("basin", "train") else "merit_jax"  # the other stages follow (#13)
    module = importlib.import_module(f"{package}.{name}")
    kwargs = {"branch": branch} if name == "train" else {}
    start = time.time()
    log.info("stage %s: start", name)
    module.run(cfg, workdir, **kwargs)
    # Every process finishes a stage before any starts the next (process 0 alone writes some outputs).
    multihost_utils.sync_global_devices(f"merit_jax stage {name}")
    log.info("stage %s: done in %.1fs", name, time.time() - start)
    if jax.process_index() == 0:  # one file per branch job: parallel branch jobs never race on one file
        key = name if branch is None else f"{name}-{branch}"
        wd.write_json(workdir / "timings" / f"{key}.json", {"stage": key, "seconds": round(time.time() - start, 2)})


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
    config_lib.save_resolved(cfg, workdir)
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
