"""The trainer in one process: the sharded step against one device, mixed precision, the optimizer pieces, the
basin and train stages on the synthetic mixture (learning, isolation of a branch, skip when done), and the
config errors raised before any compute."""

import dataclasses
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax import config
from merit_jax.io import checkpoint
from merit_jax.config import data_settings
from merit_jax.stages import theta0_of
from merit_jax import artifacts as wd
from merit_jax.config import DEFAULT_NO_DECAY, TrainSettings
from merit_jax.errors import ConfigError
from merit_jax.stages import basin, train
from merit_jax.training.feed import to_global
from merit_jax.training.optim import decay_mask, make_optimizer, make_schedule
from merit_jax.training.step import SplitModel, build_step_functions
from merit_jax.models.registry import model_factory
from merit_jax.io.load import read_config
from merit_jax.sharding import make_mesh
from tests.test_train_utils import (BRANCH_TASKS, FAST_COMPILE, OTHER_TASKS, final_params, make_config,
                                    random_params, tiny_hf_config, write_partition)

# Sharded vs one device, fp32, 2 AdamW steps at lr 1e-2. The all-reduces sum in another order, so losses and
# gradient norms agree to ~1e-7 relative. Adam then divides each coordinate by its own gradient scale: where a
# coordinate's gradient nearly cancels (or is exactly 0 up to rounding, like the key bias: softmax ignores a
# shift shared by all keys) its tiny absolute error becomes a visible relative one, so parameters agree to a few
# 1e-6 (observed max ~3e-6), i.e. 0.03% of one step of size lr. Bound: 0.1% of a step.
LOSS_RTOL, PARAM_ATOL = 1e-6, 1e-5
B, S, VOCAB = 16, 32, 128


