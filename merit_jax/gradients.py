"""Stage 1 of MERIT, the library: each task's dataset-level gradient at θ⁰, reduced to d dims (docs/EXTRACT.md).

    extractor = TaskExtractor(model, select_params(names, include, exclude), ExtractOptions(...), mesh=mesh)
    result = extractor(pad_batch(task.calib, seq_len))    # TaskResult: vector [d], per-example norms, ...

One jit-compiled function per task does all the work: the task's calibration examples, laid out as
[n_chunks, micro_chunk, S] (examples sharded over the data axes, parameters over fsdp/tp), are scanned
micro-chunk by micro-chunk; in each, `jax.vmap(jax.value_and_grad(loss))` gives the chunk's per-example
gradients, which are reduced on the spot (weighted sum, norms, optional per-example sketches) and dropped.
Only one micro-chunk of per-example gradients ever exists. After the scan, the weighted mean gradient is
reduced once (merit_jax.sketch: full | stride | sketch): the reductions are linear.

Options come as config.ExtractOptions (never the ConfigDict). The pipeline stage that runs this over every
task and writes WORKDIR/extract/ is merit_jax/stages/extract.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from merit_jax import sketch as sk
from merit_jax.config import PER_EXAMPLE, ExtractOptions  # noqa: F401  (ExtractOptions: re-exported for callers)
from merit_jax.io.hf import to_host
from merit_jax.models import params as P
from merit_jax.models.inputs import TEXT_KEYS, batch_keys, batch_token_ce, is_vl
from merit_jax.sharding import LOGICAL_RULES

log = logging.getLogger(__name__)

STABILITY_SIZES = (10, 25, 50, 100, 200)
BATCH_AXES = ("data", "fsdp")  # examples are sharded over every data-parallel mesh axis
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Which parameters
# --------------------------------------------------------------------------------------------------

def select_params(names: Sequence[str], include: Sequence[str] = (".*",),
                  exclude: Sequence[str] = ("embed_tokens", "lm_head")) -> list[str]:
    """The names (in the given order) matched by some `include` regex and by no `exclude` regex
    (re.search over the flat parameter paths, e.g. "model/layers/0/mlp/up_proj/kernel")."""
    def compile_all(patterns, key):
        if isinstance(patterns, str):
            patterns = [patterns]
        out = []
        for p in patterns:
            try:
                out.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"extract.{key}: invalid regex {p!r}: {e}") from None
        return out

    inc, exc = compile_all(include, "include"), compile_all(exclude, "exclude")
    chosen = [n for n in names if any(r.search(n) for r in inc) and not any(r.search(n) for r in exc)]
    if not chosen:
        raise ValueError(f"extract: no parameter matches include={list(include)} minus exclude={list(exclude)} "
                         f"(first names: {list(names)[:4]})")
    return chosen


# --------------------------------------------------------------------------------------------------
# Per-example loss and gradients
# --------------------------------------------------------------------------------------------------

def example_loss(model: nnx.Module, ex: Mapping[str, jax.Array], logits_chunk: int = 0) -> jax.Array:
    """One example's loss: the mean cross-entropy over its supervised tokens. `ex`: one row of a batch dict
    (text arrays [S]; a Qwen2.5-VL example also carries its own images, see merit_jax.models.inputs)."""
    ce = batch_token_ce(model, {k: v[None] for k, v in ex.items()}, logits_chunk)[0]
    mask = ex["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def split_model(model: nnx.Module, names: Sequence[str]):
    """(graphdef, selected params State, the rest State): gradients are taken w.r.t. the selected part."""
    wanted = set(names)
    missing = wanted - set(P.flatten(model))
    if missing:
        raise ValueError(f"extract: the model has no parameter(s) {sorted(missing)[:3]}")
    selected = nnx.All(nnx.Param, lambda path, _: P.path_name(path) in wanted)
    return nnx.split(model, selected, ...)


def _flat(state: nnx.State) -> dict[str, jax.Array]:
    return {P.path_name(p): v[...] if isinstance(v, nnx.Variable) else v for p, v in nnx.to_flat_state(state)}


def _vmapped_grads(graphdef, selected, rest, chunk, spmd_axes, logits_chunk=0):
    """(losses [C], {name: per-example gradient [C, ...]}) of a chunk of examples (batch-dict arrays [C, S])."""
    def loss(sel, ex):
        return example_loss(nnx.merge(graphdef, sel, rest), ex, logits_chunk)

    losses, grads = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0), spmd_axis_name=spmd_axes)(
        selected, chunk)
    return losses, _flat(grads)


def _weighted_grad(graphdef, selected, rest, chunk, weights_c, logits_chunk=0):
    """(losses [C], {name: Σ_i w_i ∇loss_i}) of a chunk in one batched backward pass: the gradient of the
    weighted sum of the examples' losses equals the weighted sum of their gradients, at the cost of one
    forward+backward of the chunk (no per-example gradient ever exists)."""
    def weighted(sel):
        model = nnx.merge(graphdef, sel, rest)
        ce = batch_token_ce(model, chunk, logits_chunk)
        mask = chunk["loss_mask"].astype(jnp.float32)
        losses = jnp.sum(ce * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.sum(weights_c * losses), losses

    (_, losses), grad = jax.value_and_grad(weighted, has_aux=True)(selected)
    return losses, _flat(grad)


def _token_weighted_grad(graphdef, selected, rest, chunk, logits_chunk=0):
    """(each supervised token's loss [C, S], {name: Σ_t w_t ∇ce_t}) of a chunk of packed rows: with
    w_t = w_e / n_e (chunk["token_weight"], 0 off the supervised tokens) this is Σ_e w_e ∇loss_e over every
    example of the chunk, in one forward+backward of its rows."""
    def weighted(sel):
        ce = batch_token_ce(nnx.merge(graphdef, sel, rest), chunk, logits_chunk)
        return jnp.sum(chunk["token_weight"] * ce), ce * chunk["loss_mask"].astype(jnp.float32)

    (_, token_loss), grad = jax.value_and_grad(weighted, has_aux=True)(selected)
    return token_loss, _flat(grad)


def per_example_grads(model: nnx.Module, batch: Mapping[str, Any], names: Sequence[str] | None = None):
    """(losses [B], {name: gradient [B, ...]}) for every row of a batch dict, in one vmap (tests, bench).
    Materialises all B gradients: the stage never calls this, it reduces micro-chunks instead."""
    names = list(P.flatten(model)) if names is None else list(names)
    graphdef, selected, rest = split_model(model, names)
    chunk = {k: jnp.asarray(batch[k]) for k in batch_keys(is_vl(batch))}
    return jax.jit(lambda s, r, c: _vmapped_grads(graphdef, s, r, c, None))(selected, rest, chunk)


# --------------------------------------------------------------------------------------------------
# The compiled task function
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskResult:
    vector: np.ndarray  # float32 [d]: the reduced weighted mean gradient ([P] for full)
    losses: np.ndarray  # float32 [n]: per-example loss (mean over its supervised tokens)
    norms: np.ndarray | None  # float32 [n]: per-example gradient norm (selected parameters); None when batched
    tokens: np.ndarray  # float32 [n]: supervised tokens per example
    example_sketches: np.ndarray | None  # float32 [n, d_e]: reduced per-example gradients, when kept

    @property
    def n(self) -> int:
        return len(self.losses)


PER_EXAMPLE_CODE = {name: i for i, name in enumerate(PER_EXAMPLE)}


def _weights(mode, valid_c, norms_c, tokens_c):
    """Each example's weight in the task's sum; `mode` is traced (one compilation serves all three)."""
    unit = valid_c / jnp.maximum(norms_c, jnp.finfo(jnp.float32).tiny)
    return jnp.select([mode == 0, mode == 1], [valid_c, unit], valid_c * tokens_c)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about the compiled task function (hashable: jit caches on it, so a second
    TaskExtractor for the same model structure and options reuses the compilation)."""
    graphdef: Any
    layout: sk.Layout
    reduction: str
    example_reduction: str | None  # None: no per-example sketches
    dim: int
    stride: int
    seed: int
    mesh: jax.sharding.Mesh | None
    batch_axes: tuple[str, ...]
    grad_specs: tuple[PartitionSpec, ...] | None  # per selected tensor, in layout order
    param_specs: tuple[PartitionSpec, ...] | None  # the parameters' own (like_params), in layout order
    logits_chunk: int = 0  # positions per logits chunk in each example's loss
    batched: bool = False  # one gradient of the weighted loss per chunk (ExtractOptions.batched)
    packed: bool = False  # rows hold several examples; batch["token_weight"] weighs each token (ExtractOptions.packed)
    sketch_method: str = "scatter"  # how the sketch sums its buckets (sketch_method_for)

    def reduce(self, flat, reduction):
        return sk.reduce_flat(flat, self.layout, reduction, d=self.dim, s=self.stride, seed=self.seed,
                              method=self.sketch_method)

    def like_params(self, flat):
        """`flat` (parameter-shaped) constrained to the parameters' sharding. Left to XLA, the accumulator
        came out replicated: every chip held all P float32 coordinates (11 GB at Qwen2.5-3B), each chunk's
        gradient was all-reduced instead of reduce-scattered, and the reduction ran whole on every chip."""
        if self.param_specs is None:
            return flat
        return {k: jax.lax.with_sharding_constraint(flat[k], NamedSharding(self.mesh, spec))
                for k, spec in zip(self.layout.names, self.param_specs)}


def sketch_method_for(mesh, dim: int) -> str:
    """`matmul` on TPUs (a scatter there sorts its P elements first: ~2.4 s per task at Qwen2.5-3B on v5p-8 in
    XLA's cost model, against 0.1 s on the matrix units; docs/EXTRACT.md), `scatter` elsewhere: on CPU it is
    the reference (bit for bit what it always gave), on GPUs an atomic add."""
    on_tpu = mesh is not None and mesh.devices.flat[0].platform == "tpu"
    return "matmul" if on_tpu and dim % sk.MATMUL_LANES == 0 else "scatter"


def _task_impl(plan: _Plan, selected, rest, batch_ncs, valid_nc, mode):
    """Scans the task's micro-chunks: per-example gradients -> weighted sum, norms, sketches; then reduces
    the weighted mean once. batch_ncs: batch-dict arrays [n_chunks, C, S]; valid_nc: 1 for real examples.
    Chunks without a real example (padding to a common chunk count, so that tasks of different sizes share
    one compilation) are skipped by a lax.cond."""
    spmd = plan.batch_axes or None

    def body(carry, xs):
        return jax.lax.cond(jnp.any(xs[1] > 0), chunk_step, skip_chunk, carry, xs)

    def skip_chunk(carry, xs):
        chunk, valid_c = xs
        c = valid_c.shape[0]
        if plan.packed:
            return carry, {"token_loss": jnp.zeros(chunk["loss_mask"].shape, jnp.float32)}
        ys = {"loss": jnp.zeros((c,)), "norm": jnp.zeros((c,)), "tokens": jnp.zeros((c,))}
        if plan.example_reduction is not None:
            ys["sketch"] = jnp.zeros((c, sk.output_dim(plan.layout, plan.example_reduction, d=plan.dim,
                                                       s=plan.stride)))
        return carry, ys

    def batched_step(carry, xs):
        acc, wsum = carry
        chunk, valid_c = xs
        tokens_c = jnp.sum(chunk["loss_mask"].astype(jnp.float32), axis=1)
        w_c = _weights(mode, valid_c, jnp.ones_like(valid_c), tokens_c)  # mode is mean or tokens here
        losses_c, grad = _weighted_grad(plan.graphdef, selected, rest, chunk, w_c, plan.logits_chunk)
        acc = plan.like_params({k: acc[k] + grad[k].astype(jnp.float32) for k in plan.layout.names})
        ys = {"loss": losses_c, "norm": jnp.full_like(losses_c, jnp.nan), "tokens": tokens_c}
        return (acc, wsum + jnp.sum(w_c)), ys

    def packed_step(carry, xs):
        acc, wsum = carry
        chunk, _ = xs
        token_loss, grad = _token_weighted_grad(plan.graphdef, selected, rest, chunk, plan.logits_chunk)
        acc = plan.like_params({k: acc[k] + grad[k].astype(jnp.float32) for k in plan.layout.names})
        return (acc, wsum + jnp.sum(chunk["token_weight"])), {"token_loss": token_loss}

    def chunk_step(carry, xs):
        if plan.packed:
            return packed_step(carry, xs)
        if plan.batched:
            return batched_step(carry, xs)
        acc, wsum = carry
        chunk, valid_c = xs
        losses_c, grads = _vmapped_grads(plan.graphdef, selected, rest, chunk, spmd, plan.logits_chunk)
        if plan.grad_specs is not None:
            grads = {k: jax.lax.with_sharding_constraint(grads[k], NamedSharding(plan.mesh, spec))
                     for k, spec in zip(plan.layout.names, plan.grad_specs)}
        # Reductions over the example axis as contractions (XLA CPU reduces a leading axis ~20x slower than
        # it runs a matrix-vector product); HIGHEST: no reduced-precision (tf32/bf16) dots on accelerators.
        rows = {k: grads[k].astype(jnp.float32).reshape(grads[k].shape[0], -1) for k in plan.layout.names}
        sq_c = sum(jnp.sum(jnp.square(r), axis=1) for r in rows.values())
        norms_c = jnp.sqrt(sq_c)
        tokens_c = jnp.sum(chunk["loss_mask"].astype(jnp.float32), axis=1)
        w_c = _weights(mode, valid_c, norms_c, tokens_c)
        acc = plan.like_params({k: acc[k] + jnp.matmul(w_c, r, precision=_HIGHEST).reshape(acc[k].shape)
                                for k, r in rows.items()})
        ys = {"loss": losses_c, "norm": norms_c, "tokens": tokens_c}
        if plan.example_reduction is not None:
            ys["sketch"] = jax.vmap(lambda f: plan.reduce(f, plan.example_reduction))(grads)
        return (acc, wsum + jnp.sum(w_c)), ys

    acc0 = plan.like_params({n: jnp.zeros(s, jnp.float32) for n, s in zip(plan.layout.names, plan.layout.shapes)})
    (acc, wsum), ys = jax.lax.scan(body, (acc0, jnp.zeros((), jnp.float32)), (batch_ncs, valid_nc))
    mean = {k: v / wsum for k, v in acc.items()}
    vector = mean if plan.reduction == "full" else plan.reduce(mean, plan.reduction)
    return vector, ys


@functools.lru_cache(maxsize=None)
def _compiled_task_fn(compiler_options: tuple = ()):
    """The jitted task function (one per set of XLA compiler options; jit caches on the plan and shapes)."""
    return jax.jit(_task_impl, static_argnums=0, compiler_options=dict(compiler_options) or None)


class TaskExtractor:
    """Compiled per-task extraction for one model, parameter selection and options (see module docstring).

    `mesh`: the model's parameters already live on it (load_model(..., mesh=mesh)); examples are sharded
    over its data axes, so the micro-chunk is rounded up to a multiple of their size.
    `compiler_options`: XLA options for jax.jit (tests use {"xla_backend_optimization_level": 0}: faster
    CPU compilation)."""

    def __init__(self, model: nnx.Module, names: Sequence[str], options: ExtractOptions = ExtractOptions(),
                 mesh: jax.sharding.Mesh | None = None, compiler_options: Mapping[str, Any] | None = None):
        self.options, self.mesh = options, mesh
        self._fn = _compiled_task_fn(tuple(sorted((compiler_options or {}).items())))
        graphdef, self.selected, self.rest = split_model(model, names)
        self.layout = sk.Layout.of(_flat(self.selected))
        self.dim = sk.output_dim(self.layout, options.reduction, d=options.dim, s=options.stride)
        self.example_dim = sk.output_dim(self.layout, options.example_reduction, d=options.dim, s=options.stride)
        batch_axes: tuple[str, ...] = ()
        if mesh is not None:
            batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
        shards = math.prod(mesh.shape[a] for a in batch_axes) if mesh is not None else 1
        self.micro_chunk = -(-options.micro_chunk // shards) * shards
        if self.micro_chunk != options.micro_chunk:
            log.warning("extract.micro_chunk=%d rounded up to %d: a multiple of the %d data shards",
                        options.micro_chunk, self.micro_chunk, shards)
        self.batch_axes = batch_axes
        self.plan = _Plan(graphdef, self.layout, options.reduction,
                          options.example_reduction if options.keep_example_sketches else None,
                          options.dim, options.stride, options.seed, mesh, batch_axes,
                          self._grad_specs(model) if mesh is not None else None,
                          self._param_specs(model) if mesh is not None else None, options.logits_chunk,
                          options.batched, options.packed, sketch_method_for(mesh, options.dim))

    def _param_specs(self, model) -> tuple[PartitionSpec, ...]:
        shardings = P.shardings(model, self.mesh)
        return tuple(shardings[name].spec for name in self.layout.names)

    def _grad_specs(self, model) -> tuple[PartitionSpec, ...]:
        """Per-example gradient [C, ...]: examples over the batch axes, parameter dims over tp only (the
        fsdp axis already shards the examples)."""
        axes = P.logical_axes(model)
        out = []
        for name, shape in zip(self.layout.names, self.layout.shapes):
            spec = []
            for dim, logical in zip(shape, axes[name]):
                rule = LOGICAL_RULES.get(logical) if logical else None
                rule = (rule,) if isinstance(rule, str) else tuple(rule or ())
                tp = [a for a in rule if a == "tp" and self.mesh.shape[a] > 1 and dim % self.mesh.shape[a] == 0]
                spec.append(tp[0] if tp else None)
            out.append(PartitionSpec(self.batch_axes or None, *spec))
        return tuple(out)

    def _keys(self, batch) -> tuple[str, ...]:
        return tuple(batch_keys(is_vl(batch))) + (("token_weight",) if self.plan.packed else ())

    def _device_inputs(self, batch: Mapping[str, np.ndarray], chunks: int | None = None):
        n = int(np.shape(batch["input_ids"])[0])
        c = self.micro_chunk
        chunks = max(1, -(-n // c), chunks or 0)
        pad = chunks * c - n

        def lay(x, key):  # padding rows repeat the first (weight 0): every row stays a well-formed input
            x = np.asarray(x)
            fill = np.zeros_like(x[:1]) if key == "token_weight" else x[:1]
            x = np.concatenate([x, np.repeat(fill, pad, axis=0)]) if pad else x
            return x.reshape((chunks, c) + x.shape[1:])

        host = {k: lay(batch[k], k) for k in self._keys(batch)}
        valid = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]).reshape(chunks, c)
        mode = np.int32(PER_EXAMPLE_CODE[self.options.per_example])
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, host), jnp.asarray(valid), jnp.asarray(mode)

        def put(x):
            spec = PartitionSpec(*((None, self.batch_axes or None) + (None,) * (x.ndim - 2))[:x.ndim])
            return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda idx: x[idx])

        return jax.tree.map(put, host), put(valid), put(mode)

    def chunks_for(self, n: int) -> int:
        return max(1, -(-int(n) // self.micro_chunk))

    def _fake(self, n: int, seq_len: int) -> dict[str, np.ndarray]:
        keys = (*TEXT_KEYS, *(("token_weight",) if self.plan.packed else ()))
        return {k: np.zeros((n, seq_len), np.float32 if k in ("loss_mask", "token_weight") else np.int32)
                for k in keys}

    def lower(self, n: int, seq_len: int):
        """The lowered task function for n rows of seq_len tokens (for memory analysis)."""
        fake = self._fake(n, seq_len)
        with _mesh_context(self.mesh):
            return self._fn.lower(self.plan, self.selected, self.rest, *self._device_inputs(fake))

    def trace_jaxpr(self, n: int, seq_len: int):
        """The task function's jaxpr for n rows of seq_len tokens (to inspect intermediate shapes)."""
        fake = self._fake(n, seq_len)
        with _mesh_context(self.mesh):
            return jax.make_jaxpr(_task_impl, static_argnums=0)(self.plan, self.selected, self.rest,
                                                              *self._device_inputs(fake))

    def __call__(self, batch: Mapping[str, np.ndarray], task: str = "?", chunks: int | None = None) -> TaskResult:
        """Extracts one task from its calibration batch dict (arrays [n, S], one example per row; with
        `extract.pack`, packed rows carrying batch["example_index"]: data.packing.packed_batch).
        `chunks`: pad to at least this many micro-chunks (tasks of different sizes then share a compilation;
        the padding chunks are skipped at run time)."""
        for k in (*batch_keys(is_vl(batch)), *(("example_index",) if self.plan.packed else ())):
            if k not in batch:
                raise ValueError(f"task {task!r}: the batch dict has no {k!r}")
        if self.plan.packed:
            return self._packed_call(batch, task, chunks)
        n = int(np.shape(batch["input_ids"])[0])
        if n == 0:
            raise ValueError(f"task {task!r}: no calibration example")
        empty = np.flatnonzero(np.asarray(batch["loss_mask"]).sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"task {task!r}: calibration example(s) {empty[:5].tolist()} have no supervised "
                             "token: their loss and gradient are undefined")
        with _mesh_context(self.mesh):
            vector, ys = self._fn(self.plan, self.selected, self.rest, *self._device_inputs(batch, chunks))
        ys = {k: np.asarray(to_host(v)) for k, v in ys.items()}
        take = lambda x: x.reshape((-1,) + x.shape[2:])[:n]
        if self.options.reduction == "full":
            vector = np.concatenate([np.asarray(to_host(vector[k])).ravel() for k in self.layout.names])
        result = TaskResult(np.asarray(to_host(vector), np.float32), take(ys["loss"]),
                            None if self.plan.batched else take(ys["norm"]), take(ys["tokens"]),
                            take(ys["sketch"]) if "sketch" in ys else None)
        check_result(result, task, self.options.per_example)
        return result


    def _packed_call(self, batch: Mapping[str, np.ndarray], task: str, chunks: int | None) -> TaskResult:
        """The packed path: per-token weights w_e / n_e from batch["example_index"], per-example losses
        summed back from the tokens' losses on the host."""
        index = np.asarray(batch["example_index"])
        supervised = (np.asarray(batch["loss_mask"]) > 0) & (index >= 0)
        n = int(index.max()) + 1 if index.size and index.max() >= 0 else 0
        if n == 0:
            raise ValueError(f"task {task!r}: no calibration example")
        tokens = np.bincount(index[supervised], minlength=n).astype(np.float32)
        empty = np.flatnonzero(tokens == 0)
        if empty.size:
            raise ValueError(f"task {task!r}: calibration example(s) {empty[:5].tolist()} have no supervised "
                             "token: their loss and gradient are undefined")
        weight = np.ones(n, np.float32) if self.options.per_example == "mean" else tokens
        per_token = (weight / tokens)[np.maximum(index, 0)]
        batch = {**batch, "token_weight": np.where(supervised, per_token, 0.0).astype(np.float32)}
        with _mesh_context(self.mesh):
            vector, ys = self._fn(self.plan, self.selected, self.rest, *self._device_inputs(batch, chunks))
        rows = index.shape[0]
        token_loss = np.asarray(to_host(ys["token_loss"])).reshape((-1,) + index.shape[1:])[:rows]
        losses = np.bincount(index[supervised], weights=token_loss[supervised], minlength=n) / tokens
        if self.options.reduction == "full":
            vector = np.concatenate([np.asarray(to_host(vector[k])).ravel() for k in self.layout.names])
        result = TaskResult(np.asarray(to_host(vector), np.float32), losses.astype(np.float32), None, tokens, None)
        check_result(result, task, self.options.per_example)
        return result


def _mesh_context(mesh):
    import contextlib
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()




def check_result(result: TaskResult, task: str, per_example: str = "mean") -> None:
    """Clear errors for gradients that cannot give a direction: NaN/inf anywhere, or all zeros."""
    norms = result.norms if result.norms is not None else np.ones_like(result.losses)  # batched: no norms
    bad = np.flatnonzero(~np.isfinite(norms) | ~np.isfinite(result.losses))
    if bad.size:
        raise FloatingPointError(f"task {task!r}: calibration example(s) {bad[:5].tolist()} give a NaN/inf "
                                 f"loss or gradient (losses {result.losses[bad[:5]].tolist()})")
    zero = np.flatnonzero(norms == 0)
    if zero.size and per_example == "unit":
        raise FloatingPointError(f"task {task!r}: calibration example(s) {zero[:5].tolist()} have a zero "
                                 "gradient, which extract.per_example=unit cannot normalise")
    if zero.size:
        log.warning("task %r: %d calibration example(s) have a zero gradient", task, zero.size)
    if not np.isfinite(result.vector).all():
        raise FloatingPointError(f"task {task!r}: its mean gradient holds NaN/inf")
    if not np.any(result.vector):
        raise FloatingPointError(f"task {task!r}: its mean gradient is all zeros over the selected parameters "
                                 "(check extract.include/exclude and the calibration data)")


# --------------------------------------------------------------------------------------------------
# The calibration-stability curve
# --------------------------------------------------------------------------------------------------

def stability_curve(per_task_cosines: Mapping[str, Mapping[int, np.ndarray]],
                    sizes: Sequence[int] = STABILITY_SIZES) -> dict[str, Any]:
    """Aggregates {task: {m: cosines of draws}} to mean ± std per m over all tasks and draws."""
    curve = {"m": [], "mean": [], "std": [], "tasks": [], "draws": []}
    for m in sizes:
        vals = [np.asarray(c[m]) for c in per_task_cosines.values() if m in c]
        if not vals:
            continue
        allv = np.concatenate(vals)
        curve["m"].append(int(m))
        curve["mean"].append(float(allv.mean()))
        curve["std"].append(float(allv.std()))
        curve["tasks"].append(len(vals))
        curve["draws"].append(int(allv.size))
    return curve


def task_stability(result: TaskResult, per_example: str, sizes: Sequence[int], draws: int,
                   seed: int, task: str, reference: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """{m: cosines [draws]} for the m in `sizes` with m <= n, from the task's per-example sketches, against
    `reference` (the weighted mean gradient of examples disjoint from the calibration ones, in the sketches'
    space) or, without one, against the mean of all n calibration examples."""
    if result.example_sketches is None:
        return {}
    w = sk.example_weights(per_example, result.norms, result.tokens)
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little")])
    return {int(m): sk.stability_cosines(result.example_sketches, w, int(m), draws, rng, reference)
            for m in sizes if m <= result.n}


def stability_protocol(records: Sequence[Mapping[str, Any]], disjoint: bool) -> dict[str, Any]:
    """What the stability cosines compare against, for stability.json and the report."""
    if disjoint:
        sizes = [int(r["stability_reference"]) for r in records if r.get("stability_reference")]
        return {"protocol": "disjoint", "reference": "weighted mean gradient of training examples held apart from "
                "the calibration ones (extract.stability_reference per task, fewer where a task has fewer; tasks "
                "with none are left out of the curve)",
                "reference_examples": {"tasks": len(sizes), "min": min(sizes, default=0),
                                       "max": max(sizes, default=0)}}
    return {"protocol": "self", "reference": "weighted mean of all n calibration examples of the task (contains "
            "the subset, so it reads high; m = n gives 1 by construction)", "reference_examples": None}


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def seq_bucket(length: int, minimum: int = 32) -> int:
    """Padded sequence length for a task: the next of 32, 48, 64, 96, 128, ... (<= 1.5x padding, and
    few distinct lengths, so few compilations)."""
    b = minimum
    while b < length:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def check_calibration(task: str, examples: Sequence[Any], vocab_size: int, what: str = "calibration example") -> None:
    """Clear errors before any compute: no calibration example, an example without a supervised token,
    a token id the model cannot embed."""
    if not examples:
        raise ValueError(f"task {task!r}: no calibration example; every task needs at least one "
                         "(check the task's records and data.max_len / data.truncation)")
    for i, ex in enumerate(examples):
        if not np.any(ex.loss_mask):
            raise ValueError(f"task {task!r}: {what} {i} has no supervised token")
        top = int(np.max(ex.input_ids))
        if top >= vocab_size:
            raise ValueError(f"task {task!r}: {what} {i} holds token id {top} >= the model's "
                             f"vocab_size {vocab_size} (tokenizer and θ⁰ do not match)")
