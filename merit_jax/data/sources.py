"""Where a mixture's records come from: data.tasks, data.path, or the generated synthetic mixture.

Task names: a record's `task` (or `task_name`) field, else its file's stem (a directory's name for a
`save_to_disk` dir). A task named by a file's stem must come from that file alone; a task named in its
records or by a data.tasks entry may span files (sharded releases). A `data.tasks` entry
{name, path[, family]} takes the records of `path` whose task is `name` (records without a task field count
as `name`).
"""

import dataclasses
import logging
import pathlib
import tempfile
from collections.abc import Iterator

import merit_jax.data.records as rec
from merit_jax.config import DataSettings
import merit_jax.data.synthetic as synthetic
import merit_jax.data.synthetic_vl as synthetic_vl
from merit_jax.artifacts import data_dir, read_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Source:
    path: pathlib.Path
    task: str | None = None  # set for data.tasks entries: only this task is taken from `path`


def synthetic_dir(data: DataSettings, workdir=None) -> pathlib.Path:
    """The synthetic mixture for data.synthetic, generated once into WORKDIR/data/ (a temp dir without one)."""
    syn = data.synthetic
    seed, n = syn.get("seed", 0), syn.get("examples_per_task", 240)
    if syn.get("kind", "text") == "vl":  # the image-task mixture of configs/tiny_vl.py
        base = data_dir(workdir) if workdir is not None else pathlib.Path(tempfile.mkdtemp())
        out = base / f"synthetic-vl-v{synthetic_vl.SYNTHETIC_VL_VERSION}-s{seed}-n{n}"
        if not (out / "families.json").exists():  # written last
            synthetic_vl.write_synthetic_vl_mixture(out, seed=seed, examples_per_task=n)
        return out
    if workdir is None:
        return synthetic.write_mixture(tempfile.mkdtemp(prefix="merit_synthetic_"), seed, n)
    out = data_dir(workdir) / f"synthetic-v{synthetic.VERSION}-s{seed}-n{n}"
    if not (out / "families.json").exists():  # families.json is written last: its presence means complete
        synthetic.write_mixture(out, seed, n)
    return out


def tokenizer_dir(data: DataSettings) -> str:
    """data.tokenizer, else the model's directory, else the shipped synthetic (or synthetic VL) tokenizer."""
    given = data.tokenizer or data.model_path
    if given:
        return given
    if data.synthetic.get("kind", "text") == "vl":
        return str(synthetic_vl.VL_TOKENIZER_DIR)
    return str(synthetic.TOKENIZER_DIR)


def resolve(data: DataSettings, workdir=None) -> tuple[list[Source], dict[str, str]]:
    """(sources, {task: family}); families come from families.json or data.tasks entries."""
    entries = list(data.tasks)
    if entries:
        names = [e["name"] for e in entries]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise rec.DataError(f"data.tasks: duplicate task name(s) {dups}")
        absent = [f"{e['name']} ({e['path']})" for e in entries if not pathlib.Path(e["path"]).exists()]
        if absent:
            raise rec.DataError(f"data.tasks: task file(s) do not exist: {absent}")
        sources = [Source(pathlib.Path(e["path"]), e["name"]) for e in entries]
        return sources, {e["name"]: e["family"] for e in entries if e.get("family")}
    path = pathlib.Path(data.path or synthetic_dir(data, workdir))
    if not path.exists():
        raise rec.DataError(f"{path}: data.path does not exist")
    families_file = path / "families.json"
    families = read_json(families_file) if families_file.exists() else {}
    return [Source(path)], families


def expand(path: pathlib.Path) -> list[pathlib.Path]:
    """The data files of one path: itself, or a directory's record files and save_to_disk subdirectories."""
    if not path.is_dir() or rec.is_saved_dataset(path):
        return [path]
    files = [p for p in sorted(path.iterdir()) if not p.name.startswith(".") and p.name not in rec.METADATA_FILES
             and (p.suffix in rec.DATA_SUFFIXES and p.is_file() or rec.is_saved_dataset(p))]
    if not files:
        raise rec.DataError(f"{path}: no data files (.jsonl, .json, .parquet or save_to_disk dirs) in directory")
    return files


def iter_records(sources: list[Source], image_root="") -> Iterator[rec.Record]:
    """Every record of the sources, checked for empty files, absent and duplicate tasks."""
    origin = {}  # task -> (first file, named by the file's stem?)
    for source in sources:
        found = 0
        for path in expand(source.path):
            count = 0
            root = image_root or str(path.parent)
            for raw, where in rec.iter_raw(path):
                count += 1
                r = rec.normalize(raw, where, source.task or path.stem, root)
                if source.task is not None and r.task != source.task:
                    continue
                by_stem = source.task is None and not (raw.get("task") or raw.get("task_name"))
                _check_origin(origin, r.task, path, by_stem)
                found += 1
                yield r
            if count == 0:
                raise rec.DataError(f"{path}: no records (empty task '{source.task or path.stem}')")
        if source.task is not None and found == 0:
            raise rec.DataError(f"data.tasks: task '{source.task}' not found in {source.path}")


def _check_origin(origin, task, path, by_stem):
    first = origin.setdefault(task, (path, by_stem))
    if first[0] != path and (first[1] or by_stem):
        raise rec.DataError(f"duplicate task name '{task}': records in both {first[0]} and {path} "
                            "(a task named by its file's stem must come from that file alone)")
