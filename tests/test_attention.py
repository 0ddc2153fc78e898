"""Splash attention (model.attention = "splash", the Pallas TPU kernel, run here through Pallas' interpreter):
packed rows never attend across segments, and logits and gradients equal the XLA path's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.models import attention as A
from merit_jax.io.load import load_model
from merit_jax.sharding import make_mesh
from tests.hf_models import tiny_qwen2

T = 128  # the kernel's block: the shortest sequence it takes


def packed_segments(rng, rows: int) -> np.ndarray:
    """[rows, T] segment ids: 1..k contiguous examples of random lengths, then padding (0)."""
    seg = np.zeros((rows, T), np.int32)
    for r in range(rows):
        start, s = 0, 1
        while start < T - 20:
            length = int(rng.integers(10, 60))
            seg[r, start:start + length] = s
            start, s = start + length, s + 1
    return seg


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (4, 4)])
def test_splash_equals_xla_attention_on_packed_rows(heads, kv_heads):
    rng = np.random.default_rng(heads + kv_heads)
    seg = jnp.asarray(packed_segments(rng, 2))
    q = jnp.asarray(rng.normal(size=(2, T, heads, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, T, kv_heads, 16)), jnp.float32) for _ in range(2))
    want = jax.nn.dot_product_attention(q, k, v, mask=A.dense_mask(seg))
    got = jax.jit(A.splash_attention)(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # no attention across segments: changing segment 2's keys and values leaves every other token alone
    other = seg == 2
    k2 = jnp.where(other[..., None, None], k + 5.0, k)
    moved = jax.jit(A.splash_attention)(q, k2, jnp.where(other[..., None, None], v - 3.0, v), seg)
    np.testing.assert_array_equal(np.asarray(moved)[~np.asarray(other)], np.asarray(got)[~np.asarray(other)])
    assert not np.allclose(np.asarray(moved)[np.asarray(other)], np.asarray(got)[np.asarray(other)])


def test_model_logits_and_gradients_match_xla_unsharded_and_sharded(tmp_path):
    tiny_qwen2(tmp_path, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    seg = packed_segments(rng, 4)  # 4 rows: one per (data, fsdp) shard of the mesh below
    ids = jnp.asarray(rng.integers(1, 97, size=(4, T)) * (seg > 0))
    positions = np.zeros_like(seg)
    for r in range(4):
        for s in np.unique(seg[r]):
            at = np.flatnonzero(seg[r] == s)
            positions[r, at] = np.arange(len(at))
    batch = dict(positions=jnp.asarray(positions), segment_ids=jnp.asarray(seg))

    def loss_and_grad(model):
        graphdef, state = nnx.split(model)

        def loss(st):
            logits = nnx.merge(graphdef, st)(ids, **batch)
            return jnp.sum(jnp.where(jnp.asarray(seg)[..., None] > 0, logits, 0.0) ** 2) / 1e4, logits
        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        return np.asarray(logits), jax.tree.leaves(grads)

    want_logits, want_grads = loss_and_grad(load_model(tmp_path))
    splash = load_model(tmp_path, attention="splash")
    got_logits, got_grads = loss_and_grad(splash)
    real = seg > 0
    np.testing.assert_allclose(got_logits[real], want_logits[real], atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-3)
    mesh = make_mesh(data=2, fsdp=2, tp=2)
    with jax.set_mesh(mesh):
        sharded_logits, _ = loss_and_grad(load_model(tmp_path, mesh=mesh, attention="splash"))
    np.testing.assert_allclose(sharded_logits[real], want_logits[real], atol=1e-4)


def test_short_sequences_fall_back_to_the_same_mask(tmp_path):
    tiny_qwen2(tmp_path)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 97, size=(2, 9)))
    seg = jnp.asarray([[1] * 5 + [2] * 4, [1] * 7 + [0] * 2])
    want = load_model(tmp_path)(ids, segment_ids=seg)
    got = load_model(tmp_path, attention="splash")(ids, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_qwen2_5_vl_with_splash_equals_xla(tmp_path, monkeypatch):
    """The VL model's language model (packed text of 128 tokens) and its vision tower's full-attention blocks
    (a 16x16-patch image: one 256-patch segment) take the kernel; logits equal the XLA path's."""
    from tests import vl_fixtures as F

    F.tiny_vl(tmp_path / "vl")
    F.GRIDS["big"] = (1, 16, 16)
    try:
        ids = np.asarray(F.prompt(10, "big", 20, seed=3))
        pixel_values, grid = F.pixels(["big"], seed=3)
    finally:
        del F.GRIDS["big"]
    ids = np.concatenate([ids, np.zeros(T - len(ids), ids.dtype)])[None]
    mask = np.zeros((1, T), np.int32)
    mask[0, :10 + 66 + 20] = 1  # text, the image's 64 tokens between start and end, text; then padding
    want = load_model(tmp_path / "vl")(ids, pixel_values=pixel_values, image_grid_thw=grid, attention_mask=mask)
    calls = []
    for name in ("splash_attention", "splash_segments"):  # a spy: which kernels the forward took
        real_fn = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _f=real_fn, _n=name: (calls.append(_n), _f(*a))[1])
    got = load_model(tmp_path / "vl", attention="splash")(ids, pixel_values=pixel_values, image_grid_thw=grid,
                                                           attention_mask=mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4)
    assert {"splash_attention", "splash_segments"} <= set(calls), calls


def test_qwen2_5_vl_per_row_images_with_splash_under_a_mesh_equal_xla(tmp_path, monkeypatch):
    """Per-row images (the vision tower under the vmap over rows, as the trainer runs it) on a (fsdp 2, tp 2)
    mesh: the tower's kernel runs per shard (shard_map, each shard's own rows, heads over tp); image features
    equal the unsharded XLA path's."""
    from merit_jax.models.vision_layout import stacked_layouts
    from tests import vl_fixtures as F

    F.tiny_vl(tmp_path / "vl")
    monkeypatch.setitem(F.GRIDS, "big", (1, 16, 16))  # one 256-patch segment in the full-attention blocks
    images = [F.pixels(g, seed=i) for i, g in enumerate([["big"], ["big", "square"]])]
    want_model = load_model(tmp_path / "vl")
    layout = jax.tree.map(jnp.asarray, stacked_layouts([grid for _, grid in images], want_model.vl_config.vision))
    n = layout.patch_order.shape[1]
    pv = jnp.asarray(np.stack([np.pad(p, ((0, n - len(p)), (0, 0))) for p, _ in images]))
    rows = [F.prompt(2, "big", 3, seed=1), F.prompt(2, "big", 1, "square", 2, seed=2)]
    ids = jnp.asarray([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])

    def embed(model):
        graphdef, state = nnx.split(model)
        return np.asarray(jax.jit(lambda st: nnx.merge(graphdef, st).embed(ids, pv, vision_layout=layout))(state))

    want = embed(want_model)
    calls = []
    real_fn = A.splash_segments
    monkeypatch.setattr(A, "splash_segments", lambda *a: (calls.append(1), real_fn(*a))[1])
    mesh = make_mesh(data=1, fsdp=2, tp=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        assert A.row_axes(2) == ("fsdp",)
        got = embed(load_model(tmp_path / "vl", mesh=mesh, attention="splash"))
    assert calls  # the full-attention blocks took the kernel
    np.testing.assert_allclose(got, want, atol=1e-4)
