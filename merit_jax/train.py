"""The branch trainer: sharded, resumable, communication-free fine-tuning from θ⁰, and the `train` stage.

    python -m merit_jax.main --config configs/default.py --stage train [--branch K]

`train_model` is the reusable core (the train and basin stages and the joint baselines all call it):

    result = train_model(cfg, theta0_dir, examples, out_dir, heldout={task: [Example]}, num_epochs=1.0)

The step is functional NNX: the model is split once into (graphdef, parameters); parameters travel as the flat
dict {"model/layers/0/self_attn/q_proj/kernel": array} (the checkpoint currency) inside a state
{"params", "opt_state", "step", "rng"} that one `jax.jit` (explicit in/out shardings on the (data, fsdp, tp)
mesh, donated state) maps to the next state. The loss of a step is the summed cross-entropy over the
supervised tokens of the *global* batch divided by their number, whatever the micro-batching.

Run directory (OUT = WORKDIR/branches/K for branch K):
    OUT/ckpt/<step>/     Orbax checkpoints (state + data-iterator position + run description), async
    OUT/metrics.jsonl    one json object per log / eval point
    OUT/tb/              TensorBoard event files
    OUT/final/           the finished weights as a merit_jax checkpoint (what merge reads); its presence marks
                         the run done, and a done run is skipped
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from merit_jax import checkpoint as ckpt_lib
from merit_jax import workdir as wd
from merit_jax.errors import reading
from merit_jax.models import params as P
from merit_jax.models.inputs import TEXT_KEYS, batch_keys, batch_token_ce
from merit_jax.sharding import batch_sharding, make_mesh

log = logging.getLogger(__name__)

Path = pathlib.Path
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "terminated", after the state was saved
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
# Parameters without weight decay unless train.no_decay says otherwise: biases, norm scales, embeddings.
DEFAULT_NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)embed_tokens/embedding$")


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any compute, naming the config keys involved."""


