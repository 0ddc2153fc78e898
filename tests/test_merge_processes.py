"""The merge on several processes, for real: two processes joined by jax.distributed over 127.0.0.1 (gloo CPU
collectives), 2 CPU devices each, run `python -m merit_jax.merge`'s main on K = 3 merit_jax checkpoints.

- tokens (linear): each process reads, merges and writes only the shards it owns (fsdp over the 4 devices);
  the result equals the single-process merge and the numpy weighted average (<= 1e-6 relative);
- TIES (needs whole tensors): every process merges each tensor, each writes only its shards of the result;
  the result equals the single-process merge exactly.
Both children start once and run both merges (start-up dominates the time).
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from merit_jax import merging
from merit_jax.io import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
K = 3
TOKENS = [5, 3, 2]
HF_CONFIG = {"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 1, "tie_word_embeddings": True}
TIES = {"density": 0.5, "lam": 0.9}
CHUNK_MB = 0.0001  # ~100 bytes: the output is streamed in several groups, written in several partial saves

# Leading dimensions divisible by the 4 devices are split four ways; (5,) is not: it is replicated (read by
# both processes, written once); the int32 counter is not averaged (the first input's value is kept).
SHAPES = {"model/embed_tokens/embedding": (16, 8), "model/layers/0/mlp/up_proj/kernel": (8, 12),
          "model/layers/0/mlp/down_proj/kernel": (12, 8), "model/layers/0/self_attn/q_proj/bias": (8,),
          "model/norm/scale": (5,)}

CHILD = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from merit_jax import merge
    for argv in json.loads(sys.argv[1]):
        rc = merge.main(argv)  # initialises jax.distributed from MERIT_* (merit_jax inputs)
        if rc:
            sys.exit(rc)
    import jax
    print("CHILD DONE", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
    """
)


def _tensors(seed, base=None):
    rng = np.random.default_rng(seed)
    out = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    if base is not None:  # a branch: θ⁰ plus a small step
        out = {name: base[name] + 0.1 * out[name] for name in SHAPES}
    out["step"] = np.asarray(10 + seed, np.int32)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ckpt_args(inputs):
    return [arg for p in inputs for arg in ("--ckpt", str(p))]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge_procs")
    base = _tensors(100)
    branches = [_tensors(seed, base) for seed in range(K)]
    base_dir = checkpoint.save(tmp / "base", base, HF_CONFIG)
    inputs = [checkpoint.save(tmp / f"in{k}", t, HF_CONFIG) for k, t in enumerate(branches)]
    runs = [
        [*_ckpt_args(inputs), "--method", "tokens", "--weights", ",".join(map(str, TOKENS)),
         "--out", str(tmp / "tokens"), "--chunk-mb", str(CHUNK_MB)],
        [*_ckpt_args(inputs), "--method", "ties", "--base", str(base_dir), "--density", str(TIES["density"]),
         "--lam", str(TIES["lam"]), "--out", str(tmp / "ties"), "--chunk-mb", str(CHUNK_MB)],
    ]
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               MERIT_COORDINATOR=f"127.0.0.1:{port}", MERIT_NUM_PROCESSES="2", MERIT_CPU_COLLECTIVES="gloo",
               MERIT_INIT_TIMEOUT="60", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for i in range(2):
        with open(tmp / f"host{i}.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(runs)], stdout=log,
                                          stderr=subprocess.STDOUT, env=dict(env, MERIT_PROCESS_ID=str(i))))
    # Meanwhile, the single-process references (numpy, in this process).
    ref_tokens = merging.merge_checkpoints(inputs, tmp / "ref_tokens", method="tokens", weights=TOKENS)
    ref_ties = merging.merge_checkpoints(inputs, tmp / "ref_ties", method="ties", base=base_dir, **TIES)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=120))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append(None)
    logs = [(tmp / f"host{i}.log").read_text() for i in range(2)]
    return dict(tmp=tmp, base=base, branches=branches, codes=codes, logs=logs,
                ref_tokens=checkpoint.load(ref_tokens), ref_ties=checkpoint.load(ref_ties))


def _shares(log: str) -> list[tuple[int, int]]:
    """(elements merged and written by this process, elements in all) per merge, from its log."""
    return [(int(a), int(b)) for a, b in
            re.findall(r"process \d of 2 merged and wrote (\d+) of the (\d+) elements", log)]


def test_both_processes_finish(merged):
    for i, (code, log) in enumerate(zip(merged["codes"], merged["logs"])):
        assert code == 0, log[-4000:]
        assert f"CHILD DONE {i} 2 4" in log, log[-4000:]


def test_work_is_split_between_the_processes(merged):
    test_both_processes_finish(merged)
    shares = [_shares(log) for log in merged["logs"]]
    total = sum(int(np.prod(s)) for s in SHAPES.values()) + 1  # + the 0-d counter
    for run in range(2):
        mine = [shares[i][run][0] for i in range(2)]
        assert all(shares[i][run][1] == total for i in range(2))
        assert sum(mine) == total, mine  # every element written once
        assert 0 < mine[1] < mine[0] < total, mine  # process 0 also writes the replicated (5,) and the counter
    for name in ("tokens", "ties"):
        params = merged["tmp"] / name / "params"
        parts = [sorted(params.glob(f"ocdbt.process_{i}*")) for i in range(2)]  # one per partial save
        assert len(parts[0]) == len(parts[1]) > 1, parts
        for i in range(2):
            assert any(p for d in parts[i] for p in (d / "d").iterdir()), f"{params}: process {i} wrote no data"
        assert sorted(p.name for p in (merged["tmp"] / name).iterdir()) == sorted(
            ["config.json", "merit_jax.json", "merit_merge.json", "params"])
    assert not [p.name for p in merged["tmp"].iterdir() if p.name.startswith(".")]  # no temp dirs left


def _assert_close(got, ref, name):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= 1e-6 * max(float(np.max(np.abs(ref))), 1e-30), f"{name}: max error {err}"


def test_linear_merge_equals_single_process_and_numpy(merged):
    test_both_processes_finish(merged)
    got = checkpoint.load(merged["tmp"] / "tokens")
    assert set(got) == set(merged["ref_tokens"])
    w = np.asarray(TOKENS, np.float64) / sum(TOKENS)
    for name in SHAPES:
        assert got[name].dtype == np.float32 and got[name].shape == SHAPES[name]
        _assert_close(got[name], merged["ref_tokens"][name], name)
        _assert_close(got[name], sum(wk * b[name].astype(np.float64) for wk, b in zip(w, merged["branches"])), name)
    np.testing.assert_array_equal(got["step"], merged["branches"][0]["step"])
    assert checkpoint.read_hf_config(merged["tmp"] / "tokens") == HF_CONFIG


def test_ties_merge_equals_single_process(merged):
    test_both_processes_finish(merged)
    got, ref = checkpoint.load(merged["tmp"] / "ties"), merged["ref_ties"]
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    record = json.loads((merged["tmp"] / "ties" / merging.MERGE_INFO_FILE).read_text())
    assert record["method"] == "ties" and record["options"]["density"] == TIES["density"]
