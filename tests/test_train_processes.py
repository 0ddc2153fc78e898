"""The trainer across processes, for real (child Python processes, CPU devices):

- preemption and crashes: SIGTERM saves and exits cleanly; SIGKILL loses nothing committed; the resumed run
  ends with exactly (bitwise) the parameters of an uninterrupted one;
- multi-host: two processes joined by jax.distributed over localhost (gloo CPU collectives), 2 devices each,
  train one branch with the parameters sharded over all 4 devices (fsdp=4 spans both processes); each feeds
  its own half of every global batch and writes its own checkpoint shards; the result equals the
  single-process run.
"""

import json
import signal

import numpy as np
import pytest

from merit_jax.stages import train
from merit_jax.training.runlog import PREEMPTED_EXIT_CODE
from merit_jax import artifacts as wd
from tests.test_train_utils import (BRANCH_TASKS, child_env, final_params, finish, free_port, start_child,
                                    write_partition, write_theta0)

RUN = {"branch": 0, "overrides": {"train.epochs": 2.0}}  # ~12 steps of 8 rows; checkpoints every 3 steps
# Multi-host vs one process: the gloo all-reduce sums in another order than one process does, and Adam turns
# the resulting ~1e-7 relative gradient differences of nearly-cancelling coordinates into ~1e-7..1e-6 absolute
# parameter differences over ~12 steps of lr 3e-3. Bound: 1e-5, 0.3% of one step.
MULTIHOST_ATOL = 1e-5


def _workdir(path):
    path.mkdir()
    write_theta0(path)
    write_partition(path, [BRANCH_TASKS])
    return path