class Preempted(SystemExit):
    """SIGTERM arrived: the state was saved at `step`; the process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, ckpt_dir: Path):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.ckpt_dir = step, ckpt_dir

    def __str__(self):
        return f"preempted: state saved at step {self.step} in {self.ckpt_dir}; rerun the same command to resume"


# ------------------------------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """cfg.train (and the dtype / remat keys of cfg.model) as one validated value."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine / linear decay end at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY  # regexes over parameter names
    freeze: tuple[str, ...] = ()  # regexes over parameter names: these get no update (e.g. "^visual/")
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # global norm; 0 disables
    epochs: float = 1.0
    batch_size: int = 16  # sequences per step, global
    batch_tokens: int = 0  # > 0: global batch in tokens (batch_size = batch_tokens / seq_len)
    seq_len: int = 128
    grad_accum: int = 1
    checkpoint_every: int = 50  # steps; 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0: only at the end
    eval_batch_size: int = 0  # rows per eval step, global; 0: batch_size
    log_every: int = 10
    loader_threads: int = 1  # threads building batches (VL: image decoding and preprocessing)
    seed: int = 0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    scan_layers: bool = False  # model.scan_layers: decoder (and vision) blocks as one lax.scan
    logits_chunk: int = 0  # model.logits_chunk: positions per logits chunk in the loss (0: all at once)
    xla_options: tuple[tuple[str, Any], ...] = ()  # per-jit XLA options of the train / eval steps

    @classmethod
    def from_cfg(cls, cfg, **overrides) -> "TrainSettings":
        t, m = cfg.train, cfg.model
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: t.get(k) for k in fields if t.get(k, None) is not None}
        for key in ("param_dtype", "compute_dtype", "remat", "attention", "scan_layers", "logits_chunk"):
            if m.get(key, None) is not None:
                values[key] = m.get(key)
        values.setdefault("seed", cfg.get("seed", 0))
        for key in ("no_decay", "freeze"):
            if key in values:
                values[key] = tuple(values[key])
        if "xla_options" in values:
            values["xla_options"] = tuple(sorted(dict(values["xla_options"]).items()))
        values.update(overrides)
        s = cls(**values)
        if s.batch_tokens:
            if s.batch_tokens % s.seq_len:
                raise ConfigError(f"train.batch_tokens={s.batch_tokens} is not a multiple of "
                                  f"train.seq_len={s.seq_len}")
            s = dataclasses.replace(s, batch_size=s.batch_tokens // s.seq_len)
        return s

    def validate(self, mesh: Mesh | None = None) -> None:
        errors = []
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"train.optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            errors.append(f"train.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        for key in ("param_dtype", "compute_dtype"):
            if getattr(self, key) not in DTYPES:
                errors.append(f"model.{key}={getattr(self, key)!r}: expected one of {DTYPES}")
        if self.remat not in REMAT:
            errors.append(f"model.remat={self.remat!r}: expected one of {REMAT}")
        if not isinstance(self.scan_layers, bool):
            errors.append(f"model.scan_layers={self.scan_layers!r}: expected True or False")
        if not self.learning_rate > 0:
            errors.append(f"train.learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errors.append(f"train.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not self.epochs > 0:
            errors.append(f"train.epochs={self.epochs} must be > 0")
        for key in ("warmup_steps", "checkpoint_every", "eval_every", "eval_batch_size", "grad_clip",
                    "weight_decay", "batch_tokens", "logits_chunk"):
            if getattr(self, key) < 0:
                errors.append(f"train.{key}={getattr(self, key)} must be >= 0")
        for key in ("batch_size", "seq_len", "grad_accum", "keep_checkpoints", "log_every", "loader_threads"):
            if getattr(self, key) < 1:
                errors.append(f"train.{key}={getattr(self, key)} must be >= 1")
        from merit_jax.errors import regex_errors

        for key in ("no_decay", "freeze"):
            errors += regex_errors(f"train.{key}", getattr(self, key))
        if mesh is not None and self.batch_size >= 1 and self.grad_accum >= 1:
            dp = mesh.shape["data"] * mesh.shape["fsdp"]
            if self.batch_size % (dp * self.grad_accum):
                errors.append(
                    f"train.batch_size={self.batch_size} is not divisible by the data-parallel axes times the "
                    f"micro-batches: mesh.data*mesh.fsdp*train.grad_accum = {mesh.shape['data']}*"
                    f"{mesh.shape['fsdp']}*{self.grad_accum} = {dp * self.grad_accum} (every device needs the "
                    "same number of rows in every micro-batch)")
            if self.eval_batch_size and self.eval_batch_size % dp:
                errors.append(f"train.eval_batch_size={self.eval_batch_size} is not divisible by "
                              f"mesh.data*mesh.fsdp = {dp}")
        if errors:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))


def mesh_for(cfg) -> Mesh:
    """The (data, fsdp, tp) mesh of cfg.mesh over all global devices, or a ConfigError saying why not."""
    m = cfg.mesh
    try:
        return make_mesh(int(m.data), int(m.fsdp), int(m.tp))
    except ValueError as e:
        raise ConfigError(f"config mesh (data={m.data}, fsdp={m.fsdp}, tp={m.tp}) does not fit the "
                          f"{jax.device_count()} {jax.default_backend()} device(s) of {jax.process_count()} "
                          f"process(es): {e}") from None


# -------------------------------------------------------------------------------- optimizer (pure)


def make_schedule(s: TrainSettings, num_steps: int) -> Callable[[Any], jax.Array]:
    """Learning rate of the update applied at 0-based `step`: linear warmup to the peak (never 0), then decay.

    Warmup: peak * (step + 1) / (warmup + 1) for step < warmup. Then `t` = (step - warmup) / (num_steps -
    warmup) runs from 0 towards 1: cosine from the peak to peak * min_lr_ratio (reached at step num_steps, one
    past the last update, so that no update is wasted at lr 0), linear the same, constant stays at the peak.
    """
    peak, end = float(s.learning_rate), float(s.learning_rate) * float(s.min_lr_ratio)
    warm = int(min(s.warmup_steps, max(num_steps - 1, 0)))
    decay_len = max(num_steps - warm, 1)

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warm) / decay_len, 0.0, 1.0)
        if s.schedule == "cosine":
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        elif s.schedule == "linear":
            after = peak + (end - peak) * t
        else:
            after = jnp.full_like(t, peak)
        return jnp.where(step < warm, peak * (step + 1.0) / (warm + 1.0), after)

    return lr


