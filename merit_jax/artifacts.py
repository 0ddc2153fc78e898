"""The work directory's artifacts (layout fixed in DESIGN.md), in one place: every path a stage reads or
writes inside WORKDIR, the one typed reader and validator of each JSON artifact the stages pass on
(tasks.json, partition.json, task_grads.npy), and atomic writes.

    WORKDIR/config.json  data/  basin/  basin_run/  extract/{tasks.json, task_grads.npy, gram.npy,
    stability.json}  split/{partition.json, cosine.npy}  branches/K/{final, metrics.jsonl}  merged/  hf/
    evaluate/{results.json, hessian_alignment.json}  baselines/NAME/ (a work directory each)  report/  timings/
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Sequence, TypedDict

from merit_jax.errors import InputFileError, describe, utf8_text

Path = pathlib.Path


def basin_dir(workdir: Path) -> Path:
    return Path(workdir) / "basin"


def theta0_dir(workdir: Path, *, basin: bool, hf_path: str) -> Path:
    """θ⁰: the basin stage's output when enabled, else the configured pretrained checkpoint."""
    if basin:
        return basin_dir(workdir)
    if not hf_path:
        raise ValueError("config: model.hf_path is empty and basin.enabled is False: there is no θ⁰ "
                         "(set --config.model.hf_path=DIR or --config.basin.enabled=True)")
    return Path(hf_path)


def basin_run_dir(workdir: Path) -> Path:
    """The basin's training run (checkpoints, metrics); its result is basin_dir."""
    return Path(workdir) / "basin_run"


def data_dir(workdir: Path) -> Path:
    """Generated data and token-count caches."""
    return Path(workdir) / "data"


def config_file(workdir: Path) -> Path:
    return Path(workdir) / "config.json"


def timings_file(workdir: Path, key: str) -> Path:
    return Path(workdir) / "timings" / f"{key}.json"


def extract_dir(workdir: Path) -> Path:
    return Path(workdir) / "extract"


def gram_file(workdir: Path) -> Path:
    return extract_dir(workdir) / "gram.npy"


def stability_file(workdir: Path) -> Path:
    return extract_dir(workdir) / "stability.json"


def tasks_file(workdir: Path) -> Path:
    return extract_dir(workdir) / "tasks.json"


def task_grads_file(workdir: Path) -> Path:
    return extract_dir(workdir) / "task_grads.npy"


def split_dir(workdir: Path) -> Path:
    return Path(workdir) / "split"


def partition_file(workdir: Path) -> Path:
    return split_dir(workdir) / "partition.json"


def cosine_file(workdir: Path) -> Path:
    return split_dir(workdir) / "cosine.npy"


def branch_dir(workdir: Path, k: int) -> Path:
    return Path(workdir) / "branches" / str(k)


def branch_final(workdir: Path, k: int) -> Path:
    """The finished branch's weights as a merit_jax checkpoint (what merge reads)."""
    return branch_dir(workdir, k) / "final"


def merged_dir(workdir: Path) -> Path:
    return Path(workdir) / "merged"


def hf_dir(workdir: Path) -> Path:
    return Path(workdir) / "hf"


def results_file(workdir: Path) -> Path:
    return Path(workdir) / "evaluate" / "results.json"


def alignment_file(workdir: Path) -> Path:
    return Path(workdir) / "evaluate" / "hessian_alignment.json"


def baseline_dir(workdir: Path, name: str) -> Path:
    """Baseline `name`'s own work directory (its split, branches and merged model)."""
    return Path(workdir) / "baselines" / name


def report_dir(workdir: Path) -> Path:
    return Path(workdir) / "report"


