"""model.scan_layers: the decoder layers (and the vision tower's blocks) run as one lax.scan over a stacked
compute-dtype copy of their per-layer parameters. Same logits and parameter gradients as the unrolled loop,
with every remat policy, bf16 compute, on a sharded mesh, with splash attention and in the VL model (window and
full-attention vision blocks); the parameter tree keeps its per-layer names; the program holds one layer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.models import params as P
from merit_jax.models.config import ModelConfig
from merit_jax.models.qwen2 import Qwen2ForCausalLM
from merit_jax.sharding import make_mesh

# 12 layers, 3 KV groups of 2 query heads, a vocabulary no power of two
CFG = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=12, num_heads=6, num_kv_heads=3,
                  head_dim=8, rope_theta=10000.0)
FP32_TOL = dict(atol=1e-6, rtol=1e-5)


def build(cfg: ModelConfig = CFG, **policy) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), **policy)


def variant(model: nnx.Module, make) -> nnx.Module:
    """`model`'s parameters under the policy of `make` (a constructor, only traced abstractly)."""
    return nnx.merge(nnx.graphdef(nnx.eval_shape(make)), nnx.state(model))


def text_batch(rows: int = 4, t: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(rows, t))
    mask = np.ones((rows, t), np.int32)
    mask[0, :5] = 0  # a left-padded row
    return jnp.asarray(ids), jnp.asarray(mask)


def _token_loss(model, input_ids, **kwargs):
    logits = model(input_ids, **kwargs)
    targets = jnp.roll(input_ids, -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)), logits


def logits_and_grads(model, input_ids, **kwargs):
    """(logits, {name: gradient}) of a cross-entropy-like loss, jitted."""
    graphdef, state = nnx.split(model)

    loss = lambda st: _token_loss(nnx.merge(graphdef, st), input_ids, **kwargs)
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return np.asarray(logits), {k: np.asarray(v, np.float32) for k, v in P.flatten(grads).items()}


def assert_same(got, want, **tol):
    (gl, gg), (wl, wg) = got, want
    np.testing.assert_allclose(gl, wl, **tol)
    assert gg.keys() == wg.keys()
    for name in wg:
        np.testing.assert_allclose(gg[name], wg[name], err_msg=name, **tol)


@pytest.fixture(scope="module")
def reference():
    """(the fp32 unrolled model, its batch, its logits and gradients): what every text variant must give."""
    model = build()
    ids, mask = text_batch()
    return model, dict(input_ids=ids, attention_mask=mask), logits_and_grads(model, ids, attention_mask=mask)


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scan_equals_unrolled_logits_and_gradients(reference, remat):
    """Against the unrolled loop without remat (remat changes what is stored, never the numbers)."""
    unrolled, batch, want = reference
    scanned = variant(unrolled, lambda: build(remat=remat, scan_layers=True))
    assert P.specs(scanned) == P.specs(unrolled)  # the per-layer tree: model/layers/<i>/..., nothing stacked
    assert "model/layers/11/mlp/up_proj/kernel" in P.specs(scanned)
    assert_same(logits_and_grads(scanned, **batch), want, **FP32_TOL)


