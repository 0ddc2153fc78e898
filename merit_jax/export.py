"""The `export` stage: θ̄ (WORKDIR/merged, a merit_jax checkpoint) -> WORKDIR/hf, a Hugging Face checkpoint
that transformers, lm-evaluation-harness and lmms-eval load."""

from __future__ import annotations

import logging

from merit_jax import checkpoint
from merit_jax import workdir as wd
from merit_jax.convert.__main__ import orbax_to_hf

log = logging.getLogger(__name__)


def run(cfg, workdir) -> None:
    src, out = wd.merged_dir(workdir), wd.hf_dir(workdir)
    if (out / "config.json").is_file():
        log.info("export: %s exists, skipping", out)
        return
    checkpoint.check_checkpoint(src)
    orbax_to_hf(src, out, dtype=cfg.export.dtype)
    log.info("export: wrote %s (%s)", out, cfg.export.dtype)
