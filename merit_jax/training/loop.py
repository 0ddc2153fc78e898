"""The run: `train_model` trains a model on examples, sharded, resumable and preemptible, and leaves its final
weights as a merit_jax checkpoint. The train and basin stages and the joint baselines all call it:

    result = train_model(settings, theta0_dir, examples, out_dir, mesh=mesh, heldout={task: [Example]})

Run directory (OUT = WORKDIR/branches/K for branch K):
    OUT/ckpt/<step>/     Orbax checkpoints (state + data-iterator position + run description), async
    OUT/metrics.jsonl    one json object per log / eval point
    OUT/tb/              TensorBoard event files
    OUT/final/           the finished weights as a merit_jax checkpoint (what merge reads); its presence marks
                         the run done, and a done run is skipped
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from merit_jax.io import checkpoint as ckpt_lib
from merit_jax.config import TrainSettings
from merit_jax.errors import ConfigError, reading
from merit_jax.training.feed import process_batches, seek, to_global
from merit_jax.training.heldout import HeldoutEval
from merit_jax.training.runlog import MetricsLog, Preempted, PreemptionWatch
from merit_jax.training.step import SplitModel, build_step_functions

log = logging.getLogger(__name__)

Path = pathlib.Path


@dataclasses.dataclass
class TrainResult:
    final_dir: Path
    steps: int
    skipped: bool  # the run was already finished (final_dir existed)
    metrics: dict  # the last evaluation (empty when skipped or without held-out data)


def _model_for(init, s: TrainSettings, mesh: Mesh, need_weights: bool):
    """(Model, params or None, hf_config, directory with tokenizer files or None) for a path or a module."""
    from merit_jax.models.registry import model_factory
    from merit_jax.io.load import load_model, read_config

    if isinstance(init, nnx.Module):
        model = SplitModel(init)
        params = SplitModel.params_of(init)
        shardings = model.shardings(mesh)
        params = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
        return model, params, None, None
    path = Path(init)
    hf = read_config(path)
    policy = dict(dtype=s.param_dtype, compute_dtype=s.compute_dtype, remat=s.remat, attention=s.attention,
                  scan_layers=s.scan_layers, max_segments=s.max_segments)
    if need_weights:
        module = load_model(path, mesh=mesh, **policy)
        return SplitModel(module), SplitModel.params_of(module), hf, path
    abstract = nnx.eval_shape(model_factory(hf, f"{path}/config.json", **policy))
    return SplitModel(abstract), None, hf, path


def _plan(examples, s: TrainSettings, num_epochs: float, max_steps: int | None) -> tuple[float, int]:
    """(epochs to stream, steps to run). With max_steps, enough whole epochs are streamed to cover them."""
    from merit_jax.data.pipeline import num_train_steps

    kw = dict(seq_len=s.seq_len, batch_size=s.batch_size, seed=s.seed)
    if max_steps is None:
        steps = num_train_steps(examples, num_epochs=num_epochs, **kw)
        if steps < 1:
            raise ConfigError(f"{len(examples)} examples x {num_epochs} epochs make no full batch of "
                              f"train.batch_size={s.batch_size} rows of train.seq_len={s.seq_len}")
        return num_epochs, steps
    per_epoch = max(num_train_steps(examples, num_epochs=1.0, **kw), 1)
    epochs = float(math.ceil(max_steps / per_epoch))
    while num_train_steps(examples, num_epochs=epochs, **kw) < max_steps:
        epochs += 1.0
    return epochs, int(max_steps)


def _run_description(s: TrainSettings, examples, num_epochs: float, num_steps: int) -> dict:
    """What must not change between a run and its resumption (else the data order or schedule would)."""
    lengths = np.array([len(e) for e in examples], np.int64)
    return dict(num_steps=num_steps, num_epochs=num_epochs, batch_size=s.batch_size, seq_len=s.seq_len,
                seed=s.seed, grad_accum=s.grad_accum, n_examples=len(examples), total_tokens=int(lengths.sum()),
                optimizer=s.optimizer, learning_rate=s.learning_rate, schedule=s.schedule, freeze=list(s.freeze))


def train_model(s: TrainSettings, init, examples: Sequence, out_dir, *, mesh: Mesh,
                heldout: Mapping[str, Sequence] | None = None, num_epochs: float | None = None,
                max_steps: int | None = None, final_dir=None, hf_config: dict | None = None, tokenizer_dir=None,
                extra_json: Mapping[str, Any] | None = None, images_for: Callable | None = None,
                hooks: Sequence[Callable[[int], None]] = (), progress: bool = True) -> TrainResult:
    """Trains `init` (a model directory: merit_jax checkpoint or HF; or an nnx.Module) on `examples`.

    s: the run's training settings (optimizer, schedule, batch, checkpoints, dtypes, remat, attention).
    mesh: the (data, fsdp, tp) mesh the step is sharded over (checked against `s`).
    examples: tokenised training examples (merit_jax.data Example), packed into the global batch.
    out_dir: the run directory (ckpt/, metrics.jsonl, tb/); final_dir defaults to out_dir/final.
    heldout: {task: [Example]} evaluated at the start, every s.eval_every steps and at the end.
    num_epochs: epochs over `examples` (fractional ok; default s.epochs); max_steps instead fixes the
      number of steps (streaming as many epochs as that needs).
    hf_config / tokenizer_dir: what the final checkpoint describes itself with (taken from `init` when it
      is a directory). extra_json: more files for the final checkpoint ("train.json" is merged into the run
      summary written there). images_for: model -> (examples -> RowImages) for a Qwen2.5-VL model, None for a
      text one (data.vision.row_images_for bound to the run's data settings); None: no image inputs.
      hooks: called on every process after each step with the number of steps done.
    Resumes from the latest checkpoint in out_dir/ckpt; on SIGTERM saves and raises Preempted (SystemExit).
    A run whose final_dir is already a complete checkpoint returns at once (skipped=True).
    """
    import grain
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    final_dir = Path(final_dir).absolute() if final_dir is not None else out_dir / "final"
    if ckpt_lib.is_checkpoint(final_dir):
        log.info("train: %s is complete, skipping", final_dir)
        return TrainResult(final_dir, 0, True, {})
    s.validate(mesh)
    if not examples:
        raise ValueError("train_model: no training examples")
    too_long = [len(e) for e in examples if len(e) > s.seq_len]
    if too_long:
        raise ConfigError(f"{len(too_long)} training example(s) are longer than train.seq_len={s.seq_len} "
                          f"(longest {max(too_long)}): set data.max_len <= train.seq_len")
    num_epochs, num_steps = _plan(examples, s, float(s.epochs if num_epochs is None else num_epochs), max_steps)
    description = _run_description(s, examples, num_epochs, num_steps)

    ckpt_dir = out_dir / "ckpt"
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data", "run"), options=ocp.CheckpointManagerOptions(
        max_to_keep=s.keep_checkpoints, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True))
    watch = metrics_log = bar = None
    try:
        start = manager.latest_step() or 0
        model, params, init_hf, init_dir = _model_for(init, s, mesh, need_weights=start == 0)
        hf_config = hf_config or init_hf
        if hf_config is None:
            raise ValueError("train_model: pass hf_config when `init` is a module (the final config.json)")
        if tokenizer_dir is None and init_dir is not None and ckpt_lib.has_tokenizer(init_dir):
            tokenizer_dir = init_dir
        fns = build_step_functions(model, s, num_steps, mesh)
        make_images = images_for(model) if images_for is not None else None
        iterator = process_batches(examples, s, num_epochs, mesh, make_images)
        if start:
            state = _restore(manager, ckpt_dir, start, num_steps, description, fns, iterator)
        else:
            with jax.set_mesh(mesh):
                state = fns.init_state(params)
        del params

        def save(step):
            manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
                run=ocp.args.JsonSave(description)))

        evaluator = HeldoutEval(model, heldout or {}, mesh, s.seq_len, s.eval_batch_size or s.batch_size,
                                fns.param_shardings, dict(s.xla_options), make_images, s.logits_chunk)
        metrics_log = MetricsLog(out_dir, start)
        watch = PreemptionWatch()
        if start == 0:  # the starting point's held-out numbers: what the run improves on
            metrics_log.write(0, "eval", evaluator(state["params"]))
        if progress and jax.process_index() == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=num_steps, initial=start, desc=str(out_dir.name), unit="step", dynamic_ncols=True)

        # Metrics of the steps since the last log point. The first step of a session compiles, so throughput
        # is timed from its end and counts the steps after it only (pending[timed_from:]).
        pending, clock, timed_from, last_eval = [], None, 0, {}
        with jax.set_mesh(mesh):
            for step in range(start, num_steps):
                state, m = fns.train_step(state, to_global(next(iterator), mesh, s.batch_size))
                pending.append(m)
                done = step + 1
                for hook in hooks:
                    hook(done)
                if clock is None:
                    jax.block_until_ready(m)
                    clock, timed_from = time.perf_counter(), len(pending)
                if done % s.log_every == 0 or done == num_steps:
                    values = _summarise(pending, timed_from, time.perf_counter() - clock)
                    metrics_log.write(done, "train", values)
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values.get('tokens_per_s', 0):.0f}")
                    pending, clock, timed_from = [], time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if s.eval_every and done % s.eval_every == 0 and done < num_steps:
                    metrics_log.write(done, "eval", evaluator(state["params"]))
                if watch.reached(done):
                    save(done)
                    manager.wait_until_finished()
                    preempted = Preempted(done, ckpt_dir)
                    log.warning("train: %s", preempted)
                    raise preempted
                if s.checkpoint_every and done % s.checkpoint_every == 0 and done < num_steps:
                    save(done)
            if manager.latest_step() != num_steps:
                save(num_steps)  # a crash while writing final/ then resumes here, not steps back
            last_eval = evaluator(state["params"])
            metrics_log.write(num_steps, "eval", last_eval)
        manager.wait_until_finished()
        extra = dict(extra_json or {})
        extra["train.json"] = {**description, **extra.get("train.json", {}), "final_eval": last_eval}
        ckpt_lib.save(final_dir, state["params"], hf_config, tokenizer_dir=tokenizer_dir, overwrite=True,
                      extra_json=extra)
        log.info("train: %d steps done; weights in %s", num_steps, final_dir)
        return TrainResult(final_dir, num_steps, False, last_eval)
    finally:
        for closeable in (watch, bar, metrics_log):
            if closeable is not None:
                closeable.close()
        manager.wait_until_finished()
        manager.close()


def _summarise(pending: list[dict], timed_from: int, seconds: float) -> dict[str, float]:
    """Means of loss and grad norm over `pending` steps; throughput over pending[timed_from:] in `seconds`."""
    host = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
    out = {
        "loss": float(np.mean([h["loss"] for h in host])),
        "grad_norm": float(np.mean([h["grad_norm"] for h in host])),
        "lr": host[-1]["lr"],
        "supervised_tokens": sum(h["supervised_tokens"] for h in host),
    }
    timed = host[timed_from:]
    if timed and seconds > 0:
        out["tokens_per_s"] = sum(h["tokens"] for h in timed) / seconds
        out["steps_per_s"] = len(timed) / seconds
    return out


def _restore(manager, ckpt_dir: Path, start: int, num_steps: int, description: dict, fns, iterator):
    """The train state saved at step `start` (after checking that it was a run with these settings), with the
    data iterator positioned there."""
    import grain
    import orbax.checkpoint as ocp

    with reading(ckpt_dir / str(start), "training checkpoint (Orbax)"):
        saved = manager.restore(start, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    defaults = {"freeze": []}  # keys added since older checkpoints were written
    changed = {k: (saved.get(k, defaults.get(k)), v) for k, v in description.items()
               if saved.get(k, defaults.get(k)) != v}
    if changed:
        raise ConfigError(f"{ckpt_dir} holds a run with other settings {changed} (saved, now): restore the "
                          f"config, or delete {ckpt_dir} to start over")
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          fns.abstract_state, fns.state_shardings)
    items = {"state": ocp.args.StandardRestore(target)}
    # grain saves one iterator file per process; saved by another number of processes, the position is
    # re-derived from the step (each step consumes one batch; the global batches do not depend on the
    # process count), so a run may resume on a different number of hosts.
    same_hosts = (ckpt_dir / str(start) / "data" /
                  f"process_{jax.process_index()}-of-{jax.process_count()}.json").is_file()
    if same_hosts:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    with reading(ckpt_dir / str(start), "training checkpoint (Orbax)"):
        state = manager.restore(start, args=ocp.args.Composite(**items))["state"]
    if not same_hosts:
        seek(iterator, start)
    log.info("train: resumed from %s at step %d/%d%s", ckpt_dir, start, num_steps,
             "" if same_hosts else f" (saved by another number of processes; now {jax.process_count()})")
    return state
