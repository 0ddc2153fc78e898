"""MERIT on a vision-language model: `python -m merit_jax.main --config configs/tiny_vl.py`, shrunk, on a
Vision-FLAN-format release written by the test (annotation JSON in the public schema, an image folder of
JPEGs of several sizes and aspect ratios, 3 tasks, duplicate ids: tests/vl_fixtures.py).

One run (module fixture) of every stage on the tiny Qwen2.5-VL and that release; then its pieces are checked: per-row image batches equal the flat form, per-example gradients with images equal
single-example gradients, the language-only extraction, the frozen vision tower, and the export in
transformers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from merit_jax.config import data_settings
from merit_jax.io import checkpoint
from merit_jax.data import packing
from merit_jax.data import vision as V
from merit_jax.data.mixture import load_mixture, load_tokenizer
from merit_jax.gradients import per_example_grads
from merit_jax.losses import per_example_losses
from merit_jax.models import params as P
from merit_jax.models.inputs import batch_logits
from merit_jax.io.load import load_model
from merit_jax.models.qwen2_5_vl import generate_vl
from merit_jax.training.optim import frozen_names
from tests.vl_fixtures import RELEASE_TASKS, write_vision_flan_release

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--config.basin.steps=6", "--config.extract.n_calib=6",
    "--config.extract.dim=256", "--config.extract.micro_chunk=4", "--config.train.batch_size=4",
    "--config.evaluate.baselines=()", "--config.evaluate.lmc_points=3", "--config.evaluate.noise_draws=1",
    "--config.evaluate.noise_sigmas=(0.05,)", "--config.evaluate.max_new_tokens=3",
]


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vl_pipeline")
    annotation, image_root = write_vision_flan_release(tmp / "vision_flan", per_task=16)
    workdir = tmp / "wd"
    cmd = [sys.executable, "-m", "merit_jax.main", "--config", "configs/tiny_vl.py", "--workdir", str(workdir), *SMALL,
           f"--config.data.path={annotation}", f"--config.data.image_root={image_root}"]
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))  # the run's resolved config
    return workdir, cfg


def test_every_stage_runs_on_the_tiny_vl_model(vl_run):
    workdir, _ = vl_run
    for rel in ("basin/merit_jax.json", "extract/tasks.json", "split/partition.json", "branches/0/final",
                "branches/1/final", "merged/merit_jax.json", "hf/config.json", "hf/preprocessor_config.json",
                "evaluate/results.json", "report/report.md"):
        assert (workdir / rel).exists(), rel
    tasks = json.loads((workdir / "extract/tasks.json").read_text())
    assert sorted(t["name"] for t in tasks["tasks"]) == sorted(RELEASE_TASKS)
    names = tasks["params"]["names"]  # the language model only (extract.exclude has ^visual/)
    assert names and not any(n.startswith("visual/") for n in names)
    groups = json.loads((workdir / "split/partition.json").read_text())["groups"]
    assert sorted(t for g in groups for t in g) == sorted(RELEASE_TASKS) and len(groups) == 2
    results = json.loads((workdir / "evaluate/results.json").read_text())
    assert {"theta0", "merit", "branch0", "branch1"} <= set(results["models"])
    assert set(results["models"]["merit"]["accuracy"]) == set(RELEASE_TASKS)  # generate_vl answered


def test_branches_train_the_language_model_and_keep_the_frozen_vision_tower(vl_run):
    workdir, cfg = vl_run
    theta0 = checkpoint.load(workdir / "basin")
    frozen = frozen_names(list(theta0), cfg.train.freeze)
    assert frozen == {n for n in theta0 if n.startswith("visual/")}
    for k in (0, 1):
        branch = checkpoint.load(workdir / f"branches/{k}/final")
        assert all(np.array_equal(branch[n], theta0[n]) for n in frozen)
        assert not np.array_equal(branch["model/layers/0/mlp/up_proj/kernel"], theta0["model/layers/0/mlp/up_proj/kernel"])


@pytest.fixture(scope="module")
def calib(vl_run):
    """θ⁰ and a few calibration examples of the run, with the run's image processor."""
    workdir, cfg = vl_run
    model = load_model(workdir / "basin")
    mixture = load_mixture(data_settings(cfg), load_tokenizer(data_settings(cfg)), None)
    examples = [ex for t in mixture.tasks.values() for ex in t.calib[:2]]
    return model, examples, V.row_images_for(data_settings(cfg), model)(examples)


