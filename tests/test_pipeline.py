"""The whole pipeline as a user runs it: `python -m merit_jax.main --config configs/default.py`, shrunk.

One run (module fixture) is checked for every artifact of DESIGN.md; then its training is redone with a
SIGKILL in the middle and resumed, which must end with the same merged parameters.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from merit_jax.config import data_settings

ROOT = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0"
SMALL = [  # the default config, smaller: same stages, fewer examples and steps
    "--config.data.synthetic.examples_per_task=48", "--config.basin.steps=16", "--config.extract.n_calib=12",
    "--config.extract.dim=512", "--config.train.batch_size=8", "--config.train.checkpoint_every=1",
    "--config.evaluate.lmc_points=3", "--config.evaluate.noise_draws=1", "--config.evaluate.max_new_tokens=6",
    "--config.evaluate.baselines=('joint','uniform')",
]


def run_main(workdir, *extra, check=True, env=None):
    # relative, as in the README's command
    cmd = [sys.executable, "-m", "merit_jax.main", "--config", "configs/default.py", "--workdir",
           os.path.relpath(workdir, ROOT), *SMALL, *extra]
    env = dict(os.environ, **(env or {}), XLA_FLAGS=FAST_COMPILE)  # one CPU device, as on a user's laptop
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline") / "wd"
    run_main(workdir)
    return workdir


def test_default_run_writes_every_artifact(default_run):
    w = default_run
    for rel in ("config.json", "basin/merit_jax.json", "extract/tasks.json", "extract/task_grads.npy",
                "split/partition.json", "split/cosine.npy", "split/cosine.png", "split/pca.png",
                "merged/merit_jax.json", "hf/config.json", "hf/tokenizer.json", "report/report.md",
                "report/metrics.json"):
        assert (w / rel).is_file(), rel
    tasks = json.loads((w / "extract/tasks.json").read_text())["tasks"]
    grads = np.load(w / "extract/task_grads.npy")
    assert grads.shape[0] == len(tasks) >= 16 and grads.dtype == np.float32
    part = json.loads((w / "split/partition.json").read_text())
    assert part["method"] == "merit" and len(part["groups"]) == 4
    assert sorted(t for g in part["groups"] for t in g) == sorted(t["name"] for t in tasks)
    assert np.isclose(sum(part["weights"]), 1.0)
    for k in range(4):
        assert (w / "branches" / str(k) / "final" / "merit_jax.json").is_file()
    report = (w / "report/report.md").read_text()
    for needle in ("theta0", "merit", "joint", "uniform", "cosine.png", "barrier", "‖θ − θ⁰‖"):
        assert needle in report, needle
    metrics = json.loads((w / "report/metrics.json").read_text())
    assert set(metrics["results"]["models"]) >= {"theta0", "merit", "joint", "uniform"}


def test_export_answers_a_heldout_prompt_with_the_chat_template(default_run):
    import torch
    import transformers

    from merit_jax.models.generate import generate
    from merit_jax.io.load import load_model

    hf = default_run / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    data = next((default_run / "data").glob("synthetic-*"))
    record = json.loads(next(iter(sorted(data.glob("*.jsonl")))).read_text().splitlines()[-1])
    messages = record.get("messages") or [{"role": "user", "content": record["inputs"]}]
    prompt = tok.apply_chat_template([m for m in messages if m["role"] != "assistant"],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = prompt["input_ids"].shape[1]
    with torch.no_grad():
        theirs = model.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)[0, n:].numpy()
    ours = generate(load_model(hf), prompt["input_ids"].numpy(), max_new_tokens=8)[0]
    np.testing.assert_array_equal(theirs, ours)  # the export answers exactly as the merged model does
    assert tok.decode(theirs, skip_special_tokens=True) is not None


def test_rerun_skips_finished_stages(default_run):
    before = (default_run / "merged" / "merit_jax.json").stat().st_mtime_ns
    start = time.time()
    run_main(default_run)
    assert (default_run / "merged" / "merit_jax.json").stat().st_mtime_ns == before
    assert time.time() - start < 120


def test_killed_training_resumes_to_the_same_merged_parameters(default_run, tmp_path):
    from merit_jax.io import checkpoint

    w = tmp_path / "wd"
    w.mkdir()
    for part in ("config.json", "basin", "extract", "split", "data"):
        src = default_run / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, w / part)
    cmd = [sys.executable, "-m", "merit_jax.main", "--config", "configs/default.py", "--workdir", str(w), *SMALL,
           "--stage", "train"]
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 600, False
    while time.time() < deadline and proc.poll() is None and not seen:
        ckpts = w / "branches" / "1" / "ckpt"
        seen = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen, "branch 1 never wrote a checkpoint before the run ended"
    assert not (w / "branches" / "1" / "final").exists(), "killed too late: branch 1 had finished"
    run_main(w, "--stage", "train")
    run_main(w, "--stage", "merge")
    a, b = checkpoint.load(default_run / "merged"), checkpoint.load(w / "merged")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_config_errors_stop_before_any_compute(tmp_path):
    proc = run_main(tmp_path / "wd", "--config.split.method=kmeans", "--config.train.batch_size=7",
                    "--config.mesh.fsdp=3", check=False)
    assert proc.returncode == 2
    assert "split.method='kmeans'" in proc.stderr and "mesh" in proc.stderr
    assert not (tmp_path / "wd" / "basin").exists()


def test_lm_evaluation_harness_scores_the_export_like_we_do(default_run):
    """`lm_eval --model hf` on the exported directory generates exactly what our JAX model generates."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.lm_eval_task import TASK_NAME, write_task
    from merit_jax.models.generate import generate, left_pad
    from merit_jax.io.load import load_model
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.synthetic.examples_per_task = 48
    tokenizer = load_tokenizer(data_settings(cfg))
    mixture = load_mixture(data_settings(cfg), tokenizer, default_run)
    yaml = write_task(mixture, tokenizer, default_run / "lm_eval", max_new_tokens=6)
    limit = 12
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(default_run / "hf")},
                                  tasks=[TASK_NAME], task_manager=TaskManager(include_path=str(yaml.parent)),
                                  limit=limit, batch_size=4, device="cpu", log_samples=True)
    theirs = [s["resps"][0][0] for s in sorted(out["samples"][TASK_NAME], key=lambda s: s["doc_id"])]
    heldout = [ex for t in mixture.tasks.values() for ex in t.heldout][:limit]
    model = load_model(default_run / "hf")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, mask = left_pad([ex.input_ids[:ex.prompt_len].tolist() for ex in heldout], tokenizer.pad_token_id)
    ours = []
    for row in generate(model, ids, mask, max_new_tokens=6, eos_id=eos, pad_id=tokenizer.pad_token_id):
        row = row.tolist()
        ours.append(tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True))
    assert theirs == ours
    em = out["results"][TASK_NAME]["exact_match,none"]
    assert em == pytest.approx(np.mean([o.strip() == ex.answer.strip() for o, ex in zip(ours, heldout)]))
