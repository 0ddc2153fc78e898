"""The pure training step on the (data, fsdp, tp) mesh.

The model is split once into (graphdef, parameters) (`SplitModel`); parameters travel as the flat dict
{"model/layers/0/self_attn/q_proj/kernel": array} (the checkpoint currency) inside a state
{"params", "opt_state", "step", "rng"} that one `jax.jit` (explicit in/out shardings, donated state) maps to the
next state. The loss of a step is the summed cross-entropy over the supervised tokens of the *global* batch
divided by their number, whatever the micro-batching.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from merit_jax.config import TrainSettings
from merit_jax.models import params as P
from merit_jax.models.inputs import batch_keys, batch_token_ce
from merit_jax.sharding import batch_sharding
from merit_jax.training.optim import frozen_names, make_optimizer, make_schedule


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
