"""The `train` stage: branch K fine-tuned from θ⁰ on its own tasks, into WORKDIR/branches/K/.

    python -m merit_jax.main --config configs/default.py --stage train [--branch K]

Reads θ⁰, split/partition.json and the branch's own tasks (only their files, where the data comes one file per
task); writes only WORKDIR/branches/K/ (the run directory of merit_jax.training.loop.train_model). Branches
share nothing while they train, so they may run as separate jobs; a finished branch is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Callable, Sequence

from merit_jax import artifacts as wd
from merit_jax import config
from merit_jax.config import DataSettings
from merit_jax.errors import ConfigError
from merit_jax.io import checkpoint as ckpt_lib
from merit_jax.stages import theta0_of

log = logging.getLogger(__name__)

Path = pathlib.Path


def run(cfg, workdir: Path, branch: int | None = None, *, hooks: Sequence[Callable[[int], None]] = ()
        ) -> dict[int, Path]:
    """Trains branch `branch` (all branches in turn when None); returns {k: final checkpoint directory}.
    `hooks`: called on every process after each step with the number of steps done (train_model's)."""
    from merit_jax.data.sources import tokenizer_dir
    from merit_jax.data.vision import row_images_for
    from merit_jax.training.loop import train_model

    workdir = Path(workdir)
    groups = branch_groups(workdir, config.split_settings(cfg).method)
    ks = list(range(len(groups))) if branch is None else [check_branch(branch, len(groups))]
    settings = config.train_settings(cfg)
    mesh = config.mesh_for(cfg)
    settings.validate(mesh)
    data = config.data_settings(cfg)
    if data.max_len > settings.seq_len:
        raise ConfigError(f"data.max_len={data.max_len} > train.seq_len={settings.seq_len}: an example would not "
                          "fit a packed row")
    theta0 = theta0_of(cfg, workdir)
    if not (ckpt_lib.is_checkpoint(theta0) or (Path(theta0) / "config.json").is_file()):
        raise FileNotFoundError(f"θ⁰ {theta0} is neither a merit_jax checkpoint nor a Hugging Face directory "
                                "(run the basin stage, or set model.hf_path)")
    out = {}
    for k in ks:
        final = wd.branch_final(workdir, k)
        if ckpt_lib.is_checkpoint(final):
            log.info("train: branch %d is done (%s), skipping", k, final)
            out[k] = final
            continue
        train, heldout, tokens = load_branch_data(data, workdir, groups[k] or None)
        tasks = sorted(tokens)
        log.info("train: branch %d/%d: %d tasks, %d examples, %d supervised tokens", k, len(groups), len(tasks),
                 len(train), sum(tokens.values()))
        info = {"train.json": {"branch": k, "tasks": tasks, "supervised_tokens": int(sum(tokens.values())),
                               "task_tokens": tokens}}
        out[k] = train_model(settings, theta0, train, wd.branch_dir(workdir, k), mesh=mesh, heldout=heldout,
                             extra_json=info, hooks=hooks,
                             tokenizer_dir=theta0 if ckpt_lib.has_tokenizer(theta0) else tokenizer_dir(data),
                             images_for=functools.partial(row_images_for, data)).final_dir
    return out


def branch_groups(workdir: Path, split_method: str) -> list[list[str]]:
    """The K task groups: split/partition.json, or (split.method=none without a partition) one group of all
    tasks; named tasks are checked against extract/tasks.json when present."""
    workdir = Path(workdir)
    if wd.partition_file(workdir).is_file() or split_method != "none":
        groups = [list(g) for g in wd.read_partition(workdir)["groups"]]
    else:
        groups = [[]]  # all tasks of the mixture: resolved when the data is read
    tasks_file = wd.tasks_file(workdir)
    if tasks_file.is_file() and groups != [[]]:
        known = {t["name"] for t in wd.read_tasks(tasks_file)}
        unknown = sorted({t for g in groups for t in g} - known)
        if unknown:
            raise ConfigError(f"{wd.partition_file(workdir)} names task(s) {unknown} that {tasks_file} does not "
                              f"know (known: {sorted(known)[:10]}{'...' if len(known) > 10 else ''})")
    for k, g in enumerate(groups):
        if groups != [[]] and not g:
            raise ConfigError(f"{wd.partition_file(workdir)}: group {k} is empty")
    return groups


def check_branch(branch, n_groups: int, where: str = "split/partition.json") -> int:
    try:
        k = int(branch)
    except (TypeError, ValueError):
        raise ConfigError(f"--branch={branch!r} is not an integer") from None
    if not 0 <= k < n_groups:
        raise ConfigError(f"--branch={k} is out of range: {where} has {n_groups} group(s) (0..{n_groups - 1})")
    return k


def select_tasks(data: DataSettings, sources, tasks: Sequence[str] | None) -> tuple[DataSettings, bool]:
    """The data settings that read `tasks` only (None: every task), file by file where the files allow it,
    and whether the other tasks' files stay closed.

    `sources`: the run's resolved sources (merit_jax.data.sources.resolve; unused with data.tasks). With
    data.tasks entries the other entries are dropped; with a directory whose files are named by task (the
    synthetic mixture, per-task releases) only those files remain. Otherwise (one file holding several tasks)
    the whole source is read and the other tasks' records are dropped after parsing. The source path is the
    resolved one, so that the synthetic mixture in WORKDIR/data is read without the loader's WORKDIR (its
    token-count cache is another stage's to write).
    """
    from merit_jax.data.sources import expand

    if tasks is None:
        return (data if data.tasks else dataclasses.replace(data, path=str(sources[0].path))), True
    wanted = set(tasks)
    if data.tasks:
        unknown = sorted(wanted - {e["name"] for e in data.tasks})
        if unknown:
            raise ConfigError(f"the partition names task(s) {unknown} that data.tasks does not list")
        return dataclasses.replace(data, tasks=tuple(dict(e) for e in data.tasks if e["name"] in wanted)), True
    files = {p.stem: p for s in sources for p in expand(s.path)}
    if wanted <= set(files):
        return dataclasses.replace(data, tasks=tuple({"name": t, "path": str(files[t])} for t in tasks)), True
    return dataclasses.replace(data, path=str(sources[0].path)), False


def load_branch_data(data: DataSettings, workdir: Path, tasks: Sequence[str] | None):
    """(train examples, {task: held-out examples}, {task: supervised train tokens}) of `tasks` only
    (tasks=None: every task of the mixture, i.e. joint training)."""
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.data.sources import resolve

    tokenizer = load_tokenizer(data)
    sources = [] if data.tasks else resolve(data, workdir)[0]  # data.tasks entries name their files already
    selected, isolated = select_tasks(data, sources, tasks)
    if not isolated:
        log.warning("train: the data files are not one per task, so the whole mixture is parsed and only "
                    "tasks %s are kept", list(tasks))
    mixture = load_mixture(selected, tokenizer, None)
    tasks = mixture.names if tasks is None else tasks
    missing = sorted(set(tasks) - set(mixture.names))
    if missing:
        raise ConfigError(f"the partition names task(s) {missing} that the data does not contain "
                          f"(tasks found: {mixture.names[:10]}{'...' if len(mixture.names) > 10 else ''})")
    names = sorted(tasks)
    return (mixture.train_examples(names), {t: mixture.tasks[t].heldout for t in names},
            {t: mixture.tasks[t].train_tokens for t in names})