def read_json(path: Path, what: str | None = None) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist{f' (run the {what} stage first)' if what else ''}")
    try:
        return json.loads(utf8_text(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except OSError as e:
        raise InputFileError(f"{path}: cannot read it ({describe(e)})") from None


def read_jsonl(path: Path) -> list:
    """The records of a JSON-lines log (metrics.jsonl). A last line cut short by a killed writer is dropped;
    a bad line anywhere else names the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = utf8_text(path.read_bytes(), path).splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # torn by a kill mid-write: that step is redone on resume
                break
            raise InputFileError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
    return out


# ------------------------------------------------------------ typed artifacts: one reader + validator each


class TaskEntry(TypedDict, total=False):
    """One task of extract/tasks.json (a row of task_grads.npy, in the same order)."""
    name: str
    n_calib: int  # calibration examples of its gradient
    train_tokens: int  # supervised training tokens: the task's weight in the split and the merge
    family: str | None
    calib_tokens: int
    loss_mean: float
    grad_norm_mean: float | None  # None on the batched gradient path (no per-example norms)
    mean_grad_norm: float
    stability_reference: int


class TasksRecord(TypedDict, total=False):
    """extract/tasks.json: the tasks and what their gradients were made with (docs/EXTRACT.md)."""
    tasks: list[TaskEntry]
    reduction: str
    dim: int
    per_example: str
    theta0: str
    options: dict
    params: dict  # {"tensors", "coordinates", "names"}: the parameters the gradients cover


class Partition(TypedDict, total=False):
    """split/partition.json: K groups of task names with their supervised tokens and token weights (the split
    stage writes more keys, docs/SPLIT.md; these are the ones its readers rely on)."""
    method: str
    depth: int
    groups: list[list[str]]
    tokens: list[float]
    weights: list[float]
    seed: int
    axes: str
    center: bool


def read_tasks_record(path: Path, require: Sequence[str] = ()) -> TasksRecord:
    """extract/tasks.json, validated: a non-empty list of task objects, each with a unique string name and the
    keys in `require` (the split needs "train_tokens"), n_calib >= 1 where given. The file is
    {"tasks": [...], + metadata}; a bare list of tasks is accepted (as {"tasks": list})."""
    path = Path(path)
    data = read_json(path, "extract")
    record = data if isinstance(data, dict) and "tasks" in data else {"tasks": data}
    tasks = record["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{path}: expected a non-empty list of tasks")
    seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        for key in ("name", *require):
            if key not in task:
                raise ValueError(f"{path}: entry {i} ({task.get('name', '?')!r}) has no {key!r}")
        if not isinstance(task["name"], str):
            raise ValueError(f"{path}: entry {i} has the name {task['name']!r}, not a string")
        if task["name"] in seen:
            raise ValueError(f"{path}: task {task['name']!r} appears twice (entries {seen[task['name']]} and {i})")
        seen[task["name"]] = i
        if "n_calib" in task and not task["n_calib"] >= 1:
            raise ValueError(f"{path}: task {task['name']!r} has n_calib={task['n_calib']}: "
                             "no calibration example, so no gradient")
    return record


def read_tasks(path: Path, require: Sequence[str] = ()) -> list[TaskEntry]:
    """extract/tasks.json's task entries, validated (see `read_tasks_record`)."""
    return read_tasks_record(path, require)["tasks"]


def read_task_grads(path: Path, n_tasks: int):
    """extract/task_grads.npy as float32 [T, d], T = the number of tasks in tasks.json."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the extract stage first")
    g = np.load(path)
    if g.ndim != 2 or g.shape[0] != n_tasks:
        raise ValueError(f"{path}: shape {list(g.shape)}, but tasks.json lists {n_tasks} tasks "
                         f"(expected [{n_tasks}, d], rows in tasks.json order)")
    return g.astype(np.float32, copy=False)


def read_partition(workdir: Path) -> Partition:
    """split/partition.json, validated: non-empty `groups` (lists of task names), and `tokens` and `weights`
    with one number per group."""
    path = partition_file(workdir)
    part = read_json(path, "split")
    if not isinstance(part, dict):
        raise ValueError(f"{path}: expected an object, got {type(part).__name__}")
    for key in ("groups", "tokens", "weights"):
        if key not in part:
            raise ValueError(f"{path}: missing key {key!r}")
    groups = part["groups"]
    if not isinstance(groups, list) or not groups or not all(
            isinstance(g, list) and all(isinstance(t, str) for t in g) for g in groups):
        raise ValueError(f"{path}: 'groups' must be a non-empty list of lists of task names")
    for key in ("tokens", "weights"):
        values = part[key]
        if not isinstance(values, list) or len(values) != len(groups) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{path}: {key!r} must hold one number per group ({len(groups)}), got {values!r}")
    return part


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Writes through a temp file in the same directory (fsync'd), then renames: no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any, sort_keys: bool = False) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"))


def write_npy(path: Path, array) -> None:
    import numpy as np

    atomic_write(path, lambda f: np.save(f, array), mode="wb")


def stage_timings(workdir: Path) -> dict[str, float]:
    """{stage: seconds} of the stages run in `workdir` (main writes one file per stage / branch job)."""
    rows = [json.loads(f.read_text()) for f in sorted((Path(workdir) / "timings").glob("*.json"))]
    return {r["stage"]: r["seconds"] for r in rows}
