"""The `export` stage: θ̄ (WORKDIR/merged, a merit_jax checkpoint) -> WORKDIR/hf, a Hugging Face checkpoint
that transformers, lm-evaluation-harness and lmms-eval load. Skipped when WORKDIR/hf has its config.json."""

from __future__ import annotations

import logging

from merit_jax.io import checkpoint
from merit_jax import config
from merit_jax import artifacts as wd
from merit_jax.io.hf import orbax_to_hf

log = logging.getLogger(__name__)


def run(cfg, workdir) -> None:
    dtype = config.export_settings(cfg).dtype
    src, out = wd.merged_dir(workdir), wd.hf_dir(workdir)
    if (out / "config.json").is_file():
        log.info("export: %s exists, skipping", out)
        return
    checkpoint.check_checkpoint(src)
    orbax_to_hf(src, out, dtype=dtype)
    log.info("export: wrote %s (%s)", out, dtype)
