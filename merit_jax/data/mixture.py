"""The task mixture: tokenised examples per task, held-out and calibration splits, supervised token counts.

    tokenizer = load_tokenizer(data)            # data: config.DataSettings
    mixture = load_mixture(data, tokenizer, workdir)
    mixture.tasks["reverse"].train / .heldout / .calib / .train_tokens / .family
"""

import collections
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import zlib

import numpy as np
from tqdm import tqdm

import merit_jax.data.sources as src
from merit_jax.config import DataSettings
from merit_jax.data.records import DataError
from merit_jax.errors import reading
from merit_jax.artifacts import data_dir
from merit_jax.data.tokenize import ChatEncoder, Example, truncate
from merit_jax.data.vision import ImageEncoding, is_vl_run

log = logging.getLogger(__name__)
_CHUNK = 1024  # records tokenised per batch call
_VERSION = 1  # bump when the tokenisation or split rules change: invalidates cached counts


@dataclasses.dataclass(eq=False)
class TaskData:
    name: str
    train: list[Example]
    heldout: list[Example]
    calib: list[Example]  # drawn from train
    train_tokens: int  # supervised tokens of the train split, after truncation
    family: str | None = None
    # drawn from train, disjoint from calib: the calibration-stability curve's reference (extract.stability_reference)
    reference: list[Example] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class Mixture:
    tasks: dict[str, TaskData]  # ordered by name
    stats: dict  # {"records", "truncated", "skipped"}: each {task: count}
    fingerprint: str

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def train_examples(self, names=None) -> list[Example]:
        """The train examples of the named tasks (all tasks by default), tasks in name order."""
        return [ex for name in sorted(names or self.tasks) for ex in self.tasks[name].train]

    def train_tokens(self) -> dict[str, int]:
        return {name: t.train_tokens for name, t in self.tasks.items()}


def load_tokenizer(data: DataSettings):
    """AutoTokenizer from data.tokenizer, else model.hf_path, else the synthetic mixture's."""
    from transformers import AutoTokenizer

    path = src.tokenizer_dir(data)
    with reading(path, "tokenizer directory"):
        return AutoTokenizer.from_pretrained(path)


def load_mixture(data: DataSettings, tokenizer, workdir=None) -> Mixture:
    """Reads, tokenises, truncates and splits every task of `data`; writes the token-count cache."""
    max_len, mode = int(data.max_len), data.truncation
    sources, families = src.resolve(data, workdir)
    vl = is_vl_run(data)
    encoder = ChatEncoder(tokenizer, images=vl)
    images = ImageEncoding(data, tokenizer) if vl else None
    by_task = collections.defaultdict(list)  # task -> [(record index in task, Example)]
    stats = {k: collections.Counter() for k in ("records", "truncated", "skipped")}

    def flush(buffer):
        for r, ex in zip(buffer, encoder.encode(buffer)):
            if images is not None:
                ex, action = images(ex, r.where, max_len, mode)
            else:
                ex, action = truncate(ex, max_len, mode)
            if action != "kept":
                stats[action][r.task] += 1
            if ex is not None:
                by_task[r.task].append((stats["records"][r.task], ex))
            stats["records"][r.task] += 1

    buffer = []
    records = src.iter_records(sources, data.image_root)
    for record in tqdm(records, desc="tokenise", unit=" records", mininterval=5, leave=False):
        buffer.append(record)
        if len(buffer) == _CHUNK:
            flush(buffer)
            buffer = []
    flush(buffer)

    tasks = {}
    for name in sorted(stats["records"]):
        if not by_task[name]:
            raise DataError(f"task '{name}': all {stats['records'][name]} examples were skipped by the truncation "
                            f"rule (data.max_len={max_len}, data.truncation={mode})")
        tasks[name] = _split_task(name, by_task[name], stats["records"][name], data, families.get(name))
    _log_stats(stats, max_len, mode)
    n_calib = int(data.n_calib)
    short = {name: len(t.calib) for name, t in tasks.items() if len(t.calib) < n_calib}
    if short:
        log.warning("%d tasks have fewer training examples than extract.n_calib=%d and calibrate on all they "
                    "have: %s", len(short), n_calib, short)
    stats = {k: dict(sorted(v.items())) for k, v in stats.items()}
    mixture = Mixture(tasks, stats, fingerprint(data, tokenizer, sources))
    if workdir is not None:
        _write_counts(workdir, mixture)
    return mixture


def _split_task(name, indexed, n_records, data: DataSettings, family):
    """Held-out = a seeded draw of record indices (independent of tokenizer and max_len); calib from train."""
    seed = int(data.seed)
    fraction = float(data.heldout_fraction)
    n_held = min(int(data.heldout_max), math.floor(fraction * n_records + 1e-9), n_records - 1)
    task_key = zlib.crc32(name.encode())
    held = set(np.random.default_rng([seed, task_key, 0]).permutation(n_records)[:n_held].tolist())
    train = [ex for i, ex in indexed if i not in held]
    heldout = [ex for i, ex in indexed if i in held]
    if not train:
        raise DataError(f"task '{name}': no training example left after the held-out split and truncation")
    n_calib, n_reference = int(data.n_calib), int(data.stability_reference)
    order = np.random.default_rng([seed, task_key, 1]).permutation(len(train))
    calib = [train[i] for i in sorted(order[:n_calib].tolist())]  # the same whatever stability_reference is
    reference = [train[i] for i in sorted(order[n_calib:n_calib + n_reference].tolist())]
    tokens = sum(ex.supervised_tokens for ex in train)
    return TaskData(name, train, heldout, calib, tokens, family, reference)


def _log_stats(stats, max_len, mode):
    for action in ("truncated", "skipped"):
        total = sum(stats[action].values())
        if total:
            log.warning("%d examples %s by data.truncation=%s at data.max_len=%d: %s", total, action, mode, max_len,
                        dict(stats[action]))


def fingerprint(data: DataSettings, tokenizer, sources) -> str:
    """Hash of what the token counts depend on: source files (path, size, mtime), tokenizer, rules."""
    h = hashlib.sha256()
    d = data
    rules = dict(version=_VERSION, max_len=int(d.max_len), truncation=d.truncation,
                 heldout_fraction=float(d.heldout_fraction), heldout_max=int(d.heldout_max),
                 seed=int(d.seed), image_root=str(d.image_root),
                 image_pixels=[int(d.image_min_pixels), int(d.image_max_pixels)])
    h.update(json.dumps(rules, sort_keys=True).encode())
    for s in sources:
        h.update(f"{s.path.resolve()}|{s.task}".encode())
        for path in src.expand(s.path):
            for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    if is_vl_run(data):  # image token counts follow the processor's resize rules
        from merit_jax.data.vision import processor_for
        h.update(json.dumps(processor_for(data).to_dict(), sort_keys=True, default=str).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()


def _counts_path(workdir, fp):
    return data_dir(workdir) / f"train_tokens-{fp[:16]}.json"


def _write_counts(workdir, mixture):
    path = _counts_path(workdir, mixture.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = dict(fingerprint=mixture.fingerprint, train_tokens=mixture.train_tokens(), stats=mixture.stats)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(path)


def train_token_counts(data: DataSettings, tokenizer, workdir) -> dict[str, int]:
    """{task: supervised train tokens}, from WORKDIR/data/ when cached for these sources, tokenizer and rules."""
    sources, _ = src.resolve(data, workdir)
    path = _counts_path(workdir, fingerprint(data, tokenizer, sources))
    if path.exists():
        return json.loads(path.read_text())["train_tokens"]
    return load_mixture(data, tokenizer, workdir).train_tokens()
