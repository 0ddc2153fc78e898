"""The CountSketch's two forms (merit_jax.sketch: `scatter`, the reference, and `matmul`, for TPUs) and the
extraction's sharded accumulator: the scatter gives what the raveled scatter it replaced gave, bit for bit;
the matmul form gives the same linear map to float32 rounding, also per example (vmap) and on 8 devices with
tensors sharded along a minor axis; a TPU mesh picks the matmul form and the compiled task function then
holds no scatter and no replicated accumulator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from merit_jax import gradients as X
from merit_jax import sketch as sk
from merit_jax.sharding import make_mesh

# 12 layers of a transformer's shapes at tiny widths (two-digit layer names), values over 10 decades
SHAPES = {**{f"model/layers/{i}/{k}": s for i in range(12) for k, s in (
    ("mlp/down_proj/kernel", (96, 64)), ("self_attn/q_proj/bias", (64,)), ("self_attn/k_proj/kernel", (64, 2, 16)))},
    "model/norm/scale": (64,)}


def gradient(seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 10.0 ** rng.integers(-8, 3, s))
            for k, s in SHAPES.items()}


def raveled_scatter(flat, layout, d, seed):
    """The sketch as it was written before (every tensor raveled): the bit-for-bit reference."""
    out = jnp.zeros((d,), jnp.float32)
    for name, shape in zip(layout.names, layout.shapes):
        bucket, sign = sk.hash_buckets(shape, sk.tensor_key(seed, name), d)
        out = out.at[jnp.ravel(bucket)].add(jnp.ravel(sign * flat[name].astype(jnp.float32)))
    return out


def float64_sketch(flat, layout, d, seed):
    out = np.zeros(d)
    for name, shape in zip(layout.names, layout.shapes):
        bucket, sign = sk.hash_buckets(shape, sk.tensor_key(seed, name), d)
        np.add.at(out, np.asarray(bucket).ravel(), (np.asarray(sign, np.float64) * np.asarray(flat[name])).ravel())
    return out


def test_scatter_is_bit_identical_and_matmul_equal_to_float32_rounding():
    flat = gradient()
    layout = sk.Layout.of(flat)
    d = 256
    old = np.asarray(jax.jit(lambda f: raveled_scatter(f, layout, d, 3))(flat))
    scatter = np.asarray(jax.jit(lambda f: sk.sketch_vector(f, layout, d, 3))(flat))
    matmul = np.asarray(jax.jit(lambda f: sk.sketch_vector(f, layout, d, 3, "matmul"))(flat))
    np.testing.assert_array_equal(scatter, old)
    exact = float64_sketch(flat, layout, d, 3)
    for got in (scatter, matmul):  # both: float32 sums of the same terms, in other orders
        assert np.abs(got - exact).max() < 1e-6 * np.abs(exact).max()
    with pytest.raises(ValueError, match="multiple of 128"):
        sk.sketch_vector(flat, layout, 200, 3, "matmul")
    # per-example sketches (vmapped) and a tensor whose values need all three bfloat16 parts
    stacked = {k: jnp.stack([v, -2 * v, v + 1e-3]) for k, v in flat.items()}
    per_example = jax.jit(jax.vmap(lambda f: sk.sketch_vector(f, layout, 256, 0, "matmul")))(stacked)
    for i in range(3):
        one = {k: v[i] for k, v in stacked.items()}
        exact = float64_sketch(one, layout, 256, 0)
        assert np.abs(np.asarray(per_example[i]) - exact).max() < 1e-6 * np.abs(exact).max()
    parts = sk._bf16_parts(jnp.float32(np.pi * 1e-5))
    assert float(sum(p.astype(jnp.float32) for p in parts)) == np.float32(np.pi * 1e-5)


def test_matmul_sketch_of_tensors_sharded_along_a_minor_axis_on_8_devices():
    mesh = make_mesh(1, 8, 1)
    flat = gradient(1)
    layout = sk.Layout.of(flat)

    def spec(shape):  # the fsdp axis on the last dimension that divides: a raveled shard is not contiguous
        axis = max((i for i, n in enumerate(shape) if n % 8 == 0), default=None)
        return PartitionSpec(*[("fsdp" if i == axis else None) for i in range(len(shape))])

    sharded = {k: jax.device_put(v, NamedSharding(mesh, spec(v.shape))) for k, v in flat.items()}
    exact = float64_sketch(flat, layout, 512, 0)
    for method in sk.SKETCH_METHODS:
        got = np.asarray(jax.jit(lambda f: sk.sketch_vector(f, layout, 512, 0, method))(sharded))
        assert np.abs(got - exact).max() < 1e-6 * np.abs(exact).max(), method


def test_a_tpu_mesh_takes_the_matmul_sketch_and_keeps_the_accumulator_sharded():
    from merit_jax import config, hardware, plan
    from merit_jax import plan_programs as pp
    from tests.test_plan import TINY12
    from tests.test_train_utils import make_config

    assert X.sketch_method_for(make_mesh(1, 8, 1), 4096) == "scatter" and X.sketch_method_for(None, 4096) == "scatter"
    cfg = make_config(**{**TINY12, "model.tiny.num_hidden_layers": 2, "extract.keep_example_sketches": False})
    topo = hardware.topology("v5p-8")
    mesh = make_mesh(1, 4, 1, devices=hardware.devices(topo))
    assert X.sketch_method_for(mesh, 4096) == "matmul" and X.sketch_method_for(mesh, 4000) == "scatter"
    st = config.settings(cfg)
    model = pp.abstract_model(plan.hf_config_of(st), st.train, mesh)
    fn, args, ex = pp.extract_step(st.extract, st.data.max_len, model, mesh, None)
    assert ex.plan.sketch_method == "matmul"
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        hlo = fn.trace(*args).lower().compile().as_text()
    assert " scatter(" not in hlo and pp.uncosted_ops(hlo) == 0
    # the loops carry each accumulator as a quarter of its parameter (fsdp 4), never the whole one
    loops = [line for line in hlo.splitlines() if " while(" in line]
    whole = {f"f32[{r},{c}]" for r, c in (s for s in ex.layout.shapes if len(s) == 2)}
    assert loops and not any(w in line for w in whole for line in loops)


def test_the_tpu_sketch_holds_one_tensor_of_hashes_at_a_time():
    """Compiled for a v5p-8 (deviceless), the matmul sketch of a 12-layer gradient sharded over fsdp 4 needs
    temporaries well below the gradient's own size: each tensor's buckets are hashed only after the previous
    tensor's sums (0.25x here; unchained, XLA hashed many tensors at once: 0.58x here, 2.1x for four layers of
    Qwen2.5-3B)."""
    from merit_jax import hardware

    mesh = make_mesh(1, 4, 1, devices=hardware.devices(hardware.topology("v5p-8")))
    shapes = {f"model/layers/{i}/mlp/{k}/kernel": (512, 1024) for i in range(12) for k in ("up_proj", "down_proj")}
    sharding = NamedSharding(mesh, PartitionSpec("fsdp", None))
    flat = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding) for k, s in shapes.items()}
    layout = sk.Layout.of(flat)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(lambda f: sk.sketch_vector(f, layout, 4096, 0, "matmul")).trace(flat).lower().compile()
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes < 0.35 * memory.argument_size_in_bytes, (memory.temp_size_in_bytes,
                                                                              memory.argument_size_in_bytes)
