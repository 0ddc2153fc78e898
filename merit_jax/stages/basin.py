"""The `basin` stage: θ⁰ from a short joint pre-alignment run, written to WORKDIR/basin.

Branches that start from a shared, briefly jointly-trained point stay in one loss basin, which is what makes
their weights mergeable. The start is model.hf_path, or (hf_path = "") a random tiny Qwen2 built from
model.tiny (a tiny Qwen2.5-VL from model.tiny_vl when model.model_type = "qwen2_5_vl") with the tokenizer's
vocabulary and special tokens (merit_jax.training.tiny). The run trains basin.steps steps on all tasks
(learning rate basin.learning_rate, everything else from train.*), resumably, in WORKDIR/basin_run/, and
writes WORKDIR/basin as a merit_jax checkpoint with config.json and the tokenizer files, so every later stage
reads a self-describing θ⁰.
"""

from __future__ import annotations

import functools
import logging
import pathlib

from merit_jax.io import checkpoint as ckpt_lib
from merit_jax import config
from merit_jax import artifacts as wd
from merit_jax.config import BasinSettings, ModelSettings

log = logging.getLogger(__name__)

Path = pathlib.Path


def run_dir(workdir) -> Path:
    """Resumable state of the basin run (Orbax checkpoints, metrics); θ⁰ itself goes to WORKDIR/basin."""
    return wd.basin_run_dir(workdir)


def run(cfg, workdir) -> Path | None:
    """Writes WORKDIR/basin (skipped when complete); returns it, or None when basin.enabled is False."""
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.data.sources import tokenizer_dir
    from merit_jax.data.vision import row_images_for
    from merit_jax.training.loop import train_model
    from merit_jax.training.tiny import random_model, tiny_config

    workdir = Path(workdir)
    out = wd.basin_dir(workdir)
    basin, model, data = config.basin_settings(cfg), config.model_settings(cfg), config.data_settings(cfg)
    if not basin.enabled:
        log.info("basin: disabled; θ⁰ is model.hf_path=%s", model.hf_path)
        return None
    if ckpt_lib.is_checkpoint(out):
        log.info("basin: %s is complete, skipping", out)
        return out
    settings = config.train_settings(cfg, **_train_overrides(cfg, basin, model))
    mesh = config.mesh_for(cfg)
    settings.validate(mesh)  # before any data is read or a model built
    seed, steps = int(cfg.get("seed", 0)), int(basin.steps)

    tokenizer = load_tokenizer(data)
    mixture = load_mixture(data, tokenizer, workdir)
    if model.hf_path:
        init, hf_config = Path(model.hf_path), None
        tok_dir = init if ckpt_lib.has_tokenizer(init) else Path(tokenizer_dir(data))
    else:
        hf_config = tiny_config(model, tokenizer)
        init = random_model(hf_config, settings, mesh, seed)
        tok_dir = Path(tokenizer_dir(data))
    info = {"basin.json": {"steps": steps, "start": str(model.hf_path or "random tiny model"),
                           "tasks": mixture.names, "seed": seed}}
    if steps <= 0:  # θ⁰ is the start itself, re-saved so that it carries its config and tokenizer
        from merit_jax.models import params as P
        from merit_jax.io.load import load_model, read_config

        module = init if hf_config is not None else load_model(init, mesh=mesh, dtype=settings.param_dtype)
        ckpt_lib.save(out, P.flatten(module), hf_config or read_config(init), tokenizer_dir=tok_dir,
                      overwrite=True, extra_json=info)
        return out
    heldout = {t: d.heldout for t, d in mixture.tasks.items()}
    result = train_model(settings, init, mixture.train_examples(), run_dir(workdir), mesh=mesh, final_dir=out,
                         heldout=heldout, max_steps=steps, hf_config=hf_config, tokenizer_dir=tok_dir,
                         extra_json=info, images_for=functools.partial(row_images_for, data))
    log.info("basin: θ⁰ written to %s after %d steps", result.final_dir, result.steps)
    return result.final_dir


def _train_overrides(cfg, basin: BasinSettings, model: ModelSettings) -> dict:
    """train.* keys the basin run replaces: its learning rate; basin.warmup_steps / batch_size / schedule when
    set; basin.freeze, else nothing frozen from a random start (its vision tower must learn), else train.freeze."""
    train = config.train_settings(cfg)
    overrides = {"learning_rate": float(basin.learning_rate if basin.learning_rate is not None
                                        else train.learning_rate)}
    for key in ("warmup_steps", "batch_size", "schedule"):
        if getattr(basin, key) is not None:
            overrides[key] = getattr(basin, key)
    overrides["freeze"] = (basin.freeze if basin.freeze is not None else () if not model.hf_path
                           else train.freeze)
    return overrides
