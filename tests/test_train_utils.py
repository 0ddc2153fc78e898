"""Helpers shared by the trainer tests (no tests here): a tiny config, a random θ⁰, child processes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

# Tiny enough to compile in seconds on 2 shared cores; tp=2 divides heads, kv heads, mlp and vocab.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False)


def _tasks_by_family() -> dict[str, list[str]]:
    from merit_jax.data import synthetic

    out: dict[str, list[str]] = {}
    for task, family in synthetic.families().items():
        out.setdefault(family, []).append(task)
    return out


# Synthetic tasks the branch tests train on (one per family) and another group's (never read by branch 1).
BRANCH_TASKS = sorted(tasks[0] for tasks in _tasks_by_family().values())
OTHER_TASKS = sorted(tasks[1] for tasks in _tasks_by_family().values())

# Unoptimised XLA code compiles 2-4x faster; the tests' programs are tiny, so they run fast anyway.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Config overrides of every trainer test run (dotted keys, as on the command line).
BASE_OVERRIDES = {
    "train.batch_size": 8, "train.seq_len": 64, "data.max_len": 64, "train.learning_rate": 3e-3,
    "train.warmup_steps": 2, "train.log_every": 2, "train.checkpoint_every": 3, "train.eval_batch_size": 8,
    "data.synthetic.examples_per_task": 48, "data.heldout_max": 8, "extract.n_calib": 4, "basin.steps": 0,
    "mesh.fsdp": -1, **{f"model.tiny.{k}": v for k, v in TINY.items()},
    "train.xla_options": FAST_COMPILE,
}


def make_config(**overrides):
    from configs.default import get_config

    cfg = get_config()
    for key, value in {**BASE_OVERRIDES, **overrides}.items():
        set_key(cfg, key, value)
    return cfg


def set_key(cfg, dotted: str, value) -> None:
    node = cfg
    *path, leaf = dotted.split(".")
    for p in path:
        node = node[p]
    with node.unlocked():  # new keys (e.g. train.xla_options) are allowed
        node[leaf] = value


def tokenizer_dir() -> pathlib.Path:
    from merit_jax.data import synthetic

    return pathlib.Path(synthetic.TOKENIZER_DIR)


def tiny_hf_config(vocab: int = 384) -> dict:
    from merit_jax.models.config import tiny_hf_config as make

    return make(vocab, eos_token_id=2, pad_token_id=0, **TINY)


def random_params(hf_config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters for `hf_config` from numpy (no XLA compile): N(0, 0.05), norm scales around 1."""
    from flax import nnx

    from merit_jax.models.registry import model_factory
    from merit_jax.models import params as P

    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in sorted(P.specs(nnx.eval_shape(model_factory(hf_config))).items()):
        x = rng.standard_normal(shape) * 0.05
        out[name] = (1.0 + x if name.endswith("scale") else x).astype(dtype)
    return out


def write_theta0(workdir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A random tiny θ⁰ at WORKDIR/basin (what the basin stage would leave there)."""
    from merit_jax.io import checkpoint

    hf = tiny_hf_config()
    return checkpoint.save(pathlib.Path(workdir) / "basin", random_params(hf, seed), hf, tokenizer_dir=tokenizer_dir())


def write_partition(workdir: pathlib.Path, groups: list[list[str]]) -> None:
    from merit_jax import artifacts as wd

    wd.write_json(wd.partition_file(workdir), {"method": "merit", "depth": 1, "groups": groups,
                                               "tokens": [1] * len(groups), "weights": [1 / len(groups)] * len(groups)})


CHILD = r'''
import json, logging, os, signal, sys
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(name)s: %(message)s")
logging.getLogger("absl").setLevel(logging.WARNING)
spec = json.loads(open(sys.argv[1]).read())
sys.path.insert(0, spec["repo"])
sys.path.insert(0, os.path.join(spec["repo"], "tests"))
from merit_jax import distributed
distributed.initialize()  # from MERIT_* variables when the test starts several processes
import jax
from merit_jax.stages import train
from test_train_utils import make_config

for run in spec["runs"]:  # one after another in this process (later runs hit the compile cache)
    hooks = []
    if run.get("signal_at"):
        step, name = run["signal_at"]
        hooks.append(lambda done, step=step, name=name: os.kill(os.getpid(), getattr(signal, name))
                     if done == step else None)
    train.run(make_config(**run.get("overrides", {})), run["workdir"], branch=run.get("branch"), hooks=hooks)
print("CHILD DONE", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
'''


def child_env(devices: int, cache_dir: pathlib.Path | None = None, **extra) -> dict:
    """Environment of a child run: its own device count, fast (unoptimised) XLA compiles, a shared compile cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="3")
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_child(tmp: pathlib.Path, name: str, spec: dict, env: dict) -> subprocess.Popen:
    script = tmp / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    spec_file = tmp / f"{name}.json"
    spec_file.write_text(json.dumps({"repo": str(REPO), **spec}))
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(script), str(spec_file)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp)


def finish(proc: subprocess.Popen, tmp: pathlib.Path, name: str, timeout: float = 240) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    return rc, (tmp / f"{name}.log").read_text()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_params(final_dir) -> dict[str, np.ndarray]:
    from merit_jax.io import checkpoint

    return checkpoint.load(final_dir)
