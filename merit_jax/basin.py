"""The `basin` stage: θ⁰ from a short joint pre-alignment run, written to WORKDIR/basin.

Branches that start from a shared, briefly jointly-trained point stay in one loss basin, which is what makes
their weights mergeable. The start is cfg.model.hf_path, or (hf_path = "") a random tiny Qwen2 built from
cfg.model.tiny (a tiny Qwen2.5-VL from cfg.model.tiny_vl when cfg.model.model_type = "qwen2_5_vl") with the
tokenizer's vocabulary and special tokens. The run trains cfg.basin.steps steps on
all tasks (learning rate cfg.basin.learning_rate, everything else from cfg.train), resumably, in
WORKDIR/basin_run/, and writes WORKDIR/basin as a merit_jax checkpoint with config.json and the tokenizer
files, so every later stage reads a self-describing θ⁰.
"""

from __future__ import annotations

import logging
import pathlib

from merit_jax import checkpoint as ckpt_lib
from merit_jax import workdir as wd

log = logging.getLogger(__name__)

Path = pathlib.Path
VOCAB_MULTIPLE = 128  # the random model's vocabulary is padded to this (shardable over tp, as Qwen pads its own)


def run_dir(workdir) -> Path:
    """Resumable state of the basin run (Orbax checkpoints, metrics); θ⁰ itself goes to WORKDIR/basin."""
    return Path(workdir) / "basin_run"


def tiny_config(cfg, tokenizer) -> dict:
    """The Hugging Face config of the random tiny model: cfg.model.tiny + the tokenizer's vocab and tokens."""
    from merit_jax.models.config import tiny_hf_config

    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if cfg.model.get("model_type", "qwen2") == "qwen2_5_vl":  # a tiny Qwen2.5-VL from cfg.model.tiny_vl
        from merit_jax.data.vision import vision_token_ids
        from merit_jax.models.qwen2_5_vl import tiny_vl_hf_config

        hf = tiny_vl_hf_config(vocab, vision_token_ids(tokenizer), **cfg.model.tiny_vl.to_dict())
        hf["dtype"] = cfg.model.get("param_dtype", "float32")
        return hf
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    arch = dict(cfg.model.tiny.to_dict() if hasattr(cfg.model.tiny, "to_dict") else cfg.model.tiny)
    hf = tiny_hf_config(vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad, **arch)
    hf["dtype"] = cfg.model.get("param_dtype", "float32")
    return hf


def run(cfg, workdir) -> Path | None:
    """Writes WORKDIR/basin (skipped when complete); returns it, or None when cfg.basin.enabled is False."""
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.data.sources import tokenizer_dir
    from merit_jax.train import TrainSettings, mesh_for, train_model

    workdir = Path(workdir)
    out = wd.basin_dir(workdir)
    if not cfg.basin.get("enabled", True):
        log.info("basin: disabled; θ⁰ is model.hf_path=%s", cfg.model.hf_path)
        return None
    if ckpt_lib.is_checkpoint(out):
        log.info("basin: %s is complete, skipping", out)
        return out
    b = cfg.basin
    overrides = {"learning_rate": float(b.get("learning_rate", cfg.train.learning_rate))}
    for key in ("warmup_steps", "batch_size", "schedule"):
        if b.get(key, None) is not None:
            overrides[key] = b.get(key)
    # basin.freeze; else nothing frozen from a random start (its vision tower must learn); else train.freeze
    freeze = b.get("freeze", None)
    overrides["freeze"] = tuple(freeze if freeze is not None else () if not cfg.model.hf_path
                                else cfg.train.get("freeze", ()))
    settings = TrainSettings.from_cfg(cfg, **overrides)
    mesh = mesh_for(cfg)
    settings.validate(mesh)  # before any data is read or a model built

    tokenizer = load_tokenizer(cfg)
    mixture = load_mixture(cfg, tokenizer, workdir)
    steps = int(b.get("steps", 0))
    if cfg.model.hf_path:
        init, hf_config = Path(cfg.model.hf_path), None
        tok_dir = init if ckpt_lib.has_tokenizer(init) else Path(tokenizer_dir(cfg))
    else:
        hf_config = tiny_config(cfg, tokenizer)
        init = _random_model(cfg, hf_config, settings, mesh)
        tok_dir = Path(tokenizer_dir(cfg))
    info = {"basin.json": {"steps": steps, "start": str(cfg.model.hf_path or "random tiny model"),
                           "tasks": mixture.names, "seed": int(cfg.get("seed", 0))}}
    if steps <= 0:  # θ⁰ is the start itself, re-saved so that it carries its config and tokenizer
        from merit_jax.models.io import load_model, read_config
        from merit_jax.models import params as P

        module = init if hf_config is not None else load_model(init, mesh=mesh, dtype=settings.param_dtype)
        ckpt_lib.save(out, P.flatten(module), hf_config or read_config(init), tokenizer_dir=tok_dir,
                      overwrite=True, extra_json=info)
        return out
    heldout = {t: d.heldout for t, d in mixture.tasks.items()}
    result = train_model(cfg, init, mixture.train_examples(), run_dir(workdir), final_dir=out, heldout=heldout,
                         max_steps=steps, settings=settings, mesh=mesh, hf_config=hf_config, tokenizer_dir=tok_dir,
                         extra_json=info)
    log.info("basin: θ⁰ written to %s after %d steps", result.final_dir, result.steps)
    return result.final_dir


def _random_model(cfg, hf_config: dict, settings, mesh):
    """The random tiny model, each parameter created directly in its shards (seeded by cfg.seed)."""
    import jax
    from flax import nnx

    from merit_jax.convert.hf import model_factory
    from merit_jax.models.params import state_shardings

    make = model_factory(hf_config, "basin tiny model (cfg.model.tiny)", dtype=settings.param_dtype,
                         compute_dtype=settings.compute_dtype, remat=settings.remat, attention=settings.attention,
                         scan_layers=settings.scan_layers,
                         seed=int(cfg.get("seed", 0)))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    init = jax.jit(lambda: nnx.split(make())[1], out_shardings=state_shardings(abstract, mesh),
                   compiler_options=dict(settings.xla_options) or None)
    with jax.set_mesh(mesh):
        return nnx.merge(graphdef, init())
