"""Config validation (run before any compute) and the resolved config saved in the work directory."""

from __future__ import annotations

import json
import logging
import pathlib
import re

import jax

from merit_jax import workdir as wd
from merit_jax.errors import regex_errors

CHOICES = {
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("xla", "cudnn", "splash"),
    "model.scan_layers": (False, True),
    "model.model_type": ("qwen2", "qwen2_5_vl"),
    "data.truncation": ("left", "right", "skip"),
    "extract.reduction": ("full", "stride", "sketch"),
    "extract.per_example": ("mean", "unit", "tokens"),
    "extract.gradients": ("auto", "per_example", "batched"),
    "split.method": ("merit", "random", "conflict", "none"),
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("cosine", "linear", "constant"),
    "merge.method": ("tokens", "uniform", "weights", "task_arithmetic", "ties", "dare"),
    "export.dtype": ("float32", "bfloat16", "float16"),
}
POSITIVE = ("data.max_len", "extract.n_calib", "extract.micro_chunk", "extract.dim", "extract.stride",
            "train.batch_size", "train.seq_len", "train.grad_accum", "train.learning_rate", "train.epochs",
            "train.keep_checkpoints", "train.log_every")
BASELINES = ("joint", "joint2", "random", "conflict", "uniform")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            raise ValueError(f"config: missing key {dotted!r}")
        node = node[part]
    return node


def num_groups(cfg) -> int:
    return 1 if cfg.split.method == "none" else 2 ** int(cfg.split.depth)


def validate(cfg, stage: str = "all", branch: int | None = None) -> None:
    """Raises ValueError naming the key for anything that would fail later (before any compute)."""
    errors = []
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            errors.append(f"{key}={value!r}: expected one of {', '.join(choices)}")
    for key in POSITIVE:
        value = _get(cfg, key)
        if not isinstance(value, (int, float)) or value <= 0:
            errors.append(f"{key}={value!r}: must be a positive number")
    if cfg.data.max_len > cfg.train.seq_len:
        errors.append(f"data.max_len={cfg.data.max_len} exceeds train.seq_len={cfg.train.seq_len}: "
                      "an example must fit in one packed row")
    if not 0 <= cfg.data.heldout_fraction < 1:
        errors.append(f"data.heldout_fraction={cfg.data.heldout_fraction}: must be in [0, 1)")
    if cfg.split.method != "none" and not 1 <= cfg.split.depth <= 10:
        errors.append(f"split.depth={cfg.split.depth}: must be 1..10 for split.method={cfg.split.method!r}")
    e = cfg.extract
    if e.gradients == "batched" and (e.per_example == "unit" or e.keep_example_sketches):
        errors.append("extract.gradients='batched' gives no per-example gradients: it needs extract.per_example="
                      "mean|tokens and extract.keep_example_sketches=False")
    for key in ("extract.include", "extract.exclude"):
        errors += regex_errors(key, _get(cfg, key))
    if cfg.merge.method == "weights" and not list(cfg.merge.weights):
        errors.append("merge.method='weights' needs merge.weights")
    bad = [b for b in cfg.evaluate.baselines if b not in BASELINES]
    if bad:
        errors.append(f"evaluate.baselines: unknown {bad}; expected a subset of {', '.join(BASELINES)}")
    if cfg.model.hf_path and not (pathlib.Path(cfg.model.hf_path) / "config.json").is_file():
        errors.append(f"model.hf_path={cfg.model.hf_path!r}: no config.json there")
    if not cfg.model.hf_path and not cfg.basin.enabled:
        errors.append("model.hf_path is empty and basin.enabled is False: there is no θ⁰")
    if cfg.data.path and not pathlib.Path(cfg.data.path).exists():
        errors.append(f"data.path={cfg.data.path!r} does not exist")
    errors += _mesh_errors(cfg)
    if branch is not None:
        if stage != "train":
            errors.append(f"--branch is only meaningful with --stage train (got --stage {stage})")
        elif not 0 <= branch < num_groups(cfg):
            errors.append(f"--branch {branch} is out of range: the split has {num_groups(cfg)} group(s)")
    if errors:
        raise ValueError("; ".join(errors))


def _mesh_errors(cfg) -> list[str]:
    """The trainer's own checks (mesh vs devices, batch vs data axes, grad_accum, batch_tokens), run early."""
    from merit_jax.train import TrainSettings, mesh_for

    try:
        TrainSettings.from_cfg(cfg).validate(mesh_for(cfg))
    except ValueError as e:
        return [str(e)]
    return []


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
    path = pathlib.Path(workdir) / "config.json"
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