def decay_mask(names: Sequence[str], no_decay: Sequence[str]) -> dict[str, bool]:
    """{name: True if weight decay applies}: every parameter except those matching a `no_decay` regex."""
    patterns = [re.compile(rx) for rx in no_decay]
    return {n: not any(p.search(n) for p in patterns) for n in names}


def frozen_names(names: Sequence[str], freeze: Sequence[str]) -> set[str]:
    """The parameters matched by a train.freeze regex; a ConfigError if some regex matches nothing."""
    out = set()
    for rx in freeze:
        hit = {n for n in names if re.search(rx, n)}
        if not hit:
            raise ConfigError(f"train.freeze: {rx!r} matches no parameter (names look like {list(names)[:2]})")
        out |= hit
    if out and len(out) == len(names):
        raise ConfigError(f"train.freeze={list(freeze)} freezes every parameter: nothing would train")
    return out


def make_optimizer(s: TrainSettings, num_steps: int, param_names: Sequence[str]) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or SGD (+ decoupled weight decay on the masked parameters); frozen
    parameters (train.freeze) get zero updates and no optimizer state, and do not count in the clipping norm."""
    frozen = frozen_names(param_names, s.freeze)
    if frozen:
        labels = {n: "frozen" if n in frozen else "train" for n in param_names}
        inner = make_optimizer(dataclasses.replace(s, freeze=()), num_steps, param_names)
        return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
    lr = make_schedule(s, num_steps)
    mask = decay_mask(param_names, s.no_decay)
    if s.optimizer == "adamw":
        tx = optax.adamw(lr, b1=s.adam_b1, b2=s.adam_b2, eps=s.adam_eps, weight_decay=s.weight_decay, mask=mask)
    else:
        parts = [optax.add_decayed_weights(s.weight_decay, mask)] if s.weight_decay else []
        tx = optax.chain(*parts, optax.sgd(lr, momentum=s.momentum or None))
    return optax.chain(optax.clip_by_global_norm(s.grad_clip), tx) if s.grad_clip else tx


# ----------------------------------------------------------------------------------- the step (pure)


class SplitModel:
    """A model split once: graphdef + abstract parameter state, and the flat-dict view of its parameters."""

    def __init__(self, module: nnx.Module):
        self.graphdef, state, rest = nnx.split(module, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"the model holds non-parameter state {list(nnx.to_flat_state(rest))[:3]}: the "
                             "trainer only carries nnx.Param")
        self.rest = rest
        self.abstract = nnx.map_state(lambda p, v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype)), state)
        self.names = [P.path_name(p) for p, _ in nnx.to_flat_state(self.abstract)]
        self.vl_config = getattr(module, "vl_config", None)  # Qwen2.5-VL: batches carry images

    @staticmethod
    def params_of(module: nnx.Module) -> dict[str, jax.Array]:
        return P.flatten(nnx.state(module, nnx.Param))

    def module(self, params: Mapping[str, jax.Array]) -> nnx.Module:
        """The NNX module holding `params` (works on tracers: this is how the pure step calls the model)."""
        state = nnx.map_state(lambda p, v: v.replace(params[P.path_name(p)]), self.abstract)
        return nnx.merge(self.graphdef, state, self.rest)

    def shardings(self, mesh: Mesh) -> dict[str, NamedSharding]:
        return P.shardings(self.abstract, mesh)


def forward_losses(model: SplitModel, params, batch, logits_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over the supervised tokens of a batch dict, their number)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = batch_token_ce(model.module(params), batch, logits_chunk)
    return jnp.sum(ce * mask), jnp.sum(mask)


def _micro_batches(batch: dict, n_micro: int, mesh: Mesh | None) -> dict:
    """[B, ...] -> [A, B/A, ...] taking rows i, i+A, i+2A, ... into micro-batch i, so that every device's
    local rows are spread evenly over the micro-batches (a contiguous split would idle most devices)."""
    def split(x):
        x = x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))))
        return x
    return {k: split(v) for k, v in batch.items()}


def make_train_step(model: SplitModel, tx: optax.GradientTransformation, lr_fn, grad_accum: int = 1,
                    mesh: Mesh | None = None, param_shardings: Mapping[str, NamedSharding] | None = None,
                    freeze: Sequence[str] = (), logits_chunk: int = 0) -> Callable:
    """state, batch -> (state, metrics): one optimizer step on the global batch (not jitted here).

    Gradients of the summed loss are accumulated over `grad_accum` micro-batches (lax.scan) in fp32, sharded
    like the parameters, and divided by the supervised-token count of the whole batch, so the update equals
    the one-shot step.
    """
    frozen = frozen_names(model.names, freeze)

    def loss_of(trainable, fixed, micro):  # gradients of the trainable part only: frozen ones cost nothing
        return forward_losses(model, {**trainable, **fixed}, micro, logits_chunk)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step(state, batch):
        params = state["params"]
        trainable = {k: v for k, v in params.items() if k not in frozen}
        fixed = {k: v for k, v in params.items() if k in frozen}
        if grad_accum == 1:
            (total, n), grads = grad_fn(trainable, fixed, batch)
        else:
            def body(carry, micro):
                g_acc, t_acc, n_acc = carry
                (t, n_), g = grad_fn(trainable, fixed, micro)
                return (jax.tree.map(jnp.add, g_acc, g), t_acc + t, n_acc + n_), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
            if param_shardings is not None:  # else XLA may keep the accumulators whole on every device
                zeros = jax.lax.with_sharding_constraint(zeros, {k: param_shardings[k] for k in zeros})
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, total, n), _ = jax.lax.scan(body, init, _micro_batches(batch, grad_accum, mesh))
        grads = {**grads, **jax.tree.map(jnp.zeros_like, fixed)}  # the optimizer gives frozen ones no update
        scale = 1.0 / jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": total * scale,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_fn(state["step"]),
            "supervised_tokens": n,
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": jax.random.fold_in(state["rng"], state["step"])}
        return new_state, metrics

    return step


def make_eval_step(model: SplitModel, num_tasks: int, logits_chunk: int = 0) -> Callable:
    """params, batch (+ `task_id` [B]) -> per-task (CE sum, supervised tokens, correct tokens), each [T]."""
    def step(params, batch):
        mask = batch["loss_mask"]
        ce, right = batch_token_ce(model.module(params), batch, logits_chunk, hits=True)
        right = right.astype(jnp.float32)
        rows = [jnp.sum(ce * mask, -1), jnp.sum(mask, -1), jnp.sum(right * mask, -1)]
        return tuple(jax.ops.segment_sum(r, batch["task_id"], num_segments=num_tasks) for r in rows)

    return step


def state_shardings(abstract_state, param_shardings: Mapping[str, NamedSharding], mesh: Mesh):
    """Sharding of every leaf of a train state: a leaf reached through key `name` with the shape of parameter
    `name` (the parameters, Adam's mu and nu, SGD's momentum) shares its sharding; the rest is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        name = getattr(path[-1], "key", None) if path else None
        if isinstance(name, str) and name in param_shardings:
            try:
                param_shardings[name].shard_shape(leaf.shape)  # raises if the shape does not fit
                return param_shardings[name]
            except ValueError:
                pass
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


