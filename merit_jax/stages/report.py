"""The `report` stage: WORKDIR/report/report.md and report/metrics.json from what the earlier stages wrote."""

from __future__ import annotations

import pathlib

from merit_jax import config
from merit_jax.report import write_report


def run(cfg, workdir: pathlib.Path) -> pathlib.Path:
    recorded = {key: cfg[key].to_dict() for key in ("split", "train", "merge")}  # as configured, every key
    return write_report(pathlib.Path(workdir), recorded, config.merge_settings(cfg).method)
