"""The programs a run compiles (branch train step, extraction step, held-out eval step), built from the
project's own step functions on abstract inputs, compiled for a mesh, and measured (merit_jax.plan).

    model = abstract_model(hf_config, settings, mesh)   # parameters as ShapeDtypeStructs in their shards
    fn, args = train_step(model, settings, mesh, images=None)
    program = measure(fn, args, mesh, chips=4, hbm_bytes=..., peak_flops=..., ...)   # Program: bytes, flops, ...

No weights and no accelerator: every input is a jax.ShapeDtypeStruct carrying the sharding the run gives it,
so `jit(...).trace(...).lower().compile()` yields the same executable the run compiles (and, for a TPU
topology, libtpu's compile-only devices stand in for the chips).

Counting: XLA's cost model counts the body of a loop once, whatever its trip count, and the steps hold
loops (the logits chunks of the loss, gradient accumulation, the extraction's micro-chunks). The jaxpr knows
the trip counts: `loop_factor` is its matmul flops with every scan counted `length` times over the same
count with each body once, and the plan scales XLA's flops and roofline time by it. Loops XLA adds itself
are avoided in a second compile for the cost (NO_XLA_LOOPS).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from merit_jax.config import DataSettings, ExtractSettings, TrainSettings
from merit_jax.models import params as P
from merit_jax.models.inputs import batch_keys
from merit_jax.sharding import batch_sharding
from merit_jax.training.heldout import jit_eval_step
from merit_jax.training.step import SplitModel, build_step_functions

PROGRAMS = ("train_step", "extract_step", "fwd_bwd_step", "eval_step")


class PlanError(ValueError):
    """The config cannot be planned (or does not fit): the message names the keys to change."""


class _Abstract(jax.ShapeDtypeStruct):
    """A ShapeDtypeStruct that reads as itself through `variable[...]`: the extractor's setup reads its
    parameters that way (to learn their shapes), and an abstract model has no values to read."""

    __slots__ = ()

    def __getitem__(self, index):
        if index is Ellipsis:
            return self
        raise TypeError(f"an abstract parameter {self.shape} has no values to index with {index!r}")


def abstract_model(hf_config: dict, s: TrainSettings, mesh: Mesh, source: str = "config.json") -> nnx.Module:
    """The model of a HF config (nnx.eval_shape: no weights), each parameter a ShapeDtypeStruct with its
    sharding on `mesh` (as load_model places the weights)."""
    from merit_jax.models.registry import model_factory

    make = model_factory(hf_config, source, dtype=s.param_dtype, compute_dtype=s.compute_dtype, remat=s.remat,
                         attention=s.attention, scan_layers=s.scan_layers, max_segments=s.max_segments)
    graphdef, state = nnx.split(nnx.eval_shape(make))
    shard_of = P.shardings(state, mesh)
    state = nnx.map_state(lambda path, v: v.replace(_Abstract(v.shape, v.dtype, sharding=shard_of[P.path_name(path)])),
                          state)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------ inputs


def _struct(shape, dtype, mesh: Mesh, lead: tuple = ()) -> jax.ShapeDtypeStruct:
    """An input array sharded as the stages shard it: rows over (data, fsdp), after `lead` unsharded axes."""
    spec = PartitionSpec(*lead, ("data", "fsdp"), *([None] * (len(shape) - len(lead) - 1)))
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def image_budget(data: DataSettings, vl_config, seq_len: int, images_per_row: int | None = None) -> dict[str, Any]:
    """The per-row image arrays of rows filled with the config's largest images (data.image_max_pixels):
    `images_per_row` of them, or as many as fit seq_len tokens, sized by the project's own layout code (the
    largest arrays a run of this config can meet: a row holds at most 4 x seq_len patches).
    Returns {"arrays": {key: (shape without the row axis, dtype)}, "grid", "images", "tokens_per_image"}."""
    from merit_jax.data.vision import image_grid, processor_for
    from merit_jax.models.inputs import layout_keys
    from merit_jax.models.vision_layout import layout_sizes, stacked_layouts

    vision = vl_config.vision
    processor = processor_for(data)
    side = math.isqrt(int(processor.size["longest_edge"]))
    grid = image_grid(processor, side, side)
    tokens = grid[0] * grid[1] * grid[2] // vision.merge_unit
    n = images_per_row or seq_len // tokens
    if n < 1:
        raise PlanError(f"an image of the largest size data.image_max_pixels allows ({side}x{side} px) takes {tokens} "
                        f"tokens, more than a row of {seq_len}: lower data.image_max_pixels")
    grids = np.array([grid] * n, np.int64)
    sizes = layout_sizes([grids], vision)
    arrays = {k: (v.shape[1:], v.dtype) for k, v in layout_keys(stacked_layouts([grids], vision, sizes)).items()}
    arrays["pixel_values"] = ((sizes.num_patches, vision.patch_dim), np.float32)
    arrays["mrope_positions"] = ((3, seq_len), np.int32)
    return {"arrays": arrays, "grid": tuple(int(g) for g in grid), "images": n, "tokens_per_image": int(tokens)}


def batch_structs(mesh: Mesh, rows: int, seq_len: int, images: dict | None, lead: tuple = ()) -> dict:
    """ShapeDtypeStructs of a batch dict [*lead, rows, ...] (text keys, and the VL keys of `images`)."""
    out = {}
    for k in batch_keys(images is not None):
        if images is not None and k in images["arrays"]:
            shape, dtype = images["arrays"][k]
        else:
            shape, dtype = (seq_len,), np.float32 if k == "loss_mask" else np.int32
        out[k] = _struct((*lead, rows, *shape), dtype, mesh, tuple(None for _ in lead))
    return out


# ------------------------------------------------------------------------------------------ programs


def train_step(model: nnx.Module, s: TrainSettings, mesh: Mesh, images):
    """(jitted train step, its abstract (state, batch)): build_step_functions, as train_model runs it."""
    split = SplitModel(model)
    fns = build_step_functions(split, s, num_steps=1000, mesh=mesh)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), fns.abstract_state,
                         fns.state_shardings)
    return fns.train_step, (state, batch_structs(mesh, s.batch_size, s.seq_len, images))


def eval_step(model: nnx.Module, s: TrainSettings, mesh: Mesh, images, num_tasks: int):
    """(jitted held-out eval step, its abstract (params, batch)): what HeldoutEval runs during training."""
    split = SplitModel(model)
    shardings = split.shardings(mesh)
    params = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
              for k, (shape, dtype) in P.specs(split.abstract).items()}
    rows = s.eval_batch_size or s.batch_size
    batch = batch_structs(mesh, rows, s.seq_len, images)
    batch["task_id"] = jax.ShapeDtypeStruct((rows,), np.int32, sharding=batch_sharding(mesh, 1))
    step = jit_eval_step(split, max(num_tasks, 1), mesh, shardings, images is not None,
                         dict(s.xla_options), s.logits_chunk)
    return step, (params, batch)


PACK_FILL = 0.95  # first fit's fill of a row (data.packing.first_fit; ~95 % on the synthetic mixture)


def extract_step(e: ExtractSettings, max_len: int, model: nnx.Module, mesh: Mesh, images, example_tokens: int = 0):
    """(the extraction's jitted task function, its abstract arguments) for one task of extract.n_calib
    examples at the longest sequence bucket: TaskExtractor's own compiled function and plan. With
    extract.pack, the task's rows are its examples' tokens (`example_tokens` each; 0: a whole bucket) over
    PACK_FILL of a row."""
    from merit_jax import gradients as extract
    options = e.options
    names = extract.select_params(list(P.specs(model)), list(e.include), list(e.exclude))
    ex = extract.TaskExtractor(model, names, options, mesh=mesh, compiler_options=dict(e.xla_options))
    seq = extract.seq_bucket(int(max_len))
    rows = int(e.n_calib)
    if options.packed and example_tokens:
        rows = min(rows, math.ceil(rows * min(int(example_tokens), seq) / (PACK_FILL * seq)))
    chunks = ex.chunks_for(rows)
    batch = batch_structs(mesh, ex.micro_chunk, seq, images, lead=(chunks,))
    if options.packed:
        batch["token_weight"] = _struct((chunks, ex.micro_chunk, seq), np.float32, mesh, (None,))
    valid = _struct((chunks, ex.micro_chunk), np.float32, mesh, (None,))
    mode = jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return ex._fn, (ex.plan, ex.selected, ex.rest, batch, valid, mode), ex


def fwd_bwd_step(e: ExtractSettings, max_len: int, model: nnx.Module, mesh: Mesh, images):
    """(a plain forward+backward, its abstract (selected, rest, batch)): the gradient of the mean token loss
    of one extraction micro-chunk (the same rows per chip, sequence bucket and images) w.r.t. the parameters
    the extraction differentiates, sharded as in training; no optimizer, no accumulation, no reduction. The
    yardstick of the extraction step: its per-chip bytes, and its flops and roofline times the chunk count."""
    from merit_jax import gradients as extract
    from merit_jax.models.inputs import batch_token_ce

    names = extract.select_params(list(P.specs(model)), list(e.include), list(e.exclude))
    ex = extract.TaskExtractor(model, names, e.options, mesh=mesh)
    graphdef, logits_chunk = ex.plan.graphdef, ex.options.logits_chunk

    def step(selected, rest, batch):
        def loss(sel):
            ce = batch_token_ce(nnx.merge(graphdef, sel, rest), batch, logits_chunk)
            mask = batch["loss_mask"].astype(jnp.float32)
            return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return jax.value_and_grad(loss)(selected)

    # the gradient leaves sharded like the parameters, as a training step's gradient (left to XLA, it came out
    # replicated: 4x the bytes on v5p-8)
    grads = jax.tree.map(lambda v: v.sharding, ex.selected)
    fn = jax.jit(step, out_shardings=(NamedSharding(mesh, PartitionSpec()), grads),
                 compiler_options=dict(e.xla_options) or None)
    batch = batch_structs(mesh, ex.micro_chunk, extract.seq_bucket(int(max_len)), images)
    return fn, (ex.selected, ex.rest, batch), ex


# ------------------------------------------------------------------------------------------ measuring


@dataclasses.dataclass
class Program:
    """One compiled program's numbers, per chip (= per device) unless named otherwise."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written over donated arguments (the train state)
    temp_bytes: int
    total_bytes: int  # argument + output - alias + temp
    fits: bool | None  # total_bytes <= the chip's HBM (None: no limit known, e.g. cpu)
    flops: float  # per chip, loops counted
    roofline_s: float | None  # XLA's cost model (optimal_seconds) with loops counted: a bound, not a timing
    tokens: int  # per step, global
    model_flops: float  # per step, global: 6 N T (+ attention) for training, 2 N T to evaluate
    mfu_bound: float | None  # model_flops / (roofline_s * chips * peak bf16 flops per chip)
    compile_s: float  # trace + lower + compile on this machine (wall clock)
    loop_factor: float  # matmul flops with loop trip counts / with each loop body once
    rows_per_chip: float  # rows each chip processes at once (micro-batch, micro-chunk)
    error: str = ""  # the compiler's own refusal (e.g. out of HBM), when it refused
    roofline_from: str = ""  # "xla" (optimal_seconds) | "flops/bytes" (where XLA gives none)
    kernel_flops: float = 0.0  # per chip, in Pallas kernels (splash attention), counted at peak in roofline_s
    cost_compile_s: float = 0.0  # the second compile for the cost, if any (NO_XLA_LOOPS, NO_SPARSECORE_SCATTER)
    uncosted_ops: int = 0  # instructions XLA's cost model could not cost (see uncosted_ops)
    compile_cpu_s: float = 0.0  # CPU seconds of this process (all threads) over compile_s: steadier under load


def dot_flops(jaxpr, loops: bool = True) -> float:
    """Matmul flops of a jaxpr (global shapes): 2 * output size * contracted size per dot_general, scans
    `length` times (once with loops=False), the larger branch of a cond, through every nested jaxpr."""
    from jax.extend import core as jcore

    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
            continue
        subs = [x.jaxpr if isinstance(x, jcore.ClosedJaxpr) else x
                for v in eqn.params.values() for x in (v if isinstance(v, (tuple, list)) else (v,))
                if isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr))]
        if not subs or eqn.primitive.name == "pallas_call":  # a kernel's body is one block: see kernel_flops
            continue
        if eqn.primitive.name == "cond":
            total += max(dot_flops(j, loops) for j in subs)
            continue
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" and loops else 1
        total += times * sum(dot_flops(j, loops) for j in subs)
    return total