@dataclasses.dataclass
class StepFunctions:
    """The jitted pure functions of a run and the shardings they were compiled for."""

    train_step: Callable  # (state, batch) -> (state, metrics); donates `state`
    init_state: Callable  # params -> state (optimizer state created in its shards)
    param_shardings: dict[str, NamedSharding]
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs of the state
    optimizer: optax.GradientTransformation
    lr: Callable


def build_step_functions(model: SplitModel, s: TrainSettings, num_steps: int, mesh: Mesh) -> StepFunctions:
    """jax.jit of the train step and the state initialiser with explicit in/out shardings on `mesh`."""
    param_sh = model.shardings(mesh)
    tx = make_optimizer(s, num_steps, model.names)
    lr_fn = make_schedule(s, num_steps)
    abstract_params = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in P.specs(model.abstract).items()}

    def init_state(params):
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(s.seed))}

    abstract_state = jax.eval_shape(init_state, abstract_params)
    state_sh = state_shardings(abstract_state, param_sh, mesh)
    batch_sh = {k: batch_sharding(mesh, nd) for k, nd in batch_keys(model.vl_config is not None).items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    options = dict(s.xla_options) or None
    step = make_train_step(model, tx, lr_fn, s.grad_accum, mesh, param_sh, s.freeze, s.logits_chunk)
    train_step = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                         donate_argnums=(0,), compiler_options=options)
    init = jax.jit(init_state, in_shardings=(param_sh,), out_shardings=state_sh, compiler_options=options)
    return StepFunctions(train_step, init, param_sh, state_sh, abstract_state, tx, lr_fn)


