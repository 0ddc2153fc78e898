"""Qwen2.5-VL at real structure: 12 vision blocks (windowed and full-attention ones) and 12 text layers, through
the extract and split stages with the vision tower's gradients included. Every reduction must run, and full,
sketch and stride must give the same split of the synthetic image tasks. (Per-example gradients with images at this depth: the
per-example tests in tests/test_vl_pipeline.py and tests/test_extract.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from configs.tiny_vl import get_config
from merit_jax import partition as split
from merit_jax.stages import basin, extract


@pytest.fixture(scope="module")
def deep_vl(tmp_path_factory):
    cfg = get_config()
    cfg.model.tiny_vl.vision.depth = 12
    cfg.model.tiny_vl.vision.fullatt_block_indexes = (3, 7, 11)
    cfg.model.tiny_vl.text.num_hidden_layers = 12
    cfg.basin.steps = 0  # θ⁰: the random tiny model
    cfg.data.synthetic.examples_per_task = 24
    # the batched gradient path (nothing per-example kept): the cheapest compile that still reduces the
    # string-sorted gradient dicts jax hands back, as the per-example path does
    cfg.extract.update(exclude=("embed_tokens", "lm_head"), n_calib=6, dim=512, micro_chunk=8,
                       keep_example_sketches=False, xla_options={"xla_backend_optimization_level": 0})
    workdir = tmp_path_factory.mktemp("deep_vl")
    basin.run(cfg, workdir)
    return cfg, workdir


def _task_grads(cfg, workdir, reduction, pack=False):
    cfg = cfg.copy_and_resolve_references()
    cfg.extract.reduction = reduction
    cfg.extract.pack = pack
    wd = workdir.parent / f"{workdir.name}-{reduction}{'-packed' if pack else ''}"
    wd.mkdir(exist_ok=True)
    for link in ("basin", "data"):
        if not (wd / link).exists():
            (wd / link).symlink_to(workdir / link)
    record = extract.run(cfg, wd)
    return record, np.load(wd / "extract" / "task_grads.npy")


def test_full_sketch_and_stride_split_a_deep_vl_model_alike(deep_vl):
    cfg, workdir = deep_vl
    groups = {}
    for reduction in ("full", "sketch", "stride"):
        record, grads = _task_grads(cfg, workdir, reduction)
        names = record["params"]["names"]
        assert sum(n.startswith("visual/blocks/") and n.endswith("attn/qkv/kernel") for n in names) == 12
        assert sum(n.startswith("model/layers/") and n.endswith("mlp/up_proj/kernel") for n in names) == 12
        tasks = [t["name"] for t in record["tasks"]]
        tokens = [t["train_tokens"] for t in record["tasks"]]
        groups[reduction] = {frozenset(tasks[i] for i in g) for g in split.conflict_split(grads, tokens, 1)}
    assert groups["sketch"] == groups["full"] == groups["stride"], groups


def test_packed_rows_give_a_deep_vl_models_task_gradients(deep_vl):
    """extract.pack: several examples (and their images) per row, kept apart by segment ids and M-RoPE
    positions: the same task gradients as one example per row."""
    cfg, workdir = deep_vl
    record, want = _task_grads(cfg, workdir, "sketch")
    packed_record, got = _task_grads(cfg, workdir, "sketch", pack=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    for a, b in zip(packed_record["tasks"], record["tasks"]):
        assert a["calib_tokens"] == b["calib_tokens"] and a["n_calib"] == b["n_calib"]
        assert abs(a["loss_mean"] - b["loss_mean"]) <= 1e-5 * abs(b["loss_mean"])