def _batches(n, seed=0):
    """Packed-looking batch dicts: two segments per row, then padding; loss on the second half of each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = {k: np.zeros((B, S), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
        b["loss_mask"] = np.zeros((B, S), np.float32)
        for r in range(B):
            a, c = rng.integers(4, S // 2, 2)
            for seg, (lo, hi) in enumerate([(0, a), (a, a + c)], 1):
                ids = rng.integers(1, VOCAB, hi - lo)
                b["input_ids"][r, lo:hi] = ids
                b["targets"][r, lo:hi - 1] = ids[1:]
                b["segment_ids"][r, lo:hi] = seg
                b["positions"][r, lo:hi] = np.arange(hi - lo)
                b["loss_mask"][r, lo + (hi - lo) // 2:hi - 1] = 1.0
        out.append(b)
    return out


def _run_steps(mesh, settings, batches, remat="none"):
    """Losses and final parameters of len(batches) train steps on `mesh`, from the same random start."""
    hf = tiny_hf_config(VOCAB)
    make = model_factory(hf, dtype=settings.param_dtype, compute_dtype=settings.compute_dtype, remat=remat)
    model = SplitModel(nnx.eval_shape(make))
    fns = build_step_functions(model, settings, num_steps=10, mesh=mesh)
    params = {k: jax.device_put(v, fns.param_shardings[k]) for k, v in random_params(hf, seed=1).items()}
    losses = []
    with jax.set_mesh(mesh):
        state = fns.init_state(params)
        for batch in batches:
            state, metrics = fns.train_step(state, to_global(batch, mesh, B))
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return np.array(losses), state


BATCHES = _batches(1) * 2


@pytest.fixture(scope="module")
def single_device_run():
    s = TrainSettings(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, batch_size=B, seq_len=S,
                      xla_options=tuple(FAST_COMPILE.items()))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    losses, state = _run_steps(mesh, s, BATCHES)
    return s, losses, jax.device_get(state["params"])


@pytest.mark.parametrize("axes,accum,remat", [
    ((1, 4, 2), 1, "none"),  # fsdp x tp
    ((2, 4, 1), 2, "full"),  # data x fsdp, 2 micro-batches, rematerialised blocks
], ids=["fsdp4xtp2", "data2xfsdp4-accum2-remat"])
def test_sharded_step_equals_single_device(single_device_run, axes, accum, remat):
    s, want_losses, want = single_device_run
    mesh = make_mesh(*axes)
    losses, state = _run_steps(mesh, dataclasses.replace(s, grad_accum=accum), BATCHES, remat)
    np.testing.assert_allclose(losses, want_losses, rtol=LOSS_RTOL)  # loss and gradient norm of each step
    assert losses[1, 0] < losses[0, 0]  # the first update helped (both steps see the same batch)
    sharded = [n for n, x in state["params"].items() if len(x.sharding.device_set) > 1 and not
               x.sharding.is_fully_replicated]
    assert len(sharded) >= 5, "the parameters should be sharded on this mesh"
    mu = state["opt_state"][1][0].mu  # clip -> adamw chain: Adam's first moment shares each parameter's sharding
    assert all(mu[n].sharding == state["params"][n].sharding for n in mu)
    got = jax.device_get(state["params"])
    print(f"{axes}: max |sharded - single| = {max(float(np.abs(got[n] - want[n]).max()) for n in want):.2e}")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=PARAM_ATOL, err_msg=name)


def test_frozen_parameters_stay_put_with_accumulation_and_sharding(single_device_run):
    """train.freeze: frozen tensors keep their start values bit for bit; the rest trains, and the sharded,
    accumulated step equals the one-device step (frozen gradients are never computed or accumulated)."""
    s = dataclasses.replace(single_device_run[0], freeze=(r"layers/0/",))
    one_losses, one = _run_steps(make_mesh(1, 1, 1, devices=jax.devices()[:1]), s, BATCHES)
    acc_losses, acc = _run_steps(make_mesh(2, 4, 1), dataclasses.replace(s, grad_accum=2), BATCHES)
    start = random_params(tiny_hf_config(VOCAB), seed=1)
    one, acc = jax.device_get(one["params"]), jax.device_get(acc["params"])
    frozen = [n for n in start if "layers/0/" in n]
    assert frozen and all(np.array_equal(one[n], start[n]) and np.array_equal(acc[n], start[n]) for n in frozen)
    assert all(not np.array_equal(one[n], start[n]) for n in start if n not in frozen and "kernel" in n)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=LOSS_RTOL)
    for name in one:
        np.testing.assert_allclose(acc[name], one[name], rtol=0, atol=PARAM_ATOL, err_msg=name)


def test_bf16_compute_keeps_fp32_master_weights_and_optimizer_state(single_device_run):
    s, want_losses, _ = single_device_run
    bf16 = dataclasses.replace(s, compute_dtype="bfloat16")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    losses, state = _run_steps(mesh, bf16, BATCHES)
    assert all(x.dtype == jnp.float32 for x in state["params"].values())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    np.testing.assert_allclose(losses[:, 0], want_losses[:, 0], rtol=2e-2)  # bf16 matmuls: ~3 digits


def test_schedule_warmup_then_decay():
    s = TrainSettings(learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1)
    cos = [float(make_schedule(s, 14)(i)) for i in range(15)]  # steps 0..13 update; 14 is one past
    np.testing.assert_allclose(cos[:4], [0.2, 0.4, 0.6, 0.8], rtol=1e-6)  # never 0: the first step counts
    assert cos[4] == pytest.approx(1.0) and cos[14] == pytest.approx(0.1) and cos[13] > 0.1
    assert all(a > b for a, b in zip(cos[4:], cos[5:]))
    lin = make_schedule(TrainSettings(learning_rate=1.0, warmup_steps=0, schedule="linear"), 10)
    np.testing.assert_allclose([float(lin(i)) for i in range(10)], np.linspace(1.0, 0.1, 10), atol=1e-6)
    const = make_schedule(TrainSettings(learning_rate=0.5, warmup_steps=0, schedule="constant"), 5)
    assert float(const(4)) == 0.5


def test_weight_decay_mask_spares_biases_norms_embeddings():
    names = ["lm_head/kernel", "model/embed_tokens/embedding", "model/layers/0/self_attn/q_proj/bias",
             "model/layers/0/self_attn/q_proj/kernel", "model/layers/0/input_layernorm/scale", "model/norm/scale"]
    mask = decay_mask(names, DEFAULT_NO_DECAY)
    assert [n for n in names if mask[n]] == ["lm_head/kernel", "model/layers/0/self_attn/q_proj/kernel"]
    assert all(decay_mask(names, []).values())  # train.no_decay=[]: decay everything
    # And the optimizer applies it: with zero gradients only decayed tensors move.
    params = {n: jnp.ones((2,)) for n in names}
    for opt in ("adamw", "sgd"):
        tx = make_optimizer(TrainSettings(optimizer=opt, weight_decay=0.5, learning_rate=0.1,
                                          warmup_steps=0, schedule="constant"), 10, names)
        updates, _ = tx.update({n: jnp.zeros((2,)) for n in names}, tx.init(params), params)
        assert {n for n in names if float(jnp.abs(updates[n]).max()) > 0} == {n for n in names if mask[n]}, opt


# ------------------------------------------------------------------------- the stages, end to end


class FileAudit:
    """Every path this process opens while `active` (Python's audit hook sees open() and os.open())."""

    def __init__(self):
        self.active, self.opened = False, []
        sys.addaudithook(self._hook)  # cannot be removed; inert while inactive

    def _hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, bytes, pathlib.Path)):
            self.opened.append(pathlib.Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()))