def _jaxpr(make, scan: bool) -> jax.core.ClosedJaxpr:
    """The traced gradient program of an abstract model (nothing compiled, no weights)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(scan)))
    fn = jax.grad(lambda st, x: jnp.sum(nnx.merge(graphdef, st)(x)))
    return jax.make_jaxpr(fn)(state, jax.ShapeDtypeStruct((2, 16), jnp.int32))


def test_the_program_holds_one_layer_and_stacks_in_the_compute_dtype():
    def make(layers, **kw):
        cfg = dataclasses.replace(CFG, num_layers=layers)
        return lambda scan: build(cfg, scan_layers=scan, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16, **kw)

    dots = {(layers, scan): str(_jaxpr(make(layers), scan)).count(" dot_general[")  # nested jaxprs included
            for layers in (6, 12) for scan in (False, True)}
    assert dots[12, False] > dots[6, False]  # unrolled: one copy of the layer per layer
    assert dots[12, True] == dots[6, True] < dots[6, False]  # scanned: one copy, whatever the depth
    scans = [e for e in _jaxpr(make(12, remat="dots"), True).eqns if e.primitive.name == "scan"]
    assert len(scans) == 2  # forward and backward
    forward = scans[0]
    first = forward.params["num_consts"] + forward.params["num_carry"]
    stacked = [v.aval for v in forward.invars[first:]]
    assert stacked and all(a.shape[0] == 12 and a.dtype == jnp.bfloat16 for a in stacked)  # a bf16 copy


def _relative_errors(got, want) -> tuple[float, np.ndarray]:
    """(logits' max error over their max, [per-parameter ||g - g_want|| / ||g_want||])."""
    logits = float(np.abs(got[0] - want[0]).max() / np.abs(want[0]).max())
    return logits, np.array([np.linalg.norm(got[1][k] - w) / np.linalg.norm(w) for k, w in want[1].items()])


def test_bf16_compute_scan_is_as_accurate_as_unrolled(reference):
    """bf16 compute (fp32 master weights): both paths round differently (the scan's stacked weight gradients
    are bf16 before they reach the fp32 parameters; the unrolled loop may keep them wider), so they agree to
    bf16 rounding, and against the fp32 model the scan is as accurate as the unrolled loop."""
    model, batch, want = reference
    bf16 = dict(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    unrolled = logits_and_grads(variant(model, lambda: build(**bf16)), **batch)
    scanned = logits_and_grads(variant(model, lambda: build(**bf16, scan_layers=True)), **batch)
    assert all(g.dtype == np.float32 for g in scanned[1].values())
    logits_u, grads_u = _relative_errors(unrolled, want)
    logits_s, grads_s = _relative_errors(scanned, want)
    assert logits_s < 0.03 and logits_s < 1.25 * logits_u
    assert np.median(grads_s) < 0.03 and np.median(grads_s) < 1.25 * np.median(grads_u)
    assert grads_s.max() < 0.08
    between_logits, between_grads = _relative_errors(scanned, unrolled)
    assert between_logits < 0.03 and np.median(between_grads) < 0.03


def test_sharded_scan_equals_unsharded_unrolled(reference):
    """fsdp and tp (data=2, fsdp=2, tp=2): the stacked copy is sharded as the layers' parameters are. Also
    extraction's path: per-example gradients in a vmap whose examples are sharded over the data axes (the
    stack's cotangent then carries the examples' axis)."""
    model, batch, want = reference  # 4 rows: one per (data, fsdp) shard
    mesh = make_mesh(data=2, fsdp=2, tp=2)
    graphdef, state = nnx.split(variant(model, lambda: build(scan_layers=True, remat="full")))
    state = jax.device_put(state, P.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        got = logits_and_grads(nnx.merge(graphdef, state), **batch)

        def example_loss(st, ids, mask):
            return _token_loss(nnx.merge(graphdef, st), ids[None], attention_mask=mask[None])[0]
        per_example = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0), spmd_axis_name=("data", "fsdp")))(
            state, batch["input_ids"], batch["attention_mask"])
    assert_same(got, want, atol=1e-5, rtol=1e-4)
    for name, g in P.flatten(per_example).items():  # equal-length rows: their mean is the batch's gradient
        assert g.shape[0] == 4
        np.testing.assert_allclose(np.asarray(g).mean(0), want[1][name], atol=1e-5, rtol=1e-4, err_msg=name)