# XLA's TPU compiler writes its cost model's estimate of every scheduled instruction into the optimized HLO
# (backend_config "estimated_cycles"); one it cannot cost (a scatter offloaded to the v5p's SparseCores) gets
# INT64_MAX, and the program's optimal_seconds then is a negative sentinel, or, with few of them, too small.
_UNCOSTED = re.compile(r'"estimated_cycles":"%d"' % (2 ** 63 - 1))

NO_SPARSECORE_SCATTER = {"xla_tpu_enable_offloading_scatter_to_sparsecore": False}


def uncosted_ops(hlo_text: str) -> int:
    """How many instructions of an optimized TPU HLO module (compiled.as_text()) XLA's cost model left
    uncosted."""
    return len(_UNCOSTED.findall(hlo_text))


_SIZE = re.compile(r"([\d.]+)([KMGT])")  # "50.14G" in the TPU compiler's out-of-memory messages


def shard_bytes(args) -> int:
    """Bytes per device of the arrays among `args` (ShapeDtypeStructs with shardings)."""
    total = 0
    for x in jax.tree.leaves(args):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


# XLA's TPU compiler splits a matmul whose operand is all-gathered (reduce-scattered) over 8+ chips into a loop
# over the shards (windowed einsum), and its cost model then counts one shard's matmul. The cost is read from
# a second compile of the same program without those loops; memory always from the program the run compiles.
NO_XLA_LOOPS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def measure(fn: Callable, args: tuple, mesh: Mesh, *, chips: int, hbm_bytes: int | None, peak_flops: float | None,
            hbm_bytes_per_s: float | None, tokens: int, model_flops: float, rows_per_chip: float,
            kernel_flops: float = 0.0) -> Program:
    """Traces, lowers and compiles `fn(*args)` under `mesh` and reads XLA's memory and cost analyses.

    The roofline time is XLA's `optimal_seconds` with the program's own loops counted (loop_factor: right
    where a loop's body and what runs outside the loops cost about the same time per matmul flop); where
    XLA added loops (its flops fall short of the program's matmuls) it comes from a compile without them
    (NO_XLA_LOOPS); where the cost model could not cost some instruction (uncosted_ops: a scatter offloaded
    to the v5p's SparseCores), from a compile with the scatters on the TensorCores (NO_SPARSECORE_SCATTER);
    where it still gives none, max(flops / peak, bytes accessed / HBM bandwidth), marked "flops/bytes".
    `kernel_flops` (global) are done by Pallas kernels, which XLA's cost model does not see (splash
    attention): they are added to the flops, and to the roofline time at the chips' peak."""
    start, cpu_start = time.perf_counter(), time.process_time()
    # Traced under the mesh's abstract form: the shardings are the run's, but nothing is placed on the devices
    # while tracing (a compile-only TPU device holds no constant, e.g. splash attention's mask tables).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        traced = fn.trace(*args)
        once = dot_flops(traced.jaxpr.jaxpr, loops=False)
        factor = dot_flops(traced.jaxpr.jaxpr) / once if once else 1.0
        lowered = traced.lower()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            refused = _refusal(e, args)
            return Program(*refused, False, 0.0, None, tokens, model_flops, None, time.perf_counter() - start,
                           factor, rows_per_chip, error=str(e).splitlines()[0])
        compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        costed, cost_compile_s = compiled, 0.0
        if peak_flops and _cost(compiled).get("flops", 0.0) < 0.95 * once / chips:
            tick = time.perf_counter()
            costed = lowered.compile(compiler_options=NO_XLA_LOOPS)
            cost_compile_s = time.perf_counter() - tick
        uncosted = uncosted_ops(costed.as_text()) if peak_flops else 0
        if uncosted:  # the cost of the same program with its scatters on the TensorCores, which the model costs
            tick = time.perf_counter()
            options = NO_SPARSECORE_SCATTER | (NO_XLA_LOOPS if cost_compile_s else {})
            costed = lowered.compile(compiler_options=options)
            cost_compile_s += time.perf_counter() - tick
            uncosted = uncosted_ops(costed.as_text())
    cost = _cost(costed)
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    optimal = cost.get("optimal_seconds")
    if optimal and optimal > 0 and not uncosted:
        roofline, source = float(optimal) * factor, "xla"
    elif peak_flops and hbm_bytes_per_s:
        roofline = factor * max(cost.get("flops", 0.0) / peak_flops, cost.get("bytes accessed", 0.0) / hbm_bytes_per_s)
        source = "flops/bytes"
    else:
        roofline, source = None, ""
    kernel = kernel_flops / chips
    if roofline is not None and peak_flops:
        roofline += kernel / peak_flops
    mfu = model_flops / (roofline * chips * peak_flops) if roofline and peak_flops else None
    return Program(int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes),
                   int(mem.temp_size_in_bytes), int(total), None if hbm_bytes is None else total <= hbm_bytes,
                   float(cost.get("flops", 0.0)) * factor + kernel, roofline, tokens, model_flops, mfu, compile_s,
                   factor, rows_per_chip, roofline_from=source, kernel_flops=kernel, cost_compile_s=cost_compile_s,
                   uncosted_ops=uncosted, compile_cpu_s=compile_cpu_s)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis() or {}
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def _refusal(error, args) -> tuple[int, int, int, int, int]:
    """(argument, output, alias, temp, total) bytes of a program the TPU compiler refused for overflowing HBM
    ("... HLO temporaries (50.14G) exceeds available HBM (15.75G)"); re-raises any other compile error."""
    message = str(error).splitlines()[0]
    sizes = _SIZE.findall(message.partition("RESOURCE_EXHAUSTED")[2])
    if "RESOURCE_EXHAUSTED" not in message or not sizes:
        raise error
    temp = int(float(sizes[0][0]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[sizes[0][1]])
    args_bytes = shard_bytes(args)
    return args_bytes, 0, 0, temp, args_bytes + temp


# ------------------------------------------------------------------------------------------ model flops


def flop_model(model: nnx.Module, s: TrainSettings) -> dict[str, Any]:
    """Parameter counts that multiply activations: the language side (an untied input embedding is a
    lookup, not a matmul), the vision blocks (per patch) and the patch merger (per merged unit)."""
    text = model.config
    counts = {"language": 0, "vision": 0, "merger": 0}
    for name, (shape, _) in P.specs(model).items():
        n = math.prod(shape)
        if name.startswith("visual/merger/"):
            counts["merger"] += n
        elif name.startswith("visual/"):
            counts["vision"] += n
        elif not (name.endswith("embed_tokens/embedding") and not text.tie_word_embeddings):
            counts["language"] += n
    visual = [n for n in P.specs(model) if n.startswith("visual/")]
    counts["vision_trained"] = any(not any(re.search(rx, n) for rx in s.freeze) for n in visual)
    counts["attention"] = text.num_layers * text.num_heads * text.head_dim  # per token and key position
    return counts


def attention_flops(counts: dict, kind: str, rows: int, seq_len: int) -> float:
    """The language model's causal attention over rows x seq_len tokens: scores and values, 4 L H Dh S per
    token forward, half of it under the causal mask; x3 with the backward pass."""
    return float((2 if kind == "eval" else 6) * counts["attention"] * seq_len * rows * seq_len)


def model_flops(counts: dict, kind: str, rows: int, seq_len: int, images: dict | None, vl_config=None,
                vision_grads: bool = False) -> float:
    """Useful flops of one step over rows x seq_len tokens: mult * N per token for the language matmuls
    (6: forward + backward, 2: forward only), mult * L * H * Dh * S per token for causal attention (half
    the T x S scores), and per image mult' * N_vision per patch (+ its attention inside frames and windows),
    mult' = 6 when the vision tower gets gradients, else 2 (frozen, or extraction of the language side)."""
    mult = 2 if kind == "eval" else 6
    tokens = rows * seq_len
    flops = mult * counts["language"] * tokens + attention_flops(counts, kind, rows, seq_len)
    if images is not None:
        v = vl_config.vision
        t, h, w = images["grid"]
        patches = t * h * w
        vmult = 6 if vision_grads else 2
        window = min(v.window_units ** 2 * v.merge_unit, h * w)
        seg = sum(h * w if i in v.fullatt_block_indexes else window for i in range(v.depth))
        per_image = vmult * (counts["vision"] * patches + counts["merger"] * patches // v.merge_unit)
        per_image += 2 * vmult * v.hidden_size * patches * seg
        flops += rows * images["images"] * per_image
    return float(flops)