def _tree(root: pathlib.Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """basin (3 steps from a random tiny model) -> a 2-group partition -> branch 1 trained under audit, with
    the other tasks' data files replaced by garbage (reading them would fail)."""
    workdir = tmp_path_factory.mktemp("stage")
    cfg = make_config(**{"basin.steps": 3, "train.epochs": 4.0, "train.eval_every": 10,
                         "train.checkpoint_every": 10})
    theta0 = basin.run(cfg, workdir)
    groups = [OTHER_TASKS, BRANCH_TASKS]
    write_partition(workdir, groups)
    data_dir = next((workdir / "data").glob("synthetic-*"))
    other = [p for p in data_dir.glob("*.jsonl") if p.stem not in BRANCH_TASKS]
    assert len(other) >= 10
    for p in other:
        p.write_text("this is not json\n")
    before = _tree(workdir)
    audit = FileAudit()
    audit.active = True
    try:
        result = train.run(cfg, workdir, branch=1)
    finally:
        audit.active = False
    return dict(cfg=cfg, workdir=workdir, theta0=theta0, result=result, other=other, opened=audit.opened,
                before=before, after=_tree(workdir), audit=audit, groups=groups)


def test_basin_writes_a_self_describing_theta0(stage_run):
    theta0, workdir = stage_run["theta0"], stage_run["workdir"]
    assert theta0 == wd.basin_dir(workdir) == theta0_of(stage_run["cfg"], workdir)
    assert checkpoint.is_checkpoint(theta0)
    hf = read_config(theta0)
    from merit_jax.data.mixture import load_tokenizer

    tok = load_tokenizer(data_settings(stage_run["cfg"]))
    assert hf["vocab_size"] % 128 == 0 and len(tok) <= hf["vocab_size"] < len(tok) + 128
    assert hf["eos_token_id"] == tok.eos_token_id and hf["hidden_size"] == 32
    assert (theta0 / "tokenizer.json").is_file() and (theta0 / "tokenizer_config.json").is_file()
    assert json.loads((theta0 / "train.json").read_text())["num_steps"] == 3
    metrics = [json.loads(x) for x in (basin.run_dir(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [2, 3]
    assert basin.run(stage_run["cfg"], workdir) == theta0  # done: skipped


def test_branch_reads_only_theta0_and_its_tasks_and_writes_only_its_dir(stage_run):
    workdir, opened = stage_run["workdir"], stage_run["opened"]
    opened_data = {p.resolve() for p in opened if "data" in p.parts and p.suffix == ".jsonl"}
    assert opened_data and {p.stem for p in opened_data} == set(BRANCH_TASKS), opened_data
    assert not {p.resolve() for p in stage_run["other"]} & {p.resolve() for p in opened}
    inside = [p for p in opened if str(p.resolve()).startswith(str(workdir.resolve()))]
    data_dir = stage_run["other"][0].parent
    allowed_reads = (wd.basin_dir(workdir).resolve(), wd.branch_dir(workdir, 1).resolve(),
                     wd.partition_file(workdir).resolve(), (data_dir / "families.json").resolve())  # names only
    unexpected = sorted({p for p in inside if not str(p.resolve()).startswith(tuple(map(str, allowed_reads)))
                         and p.resolve() not in opened_data})
    assert not unexpected, unexpected
    changed = [p for p, v in stage_run["after"].items() if stage_run["before"].get(p) != v]
    assert changed and all(wd.branch_dir(workdir, 1) in p.parents for p in changed), changed
    assert [p for p in stage_run["before"] if p not in stage_run["after"]] == []
    assert not wd.branch_dir(workdir, 0).exists()


def test_branch_learns_and_writes_its_final_checkpoint(stage_run):
    workdir = stage_run["workdir"]
    final = stage_run["result"][1]
    assert final == wd.branch_final(workdir, 1) and checkpoint.is_checkpoint(final)
    records = [json.loads(x) for x in (wd.branch_dir(workdir, 1) / "metrics.jsonl").read_text().splitlines()]
    train_log = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert train_log[-1]["loss"] < 0.8 * train_log[0]["loss"], train_log
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 and r["supervised_tokens"] > 0 for r in train_log)
    assert all(r["tokens_per_s"] > 0 for r in train_log[1:])
    assert evals[0]["step"] == 0 and evals[-1]["step"] == train_log[-1]["step"] and len(evals) >= 3
    for task in BRANCH_TASKS:  # held-out, per task: loss down, token accuracy up
        assert evals[-1][f"eval/{task}/loss"] < evals[0][f"eval/{task}/loss"], task
    assert evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"]
    assert list((wd.branch_dir(workdir, 1) / "tb").glob("events.out.tfevents.*"))
    info = json.loads((final / "train.json").read_text())
    assert info["branch"] == 1 and info["tasks"] == sorted(BRANCH_TASKS)
    assert info["supervised_tokens"] == sum(info["task_tokens"].values()) > 0
    assert read_config(final) == read_config(stage_run["theta0"]) and (final / "tokenizer.json").is_file()
    theta0, trained = final_params(stage_run["theta0"]), final_params(final)
    assert sorted(theta0) == sorted(trained) and all(trained[n].dtype == np.float32 for n in trained)


def test_finished_branch_is_skipped_without_reading_data(stage_run):
    audit = stage_run["audit"]
    audit.opened, audit.active = [], True
    try:
        out = train.run(stage_run["cfg"], stage_run["workdir"], branch=1)
    finally:
        audit.active = False
    assert out == {1: wd.branch_final(stage_run["workdir"], 1)}
    assert not [p for p in audit.opened if p.suffix == ".jsonl"]


@pytest.mark.parametrize("overrides,branch,message", [
    ({"mesh.data": 3}, 1, "does not fit the 8 cpu device"),
    ({"train.batch_size": 12}, 1, "train.batch_size=12 is not divisible by"),
    ({"train.batch_size": 16, "train.grad_accum": 4, "mesh.fsdp": 8}, 1, "mesh.data*mesh.fsdp*train.grad_accum"),
    ({"train.batch_tokens": 100}, 1, "train.batch_tokens=100 is not a multiple of train.seq_len=64"),
    ({"train.optimizer": "adam"}, 1, "train.optimizer='adam'"),
    ({"data.max_len": 128}, 1, "data.max_len=128 > train.seq_len=64"),
    ({"model.max_segments": 1}, 1, "model.max_segments=1: expected an integer >= 2"),
    ({"model.attention": "cudnn"}, 1, "model.attention=cudnn is cuDNN's kernel for NVIDIA GPUs"),
    ({}, 2, "--branch=2 is out of range: split/partition.json has 2 group(s)"),
    ({}, -1, "--branch=-1 is out of range"),
], ids=["mesh", "batch", "accum", "batch-tokens", "optimizer", "max-len", "max-segments", "cudnn-on-cpu",
        "branch",
        "negative-branch"])
def test_bad_config_fails_before_any_compute(stage_run, overrides, branch, message):
    cfg = make_config(**overrides)
    with pytest.raises(ConfigError) as err:
        train.run(cfg, stage_run["workdir"], branch=branch)
    assert message in str(err.value)
    assert not wd.branch_dir(stage_run["workdir"], 0).exists()


def test_partition_naming_unknown_tasks_fails_before_any_compute(tmp_path, stage_run):
    import shutil

    workdir = tmp_path / "wd"
    shutil.copytree(stage_run["workdir"] / "basin", workdir / "basin")
    write_partition(workdir, [[BRANCH_TASKS[0], "no_such_task"]])
    cfg = make_config()
    with pytest.raises(ConfigError, match=r"names task\(s\) \['no_such_task'\] that the data does not"):
        train.run(cfg, workdir, branch=0)
    (workdir / "extract").mkdir()
    (workdir / "extract" / "tasks.json").write_text(json.dumps([{"name": t} for t in BRANCH_TASKS]))
    with pytest.raises(ConfigError, match=r"names task\(s\) \['no_such_task'\] that .*tasks.json does not"):
        train.run(cfg, workdir, branch=0)
    assert not (workdir / "branches").exists()


def test_distributed_start_up_is_read_from_the_environment():
    from merit_jax import distributed

    assert distributed.init_kwargs({}) is None  # one process: no jax.distributed at all
    assert distributed.init_kwargs({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}) is None
    slurm = distributed.init_kwargs({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"})
    assert slurm["cluster_detection_method"] == "slurm"
    assert distributed.init_kwargs({"MERIT_DISTRIBUTED": "tpu"})["cluster_detection_method"] == "gcetpu"
    assert distributed.init_kwargs({"TPU_WORKER_HOSTNAMES": "w0,w1"})["cluster_detection_method"] == "gketpu"
    explicit = distributed.init_kwargs({"MERIT_COORDINATOR": "10.0.0.1:1234", "MERIT_NUM_PROCESSES": "4",
                                        "MERIT_PROCESS_ID": "3", "MERIT_LOCAL_DEVICE_IDS": "0,1"})
    assert explicit == {"initialization_timeout": 300, "coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                        "process_id": 3, "local_device_ids": [0, 1]}
    with pytest.raises(ValueError, match="MERIT_PROCESS_ID=4 is outside"):
        distributed.init_kwargs({"MERIT_COORDINATOR": "h:1", "MERIT_NUM_PROCESSES": "4", "MERIT_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="needs MERIT_COORDINATOR"):
        distributed.init_kwargs({"MERIT_COORDINATOR": "h:1"})
    with pytest.raises(ValueError, match="MERIT_DISTRIBUTED='mpi'"):
        distributed.init_kwargs({"MERIT_DISTRIBUTED": "mpi"})


def test_batch_in_tokens():
    cfg = make_config(**{"train.batch_tokens": 1024})
    assert config.train_settings(cfg).batch_size == 1024 // 64


def test_damaged_training_state_is_named_on_resume(stage_run, tmp_path):
    """A resumed run whose Orbax state lost a data file stops with the checkpoint's path, not a traceback."""
    from merit_jax.errors import InputFileError

    workdir = tmp_path / "wd"
    shutil.copytree(stage_run["workdir"] / "basin_run", workdir / "basin_run")
    step_dir = max((workdir / "basin_run" / "ckpt").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    data_files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    data_files[0].unlink()
    with pytest.raises(InputFileError, match=rf"{step_dir}: cannot read this training checkpoint"):
        basin.run(stage_run["cfg"], workdir)
    assert not (workdir / "basin").exists()
