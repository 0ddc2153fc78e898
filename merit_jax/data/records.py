"""Reading task records from files into one normalised shape, streamed.

A record becomes `Record(task, messages, image, where)`: `messages` is a chat ([{"role", "content"}]),
whatever shape it came in (chat `messages`, FLAN `inputs`/`targets`, Vision-FLAN/LLaVA `conversations`),
and `where` ("file:line" or "file row N") is what every error about it names.
"""

import dataclasses
import json
import logging
import pathlib
from collections.abc import Iterator

from merit_jax.errors import InputFileError, reading, utf8_line, utf8_text

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
METADATA_FILES = ("families.json",)  # files in a mixture directory that are not records
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class DataError(InputFileError):
    """Bad input data; the message names the file, the line or row, and what is wrong."""


@dataclasses.dataclass
class Record:
    task: str
    messages: list  # [{"role": "user" | "assistant" | "system", "content": str}]
    image: str | None  # resolved path of the record's image (Vision-FLAN), validated to exist
    where: str


def is_saved_dataset(path):
    """True for a directory written by `datasets.save_to_disk` (a Dataset or a DatasetDict)."""
    path = pathlib.Path(path)
    return path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json"))


def iter_raw(path) -> Iterator[tuple[dict, str]]:
    """Yields (raw record dict, where) from one source; JSONL and Parquet are streamed."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if is_saved_dataset(path):
        yield from _iter_saved_dataset(path)
    elif path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw_line in enumerate(f, 1):
                line = utf8_line(raw_line, path, lineno)
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                yield raw, f"{path}:{lineno}"
    elif path.suffix == ".json":
        try:
            items = json.loads(utf8_text(path.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: a .json source must hold a list of records, got {type(items).__name__}")
        for i, raw in enumerate(items):
            yield raw, f"{path} [record {i}]"
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        with reading(path, "Parquet file"):
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        while True:
            with reading(path, "Parquet file", f" row {row}"):
                batch = next(batches, None)
                rows = batch.to_pylist() if batch is not None else None
            if rows is None:
                break
            for raw in rows:
                yield raw, f"{path} row {row}"
                row += 1
    else:
        raise DataError(f"{path}: unsupported source (expected .jsonl, .json, .parquet or a save_to_disk dir)")


def _iter_saved_dataset(path):
    import datasets

    with reading(path, "datasets.save_to_disk directory"):
        ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    for row in range(len(ds)):
        with reading(path, "datasets.save_to_disk directory", f" row {row}"):
            raw = ds[row]
        yield raw, f"{path} row {row}"


def normalize(raw, where, default_task, image_root) -> Record:
    """One raw record of any supported shape -> Record; raises DataError naming `where`.

    `image_root`: the directory a record's relative `image` path resolves against.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    task = raw.get("task") or raw.get("task_name") or default_task
    if not isinstance(task, str) or not task:
        raise DataError(f"{where}: task name must be a non-empty string, got {task!r}")
    if raw.get("messages") is not None:
        messages = [_message(m, where, "role", "content") for m in _list(raw["messages"], "messages", where)]
    elif raw.get("conversations") is not None:
        messages = [_message(m, where, "from", "value") for m in _list(raw["conversations"], "conversations", where)]
    elif "inputs" in raw and "targets" in raw:
        for key in ("inputs", "targets"):
            if not isinstance(raw[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(raw[key]).__name__}")
        messages = [{"role": "user", "content": raw["inputs"]}, {"role": "assistant", "content": raw["targets"]}]
    else:
        raise DataError(f"{where}: record has none of 'messages', 'conversations', or 'inputs' + 'targets' "
                        f"(keys: {sorted(raw)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to learn)")
    first = next(m["role"] for m in messages if m["role"] != "system")
    if first == "assistant":
        raise DataError(f"{where}: conversation starts with the assistant; it needs a prompt before it")
    return Record(task, messages, _resolve_image(raw.get("image"), where, image_root), where)


def _list(value, key, where):
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty list")
    return value


def _message(m, where, role_key, content_key):
    if not isinstance(m, dict) or role_key not in m or content_key not in m:
        raise DataError(f"{where}: each turn needs '{role_key}' and '{content_key}', got {m!r:.80}")
    role = _ROLES.get(m[role_key])
    if role is None:
        raise DataError(f"{where}: unknown role {m[role_key]!r} (expected one of {sorted(_ROLES)})")
    if not isinstance(m[content_key], str):
        raise DataError(f"{where}: turn content must be a string, got {type(m[content_key]).__name__}")
    return {"role": role, "content": m[content_key]}


def _resolve_image(image, where, image_root):
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise DataError(f"{where}: 'image' must be a path string, got {type(image).__name__}")
    path = pathlib.Path(image_root) / image
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path} (image root: {image_root}; see data.image_root)")
    return str(path)