def test_per_row_images_equal_the_flat_image_batch(calib):
    """Sizes fitted on more rows than the batch holds (a bigger image, a text-only row), and a padding row:
    the real rows' logits equal the flat form's, the padding row stays finite."""
    model, examples, images = calib
    rows = packing.plan_rows([len(e) for e in examples], seq_len=128, batch_size=2, seed=0, num_epochs=1.0)[:2]
    biggest = int(np.argmax([e.image_grid_thw.prod() for e in examples]))
    images.fit([*rows, [biggest], []])
    text = packing.TokenTable(examples).rows([*rows, []], 128)
    batch = images.add(text, rows)  # the third row: padding
    assert batch["pixel_values"].shape[1] >= examples[biggest].image_grid_thw.prod()
    flat = V.vl_batch(examples, rows, 128, images.processor)
    want = model(flat["input_ids"], pixel_values=flat["pixel_values"], image_grid_thw=flat["image_grid_thw"],
                 segment_ids=flat["segment_ids"])
    got = np.asarray(jax.jit(batch_logits)(model, batch))
    real = flat["segment_ids"] > 0
    assert min(len(images.grids(r)) for r in rows) >= 2  # several images in each row
    np.testing.assert_allclose(got[:2][real], np.asarray(want)[real], atol=1e-5)
    assert np.isfinite(got[2]).all()


def test_per_example_gradients_with_images_equal_single_example_gradients(calib):
    model, examples, images = calib
    examples = examples[:3]
    singles = [[i] for i in range(len(examples))]
    images.fit([[i] for i in range(len(images.examples))])
    batch = images.add(packing.pad_batch(examples, 96), singles)
    # language and vision tower tensors: with `^visual/` dropped from extract.exclude the tower counts too
    names = ["model/layers/1/mlp/down_proj/kernel", "model/layers/0/self_attn/q_proj/kernel",
             "visual/blocks/0/attn/qkv/kernel", "visual/merger/mlp/0/kernel"]
    _, grads = per_example_grads(model, batch, names)

    from flax import nnx
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, lambda p, _: P.path_name(p) in names), ...)
    for i, ex in enumerate(examples):
        one = V.vl_batch(examples, [[i]], 96, images.processor)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(jnp.asarray(one["input_ids"]), pixel_values=one["pixel_values"],
                                                 image_grid_thw=one["image_grid_thw"])
            return per_example_losses(logits, one["targets"], one["loss_mask"])[0]

        want = P.flatten(jax.grad(loss)(params))
        for n in names:
            np.testing.assert_allclose(np.asarray(grads[n][i]), np.asarray(want[n]), atol=1e-6, rtol=1e-4)


def test_generation_compiles_once_for_held_out_batches_of_different_images(vl_run, calib):
    """evaluate's exact match: one layout size fitted on every generation batch, so generate_vl compiles once;
    its answers equal generate_vl's on each batch's own unpadded images."""
    from merit_jax.evaluation import Evaluator
    from merit_jax.models.qwen2_5_vl import _generate_vl

    workdir, cfg = vl_run
    model, _, _ = calib
    tokenizer = load_tokenizer(data_settings(cfg))
    ev = Evaluator(model, load_mixture(data_settings(cfg), tokenizer, None), tokenizer, max_len=cfg.data.max_len, batch=1,
                   max_new_tokens=3, make_images=V.row_images_for(data_settings(cfg), model))
    assert len({ex.image_grid_thw.tobytes() for _, ex in ev.heldout}) >= 2  # batches of different image sizes
    before = _generate_vl._cache_size()
    calls, generate = [], ev._generate

    def recording(ids, mask, examples):
        calls.append((ids, mask, examples, generate(ids, mask, examples)))
        return calls[-1][-1]

    ev._generate = recording
    ev.accuracy(P.flatten(model))
    assert len(calls) == len(ev.heldout) and _generate_vl._cache_size() - before == 1
    ids, mask, exs, got = calls[-1]
    pv, grid = V.load_pixels(exs, ev._gen_images[0].processor)
    want = generate_vl(model, ids, mask, pv, grid, max_new_tokens=3, eos_id=ev.eos_id, pad_id=ev.pad_id)
    np.testing.assert_array_equal(got, want)


def test_the_vl_export_loads_in_transformers_and_decodes_like_the_merged_model(vl_run, calib):
    workdir, _ = vl_run
    _, examples, images = calib
    merged = load_model(workdir / "merged")
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(workdir / "hf").eval()
    ex = examples[0]
    ids = ex.input_ids[None, :ex.prompt_len].astype(np.int64)
    pv, grid = V.load_pixels([ex], images.processor)
    hf_inputs = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                     mm_token_type_ids=torch.tensor((ids == back.config.image_token_id).astype(np.int64)))
    with torch.no_grad():
        want = back(**hf_inputs).logits.numpy()
        hf_tokens = back.generate(**hf_inputs, max_new_tokens=4, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[:, ids.shape[1]:].numpy()
    got = np.asarray(merged(ids, pixel_values=pv, image_grid_thw=grid))
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(generate_vl(merged, ids, None, pv, grid, max_new_tokens=4), hf_tokens)
