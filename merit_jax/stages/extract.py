"""The extract stage: WORKDIR/extract/{tasks.json, task_grads.npy, gram.npy, example_norms.json,
stability.json} from θ⁰ and the mixture's calibration examples (the math: merit_jax/gradients.py,
docs/EXTRACT.md). Interrupted runs resume task by task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Sequence

import jax
import numpy as np

from merit_jax import artifacts as wd
from merit_jax import config
from merit_jax import sketch as sk
from merit_jax.config import ExtractSettings, data_settings, extract_settings, mesh_for
from merit_jax.gradients import (TaskExtractor, check_calibration, select_params, seq_bucket,
                                 stability_curve, stability_protocol, task_stability)
from merit_jax.models import params as P
from merit_jax.stages import theta0_of

log = logging.getLogger(__name__)


def _fingerprint(s: ExtractSettings, theta0: pathlib.Path, mixture_fp: str, names: Sequence[str]) -> str:
    theta0 = pathlib.Path(theta0).resolve()
    stamps = sorted((p.name, p.stat().st_mtime_ns) for p in theta0.iterdir()) if theta0.is_dir() else []
    keys = dict(theta0=[str(theta0), stamps], mixture=mixture_fp, names=list(names),
                options=_options_record(s), gradients=s.options.batched,  # norms or not
                stability=[list(s.stability_sizes), int(s.stability_draws), int(s.stability_reference)])
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def is_complete(workdir: pathlib.Path) -> bool:
    from merit_jax.artifacts import extract_dir
    out = extract_dir(workdir)
    return (out / "tasks.json").is_file() and (out / "task_grads.npy").is_file()


def _options_record(s: ExtractSettings) -> dict[str, Any]:
    """What the outputs depend on besides θ⁰ and the data (stored in tasks.json, compared on skip)."""
    options = dataclasses.asdict(s.options)
    options.pop("micro_chunk")  # these change memory and speed, not results
    options.pop("logits_chunk")
    options.pop("gradients")  # batched and per-example gradients give the same vectors
    options.pop("pack")  # and so do packed rows
    return {**options, "n_calib": int(s.n_calib), "include": list(s.include), "exclude": list(s.exclude),
            "stability_reference": int(s.stability_reference)}


def run(cfg, workdir: pathlib.Path, force: bool = False) -> dict[str, Any]:
    """The extract stage (see the module docstring). Skipped when extract/tasks.json (written last) and
    task_grads.npy exist, unless `force`. Returns the tasks.json record.

    Multi-process: every process computes (the task function is one SPMD program); process 0 alone writes,
    and its view of which tasks are already done is broadcast, so all processes run the same tasks."""
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.data.packing import pad_batch, packed_batch
    from merit_jax.io.load import load_model
    from merit_jax.artifacts import extract_dir, write_json

    workdir = pathlib.Path(workdir)
    out = extract_dir(workdir)
    s = extract_settings(cfg)
    if is_complete(workdir) and not force:
        record = wd.read_tasks_record(out / "tasks.json")
        if record.get("options") != _options_record(s):
            log.warning("extract: %s was made with options %s, the config now says %s; rerun the stage with "
                        "force to recompute", out / "tasks.json", record.get("options"), _options_record(s))
        log.info("extract: %s exists, skipping", out / "tasks.json")
        return record
    primary = jax.process_index() == 0
    options = s.options
    sizes = [int(m) for m in s.stability_sizes]
    draws = int(s.stability_draws)

    theta = theta0_of(cfg, workdir)
    mesh = mesh_for(cfg)
    m = config.model_settings(cfg)
    model = load_model(theta, mesh=mesh, dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=s.remat or m.remat,
                       attention=m.attention, scan_layers=m.scan_layers, max_segments=m.max_segments)
    tokenizer = load_tokenizer(data_settings(cfg))
    mixture = load_mixture(data_settings(cfg), tokenizer, workdir)
    names = select_params(list(P.flatten(model)), list(s.include), list(s.exclude))
    extractor = TaskExtractor(model, names, options, mesh=mesh, compiler_options=dict(s.xla_options))

    vocab = _vocab_size(model)
    task_names = list(mixture.tasks)
    n_tasks = len(task_names)
    with_reference = options.keep_example_sketches and any(t.reference for t in mixture.tasks.values())
    for name in task_names:  # every input error before any compute
        check_calibration(name, mixture.tasks[name].calib, vocab)
        if with_reference and mixture.tasks[name].reference:
            check_calibration(name, mixture.tasks[name].reference, vocab, what="stability-reference example")
    # every task padded to the largest task's chunk count: one compilation per sequence-length bucket
    chunks = extractor.chunks_for(max(len(t.calib) for t in mixture.tasks.values()))
    if with_reference:  # the reference's mean only, straight into the per-example sketches' space (linear)
        ref_extractor = TaskExtractor(model, names, dataclasses.replace(
            options, reduction=options.example_reduction, keep_example_sketches=False), mesh=mesh,
            compiler_options=dict(s.xla_options))
        ref_chunks = ref_extractor.chunks_for(max(len(t.reference) for t in mixture.tasks.values()))
    images, first = _calibration_images(cfg, model, mixture, with_reference, options.packed)
    log.info("extract: %d tasks, %d parameter tensors (%d coordinates), reduction=%s -> d=%d, θ⁰=%s",
             n_tasks, len(names), extractor.layout.total, options.reduction, extractor.dim, theta)

    # Resumable: rows go to a float32 memmap, each finished task leaves a small json; both are discarded
    # if anything they depend on changed. tasks.json goes first: the stage is incomplete until the end.
    partial = out / ".partial"
    rows_path = partial / "task_grads.npy"
    rows = None
    if primary:
        (out / "tasks.json").unlink(missing_ok=True)
        fp = _fingerprint(s, theta, mixture.fingerprint, names)
        meta = partial / "meta.json"
        if partial.exists() and (not meta.is_file() or json.loads(meta.read_text()).get("fingerprint") != fp
                                 or not rows_path.is_file()):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        if rows_path.exists():
            rows = np.load(rows_path, mmap_mode="r+")
        else:
            rows = np.lib.format.open_memmap(rows_path, mode="w+", dtype=np.float32, shape=(n_tasks, extractor.dim))
            write_json(meta, {"fingerprint": fp})
    done_files = [partial / f"task{t:05d}.json" for t in range(n_tasks)]
    done = multihost_utils.broadcast_one_to_all(np.array([primary and f.is_file() for f in done_files]))

    records, stats, cosines = [], {}, {}
    for t, name in enumerate(tqdm(task_names, desc="extract", unit="task", disable=None)):
        task = mixture.tasks[name]
        if done[t]:
            saved = json.loads(done_files[t].read_text()) if primary else None
            if saved is not None:
                records.append(saved["record"])
                stats[name] = saved["stats"]
                cosines[name] = {int(m): np.asarray(v) for m, v in saved["stability"].items()}
            continue
        def task_batch(examples, offset):
            # several examples per row with extract.pack (the reference never: it takes the per-example path)
            seq_len, rows = _task_rows(examples, options.packed)
            batch = packed_batch(examples, seq_len, rows)[0] if options.packed else pad_batch(examples, seq_len)
            if images is not None:  # Qwen2.5-VL: each row with its examples' images
                batch = images.add(batch, [[first[name] + offset + i for i in row] for row in rows])
            return batch

        result = extractor(task_batch(task.calib, 0), task=name, chunks=chunks)
        reference = None
        if with_reference and task.reference:
            reference = ref_extractor(task_batch(task.reference, len(task.calib)),
                                      task=f"{name} (stability reference)", chunks=ref_chunks).vector
        record = {"name": name, "n_calib": result.n, "train_tokens": int(task.train_tokens),
                  "family": task.family, "calib_tokens": int(result.tokens.sum()),
                  "loss_mean": float(result.losses.mean()),
                  "grad_norm_mean": None if result.norms is None else float(result.norms.mean()),
                  "mean_grad_norm": float(np.linalg.norm(result.vector.astype(np.float64)))}
        stats[name] = {"grad_norm": None if result.norms is None else result.norms.tolist(),
                       "loss": result.losses.tolist(),
                       "tokens": result.tokens.astype(int).tolist()}
        record["stability_reference"] = len(task.reference) if reference is not None else 0
        cosines[name] = {} if with_reference and reference is None else task_stability(  # no disjoint examples
            result, options.per_example, sizes, draws, options.seed, name, reference)
        records.append(record)
        if primary:
            rows[t] = result.vector
            rows.flush()
            write_json(done_files[t], {"record": record, "stats": stats[name],
                                       "stability": {str(m): v.tolist() for m, v in cosines[name].items()}})

    curve = stability_curve(cosines, sizes)
    record = {"reduction": options.reduction, "dim": extractor.dim, "per_example": options.per_example,
              "theta0": str(theta), "options": _options_record(s),
              "params": {"tensors": len(names), "coordinates": extractor.layout.total, "names": names},
              "tasks": records}
    if not primary:
        return record
    gram = sk.gram_blockwise(rows, block=max(1, (256 << 20) // (8 * n_tasks)))
    del rows
    os.replace(rows_path, out / "task_grads.npy")
    wd.write_npy(out / "gram.npy", gram)
    write_json(out / "example_norms.json", stats)
    write_json(out / "stability.json", {
        **curve, "draws_per_task": draws, "per_example": options.per_example,
        "space": f"{options.example_reduction} d={extractor.example_dim}",
        **stability_protocol(records, with_reference),
        "per_task": {k: {str(m): float(np.mean(v)) for m, v in c.items()} for k, c in cosines.items()}})
    write_json(out / "tasks.json", record)  # last: its presence marks the stage complete
    shutil.rmtree(partial, ignore_errors=True)
    if curve["m"]:
        log.info("extract: calibration stability %s", ", ".join(
            f"m={m}: {mu:.3f}±{sd:.3f}" for m, mu, sd in zip(curve["m"], curve["mean"], curve["std"])))
    return record


def _task_rows(examples, packed: bool) -> tuple[int, list]:
    """(sequence bucket, example indices per row) of a task's examples: first fit into rows of the bucket of
    its longest example when `packed`, else one example per row. The task's batch and the VL image arrays
    sized up front both take their rows from here, so they cannot disagree."""
    from merit_jax.data.packing import first_fit

    lengths = np.array([len(ex) for ex in examples])
    seq_len = seq_bucket(int(lengths.max()))
    return seq_len, first_fit(lengths, seq_len) if packed else [[i] for i in range(len(examples))]


def _calibration_images(cfg, model, mixture, with_reference: bool = False, packed: bool = False):
    """(RowImages over every task's calibration examples, {task: index of its first}) for a Qwen2.5-VL
    model, sized once for all of their rows (one compilation per sequence bucket; `packed`: the rows
    data.packing.packed_batch makes of each task's examples); (None, {}) for text models."""
    from merit_jax.data.vision import row_images_for

    make = row_images_for(data_settings(cfg), model)
    if make is None:
        return None, {}
    examples, first, rows = [], {}, []
    for name, task in mixture.tasks.items():
        first[name] = len(examples)
        rows += [[first[name] + i for i in row] for row in _task_rows(task.calib, packed)[1]]
        reference = task.reference if with_reference else []
        rows += [[first[name] + len(task.calib) + i] for i in range(len(reference))]
        examples += task.calib + reference
    return make(examples).fit(rows), first


def _vocab_size(model) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "vocab_size"):
        return int(cfg.vocab_size)
    emb = [v for k, v in P.specs(model).items() if k.endswith("embed_tokens/embedding")]
    return int(emb[0][0][0]) if emb else 2 ** 31
