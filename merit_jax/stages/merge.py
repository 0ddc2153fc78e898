"""The `merge` stage: WORKDIR/branches/K/final (K = 0..len(groups)-1) -> WORKDIR/merged/.

Weights: split/partition.json "tokens" for `tokens` and the relative methods (unless merge.weights is set),
merge.weights for `weights`. θ⁰ for the relative methods: merge.base, else the run's θ⁰ (WORKDIR/basin, or
model.hf_path without the basin stage). Skipped when WORKDIR/merged is already a complete checkpoint. On
several processes merge_checkpoints splits the work between them (each merges its own shards).
"""

from __future__ import annotations

import logging
import pathlib

from merit_jax.io import checkpoint
from merit_jax import config
from merit_jax import artifacts as wd
from merit_jax.merging import sources
from merit_jax.merging.ops import RELATIVE_METHODS
from merit_jax.merging.sources import MergeInputError
from merit_jax.merging.stream import merge_checkpoints
from merit_jax.stages import theta0_of

logger = logging.getLogger(__name__)


def run(cfg, workdir: pathlib.Path) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    out = wd.merged_dir(workdir)
    if checkpoint.is_checkpoint(out):
        logger.info("merge: %s is complete, skipping", out)
        return out
    s = config.merge_settings(cfg)
    partition_file = wd.partition_file(workdir)
    partition = sources.read_json(partition_file)
    groups = partition.get("groups")
    if not isinstance(groups, list) or not groups:
        raise MergeInputError(f"{partition_file} has no groups")
    weights = sources.branch_weights(s.method, s.weights, partition, partition_file)
    base = None
    if s.method in RELATIVE_METHODS:
        base = s.base or theta0_of(cfg, workdir)
        sources.check_base(s.method, base)
    return merge_checkpoints(
        [wd.branch_final(workdir, k) for k in range(len(groups))], out, method=s.method, weights=weights,
        base=base, dtype=s.dtype or None, lam=float(s.lam), density=float(s.density), drop_p=float(s.drop_p),
        seed=int(s.seed), overwrite=True, info={"groups": groups, "tokens": partition.get("tokens")},
    )