def _train_log(workdir):
    lines = (wd.branch_dir(workdir, 0) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Started together (the machine's cores overlap their start-up): one process (2 devices) running the
    uninterrupted reference and then the run to cut, stopped by SIGTERM at step 4; and the two processes of the
    multi-host run (2 devices each), which the multi-host test waits for."""
    tmp = tmp_path_factory.mktemp("procs")
    env = child_env(devices=2, cache_dir=tmp / "xla_cache")
    ref_dir, cut_dir, multi_dir = _workdir(tmp / "ref"), _workdir(tmp / "cut"), _workdir(tmp / "multihost")
    port = free_port()
    multi = {"runs": [dict(RUN, workdir=str(multi_dir), overrides={**RUN["overrides"], "mesh.fsdp": 4})]}
    hosts = [start_child(tmp, f"host{i}", multi, child_env(
        devices=2, MERIT_COORDINATOR=f"127.0.0.1:{port}", MERIT_NUM_PROCESSES=2, MERIT_PROCESS_ID=i))
        for i in range(2)]
    p = start_child(tmp, "first", {"runs": [dict(RUN, workdir=str(ref_dir)),
                                            dict(RUN, workdir=str(cut_dir), signal_at=[4, "SIGTERM"])]}, env)
    rc, log = finish(p, tmp, "first")
    yield dict(tmp=tmp, env=env, ref_dir=ref_dir, cut_dir=cut_dir, multi_dir=multi_dir, hosts=hosts, rc=rc, log=log)
    for h in hosts:  # not waited for when the multi-host test was deselected
        if h.poll() is None:
            h.kill()
            h.wait()


def test_sigterm_saves_and_exits_cleanly(runs):
    assert runs["rc"] == PREEMPTED_EXIT_CODE, runs["log"]
    assert "Traceback" not in runs["log"], runs["log"]
    assert "preempted" in runs["log"] and "state saved at step 4" in runs["log"]
    ckpt = wd.branch_dir(runs["cut_dir"], 0) / "ckpt"
    assert (ckpt / "4").is_dir() and not wd.branch_final(runs["cut_dir"], 0).exists()


def test_sigkill_then_resume_equals_uninterrupted(runs):
    tmp, env, ref_dir, cut_dir = runs["tmp"], runs["env"], runs["ref_dir"], runs["cut_dir"]
    assert runs["rc"] == PREEMPTED_EXIT_CODE, runs["log"]
    # Resumes at 4, is killed hard at step 7 (its async save at step 6 may be half-written).
    p = start_child(tmp, "killed", {"runs": [dict(RUN, workdir=str(cut_dir), signal_at=[7, "SIGKILL"])]}, env)
    rc, log = finish(p, tmp, "killed")
    assert rc == -signal.SIGKILL, log
    assert f"resumed from {wd.branch_dir(cut_dir, 0) / 'ckpt'} at step 4/" in log, log
    assert not wd.branch_final(cut_dir, 0).exists()
    # Resumes from the latest committed checkpoint and finishes.
    p = start_child(tmp, "resumed", {"runs": [dict(RUN, workdir=str(cut_dir))]}, env)
    rc, log = finish(p, tmp, "resumed")
    assert rc == 0 and "resumed from" in log, log

    steps = json.loads((wd.branch_final(ref_dir, 0) / "train.json").read_text())["num_steps"]
    assert steps > 7  # so that step 7 was mid-way
    ref, cut = final_params(wd.branch_final(ref_dir, 0)), final_params(wd.branch_final(cut_dir, 0))
    theta0 = final_params(wd.basin_dir(ref_dir))
    assert sorted(ref) == sorted(cut) == sorted(theta0)
    for name in ref:
        np.testing.assert_array_equal(cut[name], ref[name], err_msg=name)
    assert all(not np.array_equal(theta0[n], ref[n]) for n in ref if "kernel" in n)  # it did train
    # Each log point once, with the reference's loss: data order and state survived both cuts exactly.
    ref_log, cut_log = _train_log(ref_dir), _train_log(cut_dir)
    assert sorted(ref_log) == sorted({*range(2, steps + 1, 2), steps}) and cut_log == ref_log


def test_two_processes_train_one_branch_like_one_process(runs):
    tmp, ref_dir, workdir = runs["tmp"], runs["ref_dir"], runs["multi_dir"]
    logs = [finish(p, tmp, f"host{i}") for i, p in enumerate(runs["hosts"])]
    for i, (rc, log) in enumerate(logs):
        assert rc == 0, log
        assert f"CHILD DONE {i} 2 4" in log, log  # process i of 2, 4 global devices
        assert f"process {i} of 2 feeds data shard {i} of 2 (4 of the 8 rows" in log, log

    # Each process wrote its own shards: of the periodic checkpoints and of the final weights.
    branch = wd.branch_dir(workdir, 0)
    states = sorted((branch / "ckpt").glob("*/state"))
    assert states
    for state_dir in [*states, branch / "final" / "params"]:
        assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir(), state_dir
    for data_dir in sorted((branch / "ckpt").glob("*/data")):
        assert sorted(p.name for p in data_dir.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]

    got, want = final_params(branch / "final"), final_params(wd.branch_final(ref_dir, 0))
    theta0 = final_params(wd.basin_dir(workdir))
    assert sorted(got) == sorted(want)
    print("max |multi-host - single-process| =", max(float(np.abs(got[n] - want[n]).max()) for n in want))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=MULTIHOST_ATOL, err_msg=name)
    assert max(float(np.abs(want[n] - theta0[n]).max()) for n in want) > 100 * MULTIHOST_ATOL  # it trained
    assert _train_log(workdir).keys() == _train_log(ref_dir).keys()
    np.testing.assert_allclose(list(_train_log(workdir).values()), list(_train_log(ref_dir).values()), rtol=1e-5)


def test_resume_on_another_number_of_processes(runs, tmp_path):
    """A checkpoint written by the two-process run, resumed by this single process (8 devices): the data
    position comes from the step, the state is resharded on restore; the result equals the reference."""
    import shutil

    from tests.test_train_utils import make_config

    for i, p in enumerate(runs["hosts"]):
        assert finish(p, runs["tmp"], f"host{i}")[0] == 0
    workdir = tmp_path / "elastic"
    shutil.copytree(runs["multi_dir"], workdir)
    branch = wd.branch_dir(workdir, 0)
    shutil.rmtree(branch / "final")
    steps = sorted(int(p.name) for p in (branch / "ckpt").iterdir() if p.name.isdigit())
    shutil.rmtree(branch / "ckpt" / str(steps[-1]))  # resume from the one before the last
    assert len(steps) >= 2 and (branch / "ckpt" / str(steps[-2]) / "data" / "process_1-of-2.json").is_file()

    train.run(make_config(**RUN["overrides"]), workdir, branch=0)
    got, want = final_params(wd.branch_final(workdir, 0)), final_params(wd.branch_final(runs["ref_dir"], 0))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=MULTIHOST_ATOL, err_msg=name)
    log = _train_log(workdir)
    assert max(log) == max(_train_log(runs["ref_dir"])) and log.keys() == _train_log(runs["ref_dir"]).keys()