def test_splash_attention_scan_equals_unrolled():
    """seq 128: the kernel (Pallas' interpreter here) on packed rows, in the scanned and the unrolled model."""
    seg = np.r_[np.full(50, 1), np.full(70, 2), np.zeros(8, int)][None]  # two packed examples and padding
    positions = np.r_[np.arange(50), np.arange(70), np.zeros(8, int)][None]
    ids = jnp.asarray(np.random.default_rng(1).integers(1, CFG.vocab_size, size=(1, 128)) * (seg > 0))
    unrolled = build(attention="splash", remat="full")
    scanned = variant(unrolled, lambda: build(attention="splash", remat="full", scan_layers=True))
    batch = dict(positions=jnp.asarray(positions), segment_ids=jnp.asarray(seg))
    assert_same(logits_and_grads(scanned, ids, **batch), logits_and_grads(unrolled, ids, **batch), atol=1e-5,
                rtol=1e-4)


def test_vl_scan_equals_unrolled_with_window_and_full_attention_blocks(monkeypatch):
    """Per-row images (the vision tower under a vmap over rows, as the trainer runs it), 8 vision blocks of
    which 3 attend fully (irregularly placed), 12 text layers, remat full: each scanned step picks its block's
    attention segments inside the checkpointed body. With model.attention = splash, the full-attention
    segments (128 patches: an 8x16 image) take the kernel inside the scan, the 16-patch windows XLA's attention."""
    from merit_jax.models import attention as A
    from merit_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, tiny_vl_hf_config
    from merit_jax.models.vision_layout import stacked_layouts
    from tests import vl_fixtures as F

    hf = tiny_vl_hf_config(F.VOCAB, F.TOKEN_IDS, text=dict(num_hidden_layers=12, num_attention_heads=4,
                                                           num_key_value_heads=2),
                           vision=dict(depth=8, fullatt_block_indexes=(2, 5, 7)))
    make = lambda **kw: Qwen2_5_VLForConditionalGeneration.from_hf_config(hf, rngs=nnx.Rngs(0), remat="full", **kw)
    unrolled = variant(F.random_vl_model(hf, std=0.1), make)
    scanned = variant(unrolled, lambda: make(scan_layers=True))
    monkeypatch.setitem(F.GRIDS, "big", (1, 8, 16))
    rows = [(["wide"], F.prompt(3, "wide", 4, seed=1)), (["big", "tall"], F.prompt(2, "big", 1, "tall", 2, seed=2))]
    t = max(len(ids) for _, ids in rows)
    ids = jnp.asarray(np.stack([np.pad(r, (0, t - len(r))) for _, r in rows]))
    mask = np.stack([np.arange(t) < len(r) for _, r in rows]).astype(np.int32)
    images = [F.pixels(g, seed=i) for i, (g, _) in enumerate(rows)]
    layout = jax.tree.map(jnp.asarray, stacked_layouts([grid for _, grid in images], unrolled.vl_config.vision))
    n = layout.patch_order.shape[1]
    pv = jnp.asarray(np.stack([np.pad(p, ((0, n - len(p)), (0, 0))) for p, _ in images]))
    kw = dict(pixel_values=pv, attention_mask=jnp.asarray(mask), vision_layout=layout,
              positions=jnp.asarray(np.broadcast_to(np.arange(t), ids.shape)))
    assert_same(logits_and_grads(scanned, ids, **kw), logits_and_grads(unrolled, ids, **kw), **FP32_TOL)

    # splash: one full-attention block among 8 (each unrolled kernel costs seconds to trace in the interpreter)
    hf["vision_config"]["fullatt_block_indexes"] = [3]
    assert layout.full.gather.shape[-1] == 128 and A.supported(128)
    calls = []
    real_fn = A.splash_segments
    monkeypatch.setattr(A, "splash_segments", lambda *a: (calls.append(1), real_fn(*a))[1])
    features = {}
    for scan in (False, True):
        model = variant(unrolled, lambda: make(attention="splash", scan_layers=scan))
        graphdef, state = nnx.split(model)
        features[scan] = np.asarray(jax.jit(lambda st: jax.vmap(nnx.merge(graphdef, st).visual)(pv, layout))(state))
    assert len(calls) == 2  # traced: the unrolled full-attention block, the scanned step
    np.testing.assert_allclose(features[True], features[False], **FP32_TOL)
