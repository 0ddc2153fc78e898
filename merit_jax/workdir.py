"""Where each stage reads and writes inside WORKDIR (layout fixed in DESIGN.md), in one place."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable

from merit_jax.errors import InputFileError, describe, utf8_text

Path = pathlib.Path


def basin_dir(workdir: Path) -> Path:
    return Path(workdir) / "basin"


def theta0(cfg, workdir: Path) -> Path:
    """θ⁰ of a run's config (see `theta0_dir`)."""
    return theta0_dir(workdir, basin=cfg.get("basin", {}).get("enabled", True), hf_path=cfg.model.hf_path)


def theta0_dir(workdir: Path, *, basin: bool, hf_path: str) -> Path:
    """θ⁰: the basin stage's output when enabled, else the configured pretrained checkpoint."""
    if basin:
        return basin_dir(workdir)
    if not hf_path:
        raise ValueError("config: model.hf_path is empty and basin.enabled is False: there is no θ⁰ "
                         "(set --config.model.hf_path=DIR or --config.basin.enabled=True)")
    return Path(hf_path)


def extract_dir(workdir: Path) -> Path:
    return Path(workdir) / "extract"


def split_dir(workdir: Path) -> Path:
    return Path(workdir) / "split"


def partition_file(workdir: Path) -> Path:
    return split_dir(workdir) / "partition.json"


def branch_dir(workdir: Path, k: int) -> Path:
    return Path(workdir) / "branches" / str(k)


def branch_final(workdir: Path, k: int) -> Path:
    """The finished branch's weights as a merit_jax checkpoint (what merge reads)."""
    return branch_dir(workdir, k) / "final"


def merged_dir(workdir: Path) -> Path:
    return Path(workdir) / "merged"


def hf_dir(workdir: Path) -> Path:
    return Path(workdir) / "hf"


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


def read_tasks(path: Path) -> list:
    """extract/tasks.json's task entries (the file is {"tasks": [...], + metadata}; a bare list is accepted)."""
    data = read_json(path, "extract")
    return data["tasks"] if isinstance(data, dict) and "tasks" in data else data


def read_partition(workdir: Path) -> dict:
    part = read_json(partition_file(workdir), "split")
    for key in ("groups", "tokens", "weights"):
        if key not in part:
            raise ValueError(f"{partition_file(workdir)}: missing key {key!r}")
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