# --------------------------------------------------------------------------------- global batches


def process_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """(shard_index, shard_count) of this process's rows of a [global_rows, ...] array with `sharding`: the
    process feeds rows [i * global_rows / n, (i + 1) * global_rows / n)."""
    index_map = sharding.addressable_devices_indices_map((global_rows, 1))
    spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = start
    for a, b in spans:
        if a > covered:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}: "
                             "order the mesh devices by process")
        covered = max(covered, b)
    per = stop - start
    if global_rows % per or start % per:
        raise ValueError(f"process {jax.process_index()} holds rows [{start}, {stop}) of {global_rows}: not an "
                         "equal share")
    return start // per, global_rows // per


def to_global(local: Mapping[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """This process's rows of a batch dict -> global jax arrays sharded over (data, fsdp)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v,
                                                        (global_rows, *v.shape[1:]))
    return out


# ---------------------------------------------------------------------------------------- evaluation


def jit_eval_step(model: SplitModel, num_tasks: int, mesh: Mesh, param_shardings, vl: bool, xla_options=None,
                  logits_chunk: int = 0) -> Callable:
    """jax.jit of make_eval_step with explicit shardings: batch rows (and `task_id` [B]) over the data axes,
    per-task sums replicated (what HeldoutEval runs, and what merit_jax.plan compiles)."""
    keys = batch_keys(vl)
    batch_sh = {k: batch_sharding(mesh, nd) for k, nd in keys.items()} | {"task_id": batch_sharding(mesh, 1)}
    return jax.jit(make_eval_step(model, num_tasks, logits_chunk), in_shardings=(param_shardings, batch_sh),
                   out_shardings=(NamedSharding(mesh, PartitionSpec()),) * 3, compiler_options=xla_options or None)


class HeldoutEval:
    """Per-task held-out loss and token accuracy, one example per row, in fixed-size batches (one compile)."""

    def __init__(self, model: SplitModel, heldout: Mapping[str, Sequence], mesh: Mesh, seq_len: int, rows: int,
                 param_shardings, xla_options=None, make_images: Callable | None = None, logits_chunk: int = 0):
        self.tasks = [t for t in sorted(heldout) if heldout[t]]
        self.examples = [(i, ex) for i, t in enumerate(self.tasks) for ex in heldout[t]]
        self.mesh, self.rows, self.seq_len = mesh, rows, seq_len
        self.shard, count = process_rows(batch_sharding(mesh, 2), rows)
        self.per_process = rows // count
        self.images = None  # VL: per-row image inputs, sized once for every held-out example
        if make_images is not None and self.examples:
            self.images = make_images([ex for _, ex in self.examples]).fit([[i] for i in range(len(self.examples))])
        self.step = jit_eval_step(model, max(len(self.tasks), 1), mesh, param_shardings, self.images is not None,
                                  xla_options, logits_chunk)

    def _local_batch(self, first: int) -> dict[str, np.ndarray]:
        """This process's rows of the eval batch starting at example `first` (padded with empty rows)."""
        from merit_jax.data.packing import pad_batch

        lo = first + self.shard * self.per_process
        chunk = self.examples[lo:min(lo + self.per_process, first + self.rows)]
        batch = pad_batch([ex for _, ex in chunk], self.seq_len) if chunk else {}
        batch["task_id"] = np.array([i for i, _ in chunk], np.int32)
        n_pad = self.per_process - len(chunk)  # empty rows carry no supervised token: they change no sum
        out = {}
        for k in (*TEXT_KEYS, "task_id"):
            shape = (self.seq_len,) if k != "task_id" else ()
            dtype = np.float32 if k == "loss_mask" else np.int32
            pad = np.zeros((n_pad, *shape), dtype)
            out[k] = np.concatenate([batch[k].astype(dtype), pad]) if chunk else pad
        if self.images is not None:
            out = self.images.add(out, [[lo + j] for j in range(len(chunk))])
        return out

    def __call__(self, params) -> dict[str, float]:
        if not self.tasks:
            return {}
        sums = np.zeros((3, len(self.tasks)))
        with jax.set_mesh(self.mesh):
            for first in range(0, len(self.examples), self.rows):
                out = self.step(params, to_global(self._local_batch(first), self.mesh, self.rows))
                sums += np.stack([np.asarray(o, np.float64) for o in out])
        ce, n, right = sums
        metrics = {"eval/loss": float(ce.sum() / max(n.sum(), 1)),
                   "eval/accuracy": float(right.sum() / max(n.sum(), 1))}
        for i, t in enumerate(self.tasks):
            metrics[f"eval/{t}/loss"] = float(ce[i] / max(n[i], 1))
            metrics[f"eval/{t}/accuracy"] = float(right[i] / max(n[i], 1))
        return metrics


# ------------------------------------------------------------------------------------ metrics output


class MetricsLog:
    """metrics.jsonl + TensorBoard events, written by process 0 only."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what a killed run logged after its last checkpoint: it is redone
            kept = [r for r in wd.read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        if not self.enabled or not values:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(k if "/" in k else f"{kind}/{k}", v, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------- preemption


class PreemptionWatch:
    """True at the step all processes agree to stop at, once any got SIGTERM.

    One process: a Python SIGTERM handler sets a flag. Several: JAX's preemption sync manager (set up by
    jax.distributed.initialize) catches SIGTERM and agrees on a common step without device collectives.
    """

    def __init__(self):
        self.flag = threading.Event()
        self.previous = None
        self.multi = jax.process_count() > 1
        if not self.multi and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag.is_set()

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


# ---------------------------------------------------------------------------------------- the runner


@dataclasses.dataclass
class TrainResult:
    final_dir: Path
    steps: int
    skipped: bool  # the run was already finished (final_dir existed)
    metrics: dict  # the last evaluation (empty when skipped or without held-out data)


def _model_for(init, s: TrainSettings, mesh: Mesh, need_weights: bool):
    """(Model, params or None, hf_config, directory with tokenizer files or None) for a path or a module."""
    from merit_jax.convert.hf import model_factory
    from merit_jax.models.io import load_model, read_config

    if isinstance(init, nnx.Module):
        model = SplitModel(init)
        params = SplitModel.params_of(init)
        shardings = model.shardings(mesh)
        params = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
        return model, params, None, None
    path = Path(init)
    hf_cfg = read_config(path)
    policy = dict(dtype=s.param_dtype, compute_dtype=s.compute_dtype, remat=s.remat, attention=s.attention,
                  scan_layers=s.scan_layers)
    if need_weights:
        module = load_model(path, mesh=mesh, **policy)
        return SplitModel(module), SplitModel.params_of(module), hf_cfg, path
    abstract = nnx.eval_shape(model_factory(hf_cfg, f"{path}/config.json", **policy))
    return SplitModel(abstract), None, hf_cfg, path


def seek(iterator, step: int) -> None:
    """Positions a fresh train iterator (make_train_iterator) at batch `step`."""
    state = iterator.get_state()
    if set(state) != {"next_index"}:
        raise RuntimeError(f"cannot position the data iterator from its state {state}: resume with the number of "
                           "processes that saved the checkpoint")
    iterator.set_state({"next_index": int(step)})


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


def train_model(cfg, init, examples: Sequence, out_dir, *, heldout: Mapping[str, Sequence] | None = None,
                num_epochs: float | None = None, max_steps: int | None = None,
                settings: TrainSettings | None = None, final_dir=None, hf_config: dict | None = None,
                tokenizer_dir=None, extra_json: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                hooks: Sequence[Callable[[int], None]] = (), progress: bool = True) -> TrainResult:
    """Trains `init` (a model directory: merit_jax checkpoint or HF; or an nnx.Module) on `examples`.

    cfg: the full config (cfg.train, cfg.model dtypes/remat, cfg.mesh); `settings` replaces cfg.train.
    examples: tokenised training examples (merit_jax.data Example), packed into the global batch.
    out_dir: the run directory (ckpt/, metrics.jsonl, tb/); final_dir defaults to out_dir/final.
    heldout: {task: [Example]} evaluated at the start, every train.eval_every steps and at the end.
    num_epochs: epochs over `examples` (fractional ok; default train.epochs); max_steps instead fixes the
      number of steps (streaming as many epochs as that needs).
    hf_config / tokenizer_dir: what the final checkpoint describes itself with (taken from `init` when it
      is a directory). extra_json: more files for the final checkpoint ("train.json" is merged into the run
      summary written there). hooks: called on every process after each step with the number of steps done.
    Resumes from the latest checkpoint in out_dir/ckpt; on SIGTERM saves and raises Preempted (SystemExit).
    A run whose final_dir is already a complete checkpoint returns at once (skipped=True).
    """
    import grain
    import orbax.checkpoint as ocp
    from merit_jax.data.pipeline import make_train_iterator
    from merit_jax.data.vision import row_images_for

    out_dir = Path(out_dir).absolute()
    final_dir = Path(final_dir).absolute() if final_dir is not None else out_dir / "final"
    if ckpt_lib.is_checkpoint(final_dir):
        log.info("train: %s is complete, skipping", final_dir)
        return TrainResult(final_dir, 0, True, {})
    s = settings or TrainSettings.from_cfg(cfg)
    mesh = mesh or mesh_for(cfg)
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
        shard_index, shard_count = process_rows(batch_sharding(mesh, 2), s.batch_size)
        log.info("train: process %d of %d feeds data shard %d of %d (%d of the %d rows of each global batch)",
                 jax.process_index(), jax.process_count(), shard_index, shard_count, s.batch_size // shard_count,
                 s.batch_size)
        make_images = row_images_for(cfg, model)
        iterator = make_train_iterator(list(examples), seq_len=s.seq_len, batch_size=s.batch_size, seed=s.seed,
                                       num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
                                       images=make_images(list(examples)) if make_images else None,
                                       num_threads=s.loader_threads)
        if start:
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


# ----------------------------------------------------------------------------------------- the stage


def branch_groups(cfg, workdir: Path) -> list[list[str]]:
    """The K task groups: split/partition.json, or (split.method=none without a partition) one group of all
    tasks; named tasks are checked against extract/tasks.json when present."""
    workdir = Path(workdir)
    method = cfg.split.get("method", "merit")
    if wd.partition_file(workdir).is_file() or method != "none":
        groups = [list(g) for g in wd.read_partition(workdir)["groups"]]
    else:
        groups = [[]]  # all tasks of the mixture: resolved when the data is read
    tasks_file = wd.extract_dir(workdir) / "tasks.json"
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


def task_data_config(cfg, workdir: Path, tasks: Sequence[str]):
    """A copy of cfg whose data section reads only `tasks`, file by file where the files allow it.

    With data.tasks entries the other entries are dropped; with a directory whose files are named by task
    (the synthetic mixture and per-task releases) only those files remain. Otherwise (one file holding
    several tasks) the whole source is read and the other tasks' records are dropped after parsing.
    Returns (config, True if the other tasks' files are never opened).
    """
    from merit_jax.data import sources as src

    cfg = cfg.copy_and_resolve_references()
    wanted = list(tasks)
    entries = list(cfg.data.get("tasks", []) or [])
    if entries:
        names = {e["name"] for e in entries}
        unknown = sorted(set(wanted) - names)
        if unknown:
            raise ConfigError(f"the partition names task(s) {unknown} that data.tasks does not list")
        with cfg.unlocked():
            cfg.data.tasks = [dict(e) for e in entries if e["name"] in set(wanted)]
        return cfg, True
    sources, _ = src.resolve(cfg, workdir)
    files = {p.stem: p for s in sources for p in src.expand(s.path)}
    if all(t in files for t in wanted):
        with cfg.unlocked():
            cfg.data.tasks = [{"name": t, "path": str(files[t])} for t in wanted]
        return cfg, True
    with cfg.unlocked():
        cfg.data.path = str(sources[0].path)
    return cfg, False


def load_branch_data(cfg, workdir: Path, tasks: Sequence[str] | None):
    """(train examples, {task: held-out examples}, {task: supervised train tokens}) of `tasks` only
    (tasks=None: every task of the mixture, i.e. joint training)."""
    from merit_jax.data.mixture import load_mixture, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    if tasks is None:
        # Sources resolved against WORKDIR (the synthetic mixture lives there), but no workdir for the loader:
        # the mixture's token-count cache in WORKDIR/data is another stage's to write.
        data_cfg = cfg.copy_and_resolve_references()
        if not data_cfg.data.get("tasks"):
            from merit_jax.data.sources import resolve
            with data_cfg.unlocked():
                data_cfg.data.path = str(resolve(cfg, workdir)[0][0].path)
        mixture = load_mixture(data_cfg, tokenizer, None)
        tasks = mixture.names
    else:
        data_cfg, isolated = task_data_config(cfg, workdir, tasks)
        if not isolated:
            log.warning("train: the data files are not one per task, so the whole mixture is parsed and only "
                        "tasks %s are kept", list(tasks))
        mixture = load_mixture(data_cfg, tokenizer, None)
    missing = sorted(set(tasks) - set(mixture.names))
    if missing:
        raise ConfigError(f"the partition names task(s) {missing} that the data does not contain "
                          f"(tasks found: {mixture.names[:10]}{'...' if len(mixture.names) > 10 else ''})")
    names = sorted(tasks)
    return (mixture.train_examples(names), {t: mixture.tasks[t].heldout for t in names},
            {t: mixture.tasks[t].train_tokens for t in names})


def run(cfg, workdir: Path, branch: int | None = None, *, hooks: Sequence[Callable[[int], None]] = ()
        ) -> dict[int, Path]:
    """The train stage: branch `branch` (all branches in turn when None) from θ⁰ into WORKDIR/branches/K/.

    Reads θ⁰, split/partition.json and the branch's own tasks; writes only WORKDIR/branches/K/. Finished
    branches (final/ complete) are skipped. Returns {k: final checkpoint directory}. `hooks` as train_model's.
    """
    workdir = Path(workdir)
    groups = branch_groups(cfg, workdir)
    ks = list(range(len(groups))) if branch is None else [check_branch(branch, len(groups))]
    settings = TrainSettings.from_cfg(cfg)
    mesh = mesh_for(cfg)
    settings.validate(mesh)
    max_len = int(cfg.data.get("max_len", settings.seq_len))
    if max_len > settings.seq_len:
        raise ConfigError(f"data.max_len={max_len} > train.seq_len={settings.seq_len}: an example would not fit "
                          "a packed row")
    theta0 = wd.theta0(cfg, workdir)
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
        train, heldout, tokens = load_branch_data(cfg, workdir, groups[k] or None)
        tasks = sorted(tokens)
        log.info("train: branch %d/%d: %d tasks, %d examples, %d supervised tokens", k, len(groups), len(tasks),
                 len(train), sum(tokens.values()))
        info = {"train.json": {"branch": k, "tasks": sorted(tasks), "supervised_tokens": int(sum(tokens.values())),
                               "task_tokens": tokens}}
        from merit_jax.data.sources import tokenizer_dir
        out[k] = train_model(cfg, theta0, train, wd.branch_dir(workdir, k), heldout=heldout, settings=settings,
                             mesh=mesh, extra_json=info, hooks=hooks,
                             tokenizer_dir=theta0 if ckpt_lib.has_tokenizer(theta0) else tokenizer_dir(cfg)).final_dir
    return out
