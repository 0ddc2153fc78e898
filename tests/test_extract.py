"""The extract stage: per-example gradients, their reductions, sharding, memory, the stage's outputs, errors.

Two models: a random tiny HF Qwen2 (tests/hf_models.py) for exactness tests, and the synthetic mixture's
shipped tiny model (θ⁰ from the basin stage with 0 steps) for the stage. The split-level comparisons of the
reductions (sketch and stride against full) and the family separation are made at the default θ⁰, in
tests/test_default_split.py.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from merit_jax import gradients as X
from merit_jax import sketch as sk
from merit_jax import partition as S
from merit_jax.losses import mean_loss
from merit_jax.models import params as P
from merit_jax.io.load import load_model
from merit_jax.sharding import make_mesh
from merit_jax.stages import extract as extract_stage
from tests.hf_models import tiny_qwen2

OPTIONS = X.ExtractOptions(reduction="sketch", dim=512, micro_chunk=3, seed=3, keep_example_sketches=True)
FAST = {"xla_backend_optimization_level": 0}  # XLA CPU compiles ~3x faster; same arithmetic
DEPTH = 12  # real depth: two-digit layer indices ("layers/10" sorts before "layers/2" as a string)
N_EXAMPLES = 5  # 2 micro-chunks of 3 (one padded row); 2 of 4 on the 8-device mesh (3 padded rows)


def random_batch(n: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch dict of n right-padded examples of different lengths, answers after a random prompt."""
    rng = np.random.default_rng(seed)
    b = {k: np.zeros((n, seq_len), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    b["loss_mask"] = np.zeros((n, seq_len), np.float32)
    for i in range(n):
        length = int(rng.integers(seq_len // 2, seq_len + 1))
        ids = rng.integers(1, vocab, size=length)
        prompt = int(rng.integers(1, length - 1))
        b["input_ids"][i, :length] = ids
        b["targets"][i, :length - 1] = ids[1:]
        b["loss_mask"][i, prompt:length - 1] = 1.0
        b["segment_ids"][i, :length] = 1
        b["positions"][i, :length] = np.arange(length)
    return b


def loop_grads(model, batch, names):
    """Reference: a Python loop of single-example jax.grad calls (no vmap): losses [n], [{name: grad}]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def one(state, row):
        def loss(s):
            m = nnx.merge(graphdef, s)
            logits = m(row["input_ids"], positions=row["positions"], segment_ids=row["segment_ids"])
            return mean_loss(logits, row["targets"], row["loss_mask"])
        return jax.value_and_grad(loss)(state)

    losses, rows = [], []
    for i in range(len(batch["input_ids"])):
        value, grads = one(state, {k: jnp.asarray(v[i:i + 1]) for k, v in batch.items()})
        flat = P.flatten(grads)
        losses.append(float(value))
        rows.append({n: np.asarray(flat[n]) for n in names})
    return np.array(losses), rows


def unflatten(x, layout):
    return {n: x[o:o + s].reshape(sh) for n, o, s, sh in zip(layout.names, layout.offsets, layout.sizes,
                                                             layout.shapes)}


@functools.lru_cache(maxsize=None)
def _row_reducer(layout, reduction, d, s, seed):
    return jax.jit(jax.vmap(lambda x: sk.reduce_flat(unflatten(x, layout), layout, reduction, d=d, s=s, seed=seed)))


def sketch_rows(rows_np, layout, d, seed):
    """sketch_vector of each row of a [k, P] array (one compilation per layout and d)."""
    return np.asarray(_row_reducer(layout, "sketch", d, 1, seed)(jnp.asarray(rows_np, jnp.float32)))


def concat(flat, names):
    return np.concatenate([np.ravel(flat[n]) for n in names])


# --------------------------------------------------------------------------------------------------
# A random tiny HF model: exactness
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    tiny_qwen2(path, seed=0, std=0.1, num_hidden_layers=DEPTH)
    return path


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_model(hf_dir)


@pytest.fixture(scope="module")
def names(model):
    return X.select_params(list(P.flatten(model)))


@pytest.fixture(scope="module")
def batch(model):
    return random_batch(N_EXAMPLES, 16, model.config.vocab_size, seed=1)


@pytest.fixture(scope="module")
def extractor(model, names):
    return X.TaskExtractor(model, names, OPTIONS, compiler_options=FAST)


@pytest.fixture(scope="module")
def reference(model, batch, names):
    return loop_grads(model, batch, names)


def test_parameter_filter_defaults_drop_embeddings_and_head(model, names):
    everything = list(P.flatten(model))
    assert "model/embed_tokens/embedding" in everything and "lm_head/kernel" in everything
    assert set(everything) - set(names) == {"model/embed_tokens/embedding", "lm_head/kernel"}
    only_mlp = X.select_params(everything, include=[r"/mlp/"], exclude=["layers/[1-9]"])
    assert only_mlp and all("/mlp/" in n and "layers/0/" in n for n in only_mlp)


def test_vmap_per_example_grads_equal_a_python_loop(model, batch, names, reference):
    ref_losses, ref_grads = reference
    losses, grads = X.per_example_grads(model, batch, names)
    np.testing.assert_allclose(np.asarray(losses), ref_losses, rtol=1e-5)
    for i, ref in enumerate(ref_grads):
        for n in names:
            np.testing.assert_allclose(np.asarray(grads[n][i]), ref[n], rtol=1e-4, atol=1e-6,
                                       err_msg=f"example {i}, tensor {n}")


@pytest.mark.parametrize("per_example", X.PER_EXAMPLE)
def test_task_extraction_equals_reductions_of_the_loop(model, batch, names, reference, extractor, per_example):
    """The compiled micro-chunked scan (with a padded row, and a padded chunk) gives the loop's losses, norms,
    tokens, the reduced weighted mean and the per-example sketches, for every example weighting."""
    ext = X.TaskExtractor(model, names, X.ExtractOptions(**{**OPTIONS.__dict__, "per_example": per_example}),
                          compiler_options=FAST)
    result = ext(batch, task="t", chunks=3)
    assert result.n == N_EXAMPLES
    ref_losses, ref_grads = reference
    rows = np.stack([concat(g, names) for g in ref_grads]).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    tokens = batch["loss_mask"].sum(1)
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(result.norms, norms, rtol=1e-5)
    np.testing.assert_array_equal(result.tokens, tokens)
    w = sk.example_weights(per_example, norms, tokens)
    mean = w @ rows / w.sum()
    expected, *per_example_sketch = sketch_rows(np.vstack([mean, rows]), extractor.layout, OPTIONS.dim,
                                                OPTIONS.seed)
    np.testing.assert_allclose(result.vector, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    per_example_sketch = np.stack(per_example_sketch)
    np.testing.assert_allclose(result.example_sketches, per_example_sketch, rtol=1e-4,
                               atol=1e-5 * np.abs(per_example_sketch).max())


def test_sharded_extraction_on_8_devices_equals_unsharded(hf_dir, names, batch, extractor):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = make_mesh(data=2, fsdp=2, tp=2)
    sharded_model = load_model(hf_dir, mesh=mesh)
    kernel = P.flatten(sharded_model)["model/layers/0/mlp/up_proj/kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp")  # really sharded
    ext = X.TaskExtractor(sharded_model, names, OPTIONS, mesh=mesh, compiler_options=FAST)
    assert ext.batch_axes == ("data", "fsdp") and ext.micro_chunk == 4  # rounded up from 3
    got, want = ext(batch, task="t"), extractor(batch, task="t", chunks=3)
    np.testing.assert_allclose(got.vector, want.vector, rtol=1e-4, atol=1e-5 * np.abs(want.vector).max())
    np.testing.assert_allclose(got.norms, want.norms, rtol=1e-5)
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)
    np.testing.assert_allclose(got.example_sketches, want.example_sketches, rtol=1e-4,
                               atol=1e-5 * np.abs(want.example_sketches).max())


def family_batch(family: int, task: int, vocab: int, n: int = 8, seq_len: int = 16) -> dict[str, np.ndarray]:
    """A task of family 0-3: random prompts, answers drawn from its super-family's two tokens and its own one
    (families {0, 1} and {2, 3} share answer tokens), so the gradients have a two-level structure."""
    rng = np.random.default_rng([family, task])
    answer_tokens = np.array([10 + 2 * (family // 2), 11 + 2 * (family // 2), 20 + family])
    b = {k: np.zeros((n, seq_len), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    b["loss_mask"] = np.zeros((n, seq_len), np.float32)
    for i in range(n):
        ids = np.concatenate([rng.integers(30, vocab, size=10), rng.choice(answer_tokens, size=5)])
        b["input_ids"][i, :15], b["targets"][i, :14] = ids, ids[1:]
        b["loss_mask"][i, 9:14] = 1.0
        b["segment_ids"][i, :15], b["positions"][i, :15] = 1, np.arange(15)
    return b


def test_sketch_stride_and_full_give_the_same_split_at_real_depth(model, names):
    """At 12 layers (two-digit indices) every reduction runs, and the depth-2 split of 8 tasks in 4 families
    is the families' one for full, sketch and stride alike."""
    assert len(model.model.layers) >= 12
    batches = [family_batch(f, t, model.config.vocab_size) for f in range(4) for t in range(2)]
    tokens = [b["loss_mask"].sum() for b in batches]
    families = {frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}), frozenset({6, 7})}
    for reduction in sk.REDUCTIONS:
        options = X.ExtractOptions(reduction=reduction, dim=1024, stride=7, micro_chunk=4,
                                   keep_example_sketches=False)
        ext = X.TaskExtractor(model, names, options, compiler_options=FAST)
        grads = np.stack([ext(b, task=str(i)).vector for i, b in enumerate(batches)])
        groups = S.conflict_split(grads, tokens, 2)
        assert {frozenset(g) for g in groups} == families, (reduction, groups)
        top = {frozenset(groups[0] + groups[1]), frozenset(groups[2] + groups[3])}
        assert top == {frozenset(range(4)), frozenset(range(4, 8))}, (reduction, groups)


# --------------------------------------------------------------------------------------------------
# Memory: per-example buffers scale with the micro-chunk, never with n
# --------------------------------------------------------------------------------------------------

def _all_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():  # sub-jaxprs: scan bodies, pjit, custom_vjp, ...
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns"):
                    shapes |= _all_shapes(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    shapes |= _all_shapes(sub.jaxpr)
    return shapes


@pytest.fixture(scope="module")
def small_model():
    from merit_jax.models.config import ModelConfig
    from merit_jax.models.qwen2 import Qwen2ForCausalLM
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16)
    return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))


def test_no_array_scales_with_n_times_parameters(small_model):
    names = X.select_params(list(P.flatten(small_model)))
    chunk, n = 2, 12
    ext = X.TaskExtractor(small_model, names, X.ExtractOptions(reduction="full", micro_chunk=chunk, dim=64),
                          compiler_options=FAST)
    shapes = _all_shapes(ext.trace_jaxpr(n, 8).jaxpr)
    for name, shape in zip(ext.layout.names, ext.layout.shapes):
        assert (chunk, *shape) in shapes, f"no per-example gradient of {name} at micro-chunk size"
        for bad in [(n, *shape), (n // chunk, chunk, *shape)]:
            assert bad not in shapes, f"an array of shape {bad} ([n, ...] per-example gradients) exists"


def test_compiled_temp_memory_is_flat_in_n_and_grows_with_the_micro_chunk(small_model):
    names = X.select_params(list(P.flatten(small_model)))
    p_bytes = 4 * sum(int(np.prod(np.shape(v))) for k, v in P.flatten(small_model).items() if k in names)

    def temp_bytes(chunk, n):
        ext = X.TaskExtractor(small_model, names, X.ExtractOptions(reduction="full", micro_chunk=chunk,
                                                                    keep_example_sketches=False),
                              compiler_options=FAST)
        return ext.lower(n, 8).compile().memory_analysis().temp_size_in_bytes

    few, many, wide = temp_bytes(2, 4), temp_bytes(2, 64), temp_bytes(16, 16)
    assert many <= few + 4 * 64 * 8 * 8, (few, many)  # n x 16: only the few int per-token inputs may grow
    assert wide >= few + 8 * p_bytes, (few, wide)  # 14 more per-example gradients of P floats each


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

def test_errors_name_the_task(model, names, batch, extractor, hf_dir):
    empty = {k: v[:0] for k, v in batch.items()}
    with pytest.raises(ValueError, match="'alpha'.*no calibration example"):
        extractor(empty, task="alpha")
    silent = {k: v.copy() for k, v in batch.items()}
    silent["loss_mask"][2] = 0.0
    with pytest.raises(ValueError, match=r"'beta'.*example\(s\) \[2\] have no supervised token"):
        extractor(silent, task="beta")
    broken = load_model(hf_dir)
    kernel = broken.model.layers[0].mlp.up_proj.kernel
    kernel[...] = kernel[...].at[0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="'gamma'.*NaN"):
        X.TaskExtractor(broken, names, OPTIONS, compiler_options=FAST)(batch, task="gamma", chunks=3)
    zero = X.TaskResult(np.zeros(8, np.float32), np.ones(3, np.float32), np.ones(3, np.float32),
                        np.ones(3, np.float32), None)
    with pytest.raises(FloatingPointError, match="'delta'.*all zeros"):
        X.check_result(zero, "delta")
    zero_example = X.TaskResult(np.ones(8, np.float32), np.ones(3, np.float32), np.array([1, 0, 1], np.float32),
                                np.ones(3, np.float32), None)
    with pytest.raises(FloatingPointError, match=r"'eps'.*\[1\] have a zero gradient.*unit"):
        X.check_result(zero_example, "eps", "unit")
    X.check_result(zero_example, "eps", "mean")  # only a warning when nothing has to be normalised


def test_input_errors():
    with pytest.raises(ValueError, match="'t'.*no calibration example"):
        X.check_calibration("t", [], 10)

    class Ex:
        def __init__(self, ids, mask):
            self.input_ids, self.loss_mask = np.array(ids), np.array(mask, bool)

    with pytest.raises(ValueError, match="'t'.*example 1 has no supervised token"):
        X.check_calibration("t", [Ex([1, 2], [0, 1]), Ex([1, 2], [0, 0])], 10)
    with pytest.raises(ValueError, match="'t'.*token id 12 >= the model's vocab_size 10"):
        X.check_calibration("t", [Ex([1, 12], [0, 1])], 10)
    with pytest.raises(ValueError, match="no parameter matches"):
        X.select_params(["a/kernel"], include=["b"])
    with pytest.raises(ValueError, match="extract.exclude: invalid regex"):
        X.select_params(["a/kernel"], exclude=["("])
    with pytest.raises(ValueError, match="extract.reduction"):
        X.ExtractOptions(reduction="pca")
    with pytest.raises(ValueError, match="extract.per_example"):
        X.ExtractOptions(per_example="median")
    from merit_jax import config
    cfg = get_config()
    cfg.extract.update(remat="some", pack=True)  # and the default keeps per-example sketches
    with pytest.raises(ValueError, match=r"extract.remat='some'.*; extract.pack=True packs the batched path"):
        config.validate(cfg)
    # extract.logits_chunk: -1 takes model.logits_chunk, 0 whole rows, below -1 is refused by name
    cfg = get_config()
    assert config.extract_options(cfg).logits_chunk == cfg.model.logits_chunk > 0
    cfg.extract.logits_chunk = 0
    assert config.extract_options(cfg).logits_chunk == 0
    del cfg.extract["logits_chunk"]  # a config written before the key: the model's
    cfg.model.logits_chunk = 64
    assert config.extract_options(cfg).logits_chunk == 64
    for bad in (-2, "all", 0.5):
        if "logits_chunk" in cfg.extract:  # a ConfigDict field keeps its first type
            del cfg.extract["logits_chunk"]
        cfg.extract.logits_chunk = bad
        with pytest.raises(ValueError, match=r"extract.logits_chunk=.*: -1 \(model.logits_chunk\)"):
            config.validate(cfg)


# --------------------------------------------------------------------------------------------------
# Reductions (pure functions)
# --------------------------------------------------------------------------------------------------

def _flat(rng, shapes):
    return {f"t{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}


def test_stride_takes_every_sth_coordinate_of_the_concatenation():
    flat = _flat(np.random.default_rng(0), [(5, 7), (3,), (4, 6), (11,)])
    layout = sk.Layout.of(flat)
    x = concat(flat, layout.names)
    for s in (1, 2, 7, 13, 200):
        got = np.asarray(sk.stride_vector({k: jnp.asarray(v) for k, v in flat.items()}, layout, s))
        np.testing.assert_array_equal(got, x[::s])
        assert got.shape == (sk.output_dim(layout, "stride", s=s),)
    np.testing.assert_array_equal(np.asarray(sk.full_vector(flat, layout)), x)


def test_countsketch_is_unbiased_with_the_documented_variance():
    rng = np.random.default_rng(0)
    x = _flat(rng, [(40, 30), (30,), (25, 20)])
    y = {k: (0.6 * v + 0.8 * rng.normal(size=v.shape)).astype(np.float32) for k, v in x.items()}
    layout = sk.Layout.of(x)
    xv, yv = concat(x, layout.names).astype(np.float64), concat(y, layout.names).astype(np.float64)
    d, seeds = 64, 400
    inner = jax.jit(jax.vmap(lambda s: sk.sketch_vector(x, layout, d, s) @ sk.sketch_vector(y, layout, d, s)))
    est = np.asarray(inner(jnp.arange(seeds)), np.float64)
    true = xv @ yv
    var = (xv @ xv * (yv @ yv) + true ** 2 - 2 * np.sum(xv ** 2 * yv ** 2)) / d
    assert abs(est.mean() - true) < 4 * np.sqrt(var / seeds), (est.mean(), true)
    assert 0.75 < est.var() / var < 1.25, (est.var(), var)
    a, b = np.asarray(sk.sketch_vector(x, layout, d, 1)), np.asarray(sk.sketch_vector(x, layout, d, 1))
    np.testing.assert_array_equal(a, b)  # seeded: deterministic


def test_gram_stability_and_layout_helpers():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 1000))
    np.testing.assert_allclose(sk.gram_blockwise(rows, block=77), rows @ rows.T, rtol=1e-10)
    cos = sk.cosine_from_gram(rows @ rows.T)
    np.testing.assert_allclose(cos, S.cosine_matrix(rows), atol=1e-6)
    with pytest.raises(ValueError, match=r"rows \[1\] have zero norm"):
        sk.cosine_from_gram(np.diag([1.0, 0.0]))
    mu = rng.normal(size=64)
    examples = mu + 2.0 * rng.normal(size=(50, 64))
    w = np.ones(50)
    small, full = (sk.stability_cosines(examples, w, m, 30, np.random.default_rng(1)) for m in (5, 50))
    np.testing.assert_allclose(full, 1.0)
    assert small.mean() < 0.95 * full.mean()
    layout = sk.Layout.of({"a": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="'a' has shape"):
        layout.check({"a": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="missing"):
        layout.check({"b": np.zeros((2, 3))})


# --------------------------------------------------------------------------------------------------
# The stage on the shipped synthetic mixture
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(cfg, workdir, tasks.json record) after the extract stage (reduction=full, 16 calibration examples)
    on the default 8-device mesh, at the θ⁰ the basin stage makes with basin.steps=0: the shipped random
    tiny model (cheap: no training)."""
    from merit_jax.stages import basin
    workdir = tmp_path_factory.mktemp("wd")
    cfg = get_config()
    cfg.basin.steps = 0
    cfg.extract.n_calib = 16
    cfg.extract.reduction = "full"
    cfg.extract.xla_options = FAST
    basin.run(cfg, workdir)
    return cfg, workdir, extract_stage.run(cfg, workdir)


def test_stage_outputs(synthetic):
    from merit_jax.data.synthetic import families
    cfg, workdir, record = synthetic
    out = workdir / "extract"
    tasks = record["tasks"]
    assert [t["name"] for t in tasks] == sorted(families())
    assert all(t["n_calib"] == 16 and t["train_tokens"] > 0 and t["family"] == families()[t["name"]]
               for t in tasks)
    assert json.loads((out / "tasks.json").read_text()) == record
    grads = np.load(out / "task_grads.npy")
    assert grads.dtype == np.float32 and grads.shape == (len(tasks), record["params"]["coordinates"])
    assert record["dim"] == grads.shape[1] and record["reduction"] == "full"
    assert not any("embed_tokens" in n or "lm_head" in n for n in record["params"]["names"])
    np.testing.assert_allclose(np.load(out / "gram.npy"), grads.astype(np.float64) @ grads.T.astype(np.float64),
                               rtol=1e-6, atol=1e-12)
    norms = json.loads((out / "example_norms.json").read_text())
    assert set(norms) == {t["name"] for t in tasks}
    assert all(len(v["grad_norm"]) == 16 and min(v["grad_norm"]) > 0 for v in norms.values())
    stab = json.loads((out / "stability.json").read_text())
    assert stab["m"] == [10] and stab["tasks"] == [len(tasks)] and 0 < stab["mean"][0] <= 1
    assert not (out / ".partial").exists()
    # complete: a second run is skipped (nothing rewritten)
    mtime = (out / "task_grads.npy").stat().st_mtime_ns
    assert extract_stage.run(cfg, workdir) == record
    assert (out / "task_grads.npy").stat().st_mtime_ns == mtime


def test_interrupted_stage_resumes_with_identical_outputs(synthetic, monkeypatch):
    cfg, workdir, record = synthetic
    out = workdir / "extract"
    full = np.load(out / "task_grads.npy")
    real_call, calls = X.TaskExtractor.__call__, []
    reference = " (stability reference)"  # each task's second call: its disjoint stability reference

    def interrupted(self, batch, task="?", **kw):
        if len(calls) == 5 and not task.endswith(reference):
            raise KeyboardInterrupt
        if task.endswith(reference):
            return real_call(self, batch, task, **kw)
        calls.append(task)
        return real_call(self, batch, task, **kw)

    monkeypatch.setattr(X.TaskExtractor, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_stage.run(cfg, workdir, force=True)
    assert len(list((out / ".partial").glob("task*.json"))) == 5
    assert not (out / "tasks.json").exists()  # an interrupted run never looks complete
    monkeypatch.setattr(X.TaskExtractor, "__call__", lambda self, batch, task="?", **kw: (
        task.endswith(reference) or calls.append(task), real_call(self, batch, task, **kw))[1])
    resumed = extract_stage.run(cfg, workdir)
    assert calls[5:] == [t["name"] for t in record["tasks"][5:]]  # the first five were not recomputed
    assert resumed == record
    np.testing.assert_array_equal(np.load(out / "task_grads.npy"), full)


def test_layout_order_is_the_names_not_the_dict_order():
    """jax.grad / lax.scan hand dicts back with string-sorted keys ("layers/10" before "layers/2"): the layout
    orders tensors by name with numeric indices, whatever order a dict comes in, and every reduction of the
    same tensors is the same vector."""
    rng = np.random.default_rng(0)
    names = [f"model/layers/{i}/mlp/kernel" for i in range(12)] + ["model/norm/scale"]
    module_order = {n: rng.normal(size=(3, i % 4 + 1)).astype(np.float32) for i, n in enumerate(names)}
    string_order = dict(sorted(module_order.items()))
    assert list(string_order)[2] == "model/layers/10/mlp/kernel"
    layout = sk.Layout.of(string_order)
    assert layout == sk.Layout.of(module_order) and list(layout.names) == names
    for reduction in sk.REDUCTIONS:
        a = np.asarray(sk.reduce_flat(module_order, layout, reduction, d=16, s=3))
        b = np.asarray(sk.reduce_flat(string_order, layout, reduction, d=16, s=3))
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(sk.full_vector(string_order, layout)), concat(module_order, names))


@pytest.mark.parametrize("per_example", ["mean", "tokens"])
def test_batched_gradients_give_the_per_example_paths_vectors(hf_dir, model, names, batch, per_example):
    """One gradient of the weighted loss per micro-chunk equals the weighted sum of per-example gradients, at
    12 layers, on one device and sharded over 8; it keeps losses and tokens but has no per-example norms."""
    base = dict(reduction="sketch", dim=512, micro_chunk=3, seed=3, per_example=per_example,
                keep_example_sketches=False)
    want = X.TaskExtractor(model, names, X.ExtractOptions(**base, gradients="per_example"),
                           compiler_options=FAST)(batch, task="t", chunks=3)
    batched = X.ExtractOptions(**base)
    assert batched.batched  # auto: nothing per-example is asked for
    got = X.TaskExtractor(model, names, batched, compiler_options=FAST)(batch, task="t", chunks=3)
    assert got.norms is None and got.example_sketches is None
    np.testing.assert_allclose(got.vector, want.vector, rtol=1e-4, atol=1e-5 * np.abs(want.vector).max())
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    mesh = make_mesh(data=2, fsdp=2, tp=2)
    sharded = X.TaskExtractor(load_model(hf_dir, mesh=mesh), names, batched, mesh=mesh, compiler_options=FAST)
    np.testing.assert_allclose(sharded(batch, task="t").vector, want.vector, rtol=1e-4,
                               atol=1e-5 * np.abs(want.vector).max())
    with pytest.raises(ValueError, match="gradients=batched gives no per-example"):
        X.ExtractOptions(**{**base, "per_example": "unit"}, gradients="batched")


def _examples(batch) -> list:
    """The Examples of a right-padded batch dict (one per row)."""
    from merit_jax.data.tokenize import Example
    out = []
    for i in range(len(batch["input_ids"])):
        n = int(batch["segment_ids"][i].sum())
        mask = np.zeros(n, bool)
        mask[1:] = batch["loss_mask"][i, :n - 1] > 0  # a target's mask sits on the token before it
        out.append(Example(task="t", input_ids=batch["input_ids"][i, :n], loss_mask=mask, prompt_len=1, answer=""))
    return out


@pytest.mark.parametrize("per_example", ["mean", "tokens"])
def test_packed_rows_give_the_per_example_paths_vectors(hf_dir, model, names, per_example):
    """extract.pack: a task's examples packed several to a row give the vector, losses and tokens of one
    example per row, at 12 layers, on one device and sharded over 8."""
    from merit_jax.data.packing import pad_batch, packed_batch

    examples = _examples(random_batch(11, 16, model.config.vocab_size, seed=4))
    padded = pad_batch(examples, 32)
    packed, rows = packed_batch(examples, 32)
    assert len(rows) < len(examples) and max(len(r) for r in rows) >= 2  # really packed
    assert sorted(np.unique(packed["example_index"][packed["example_index"] >= 0])) == list(range(11))
    base = dict(reduction="sketch", dim=512, micro_chunk=3, seed=3, per_example=per_example,
                keep_example_sketches=False)
    want = X.TaskExtractor(model, names, X.ExtractOptions(**base, gradients="per_example"),
                           compiler_options=FAST)(padded, task="t")
    options = X.ExtractOptions(**base, pack=True)
    got = X.TaskExtractor(model, names, options, compiler_options=FAST)(packed, task="t", chunks=4)
    np.testing.assert_allclose(got.vector, want.vector, rtol=1e-4, atol=1e-5 * np.abs(want.vector).max())
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    if per_example == "mean":  # (one sharded compile suffices: the weights are the host's)
        mesh = make_mesh(data=2, fsdp=2, tp=2)
        sharded = X.TaskExtractor(load_model(hf_dir, mesh=mesh), names, options, mesh=mesh, compiler_options=FAST)
        np.testing.assert_allclose(sharded(packed, task="t").vector, want.vector, rtol=1e-4,
                                   atol=1e-5 * np.abs(want.vector).max())
    with pytest.raises(ValueError, match="extract.pack=True packs the batched path"):
        X.ExtractOptions(**{**base, "keep_example_sketches": True}, pack=True)
    with pytest.raises(ValueError, match="has no 'example_index'"):
        X.TaskExtractor(model, names, options, compiler_options=FAST)(padded, task="t")


def test_batched_gradients_hold_no_per_example_gradient_in_memory(small_model):
    names = X.select_params(list(P.flatten(small_model)))
    p_bytes = 4 * sum(int(np.prod(np.shape(v))) for k, v in P.flatten(small_model).items() if k in names)

    def temp_bytes(chunk, gradients):
        options = X.ExtractOptions(reduction="full", micro_chunk=chunk, keep_example_sketches=False,
                                   gradients=gradients)
        ext = X.TaskExtractor(small_model, names, options, compiler_options=FAST)
        return ext.lower(16, 8).compile().memory_analysis().temp_size_in_bytes

    per_example, batched = temp_bytes(16, "per_example"), temp_bytes(16, "batched")
    # 16 per-example gradients of P floats each (less what XLA overlaps) against one chunk gradient
    assert per_example >= batched + 6 * p_bytes, (per_example, batched, p_bytes)


def test_stability_against_a_disjoint_reference_is_unbiased():
    """Examples g_i = μ + σ ε_i: the cosine between an m-example mean and a disjoint R-example reference
    matches its value over fresh independent draws (unbiased), where the mean of all n (which contains the
    subset) reads higher."""
    rng = np.random.default_rng(0)
    d, n, r, m, sigma = 256, 200, 400, 25, 4.0
    mu = rng.normal(size=d)
    calib = mu + sigma * rng.normal(size=(n, d))
    reference = (mu + sigma * rng.normal(size=(r, d))).mean(0)
    disjoint = sk.stability_cosines(calib, np.ones(n), m, 400, np.random.default_rng(1), reference)
    self_ref = sk.stability_cosines(calib, np.ones(n), m, 400, np.random.default_rng(1))

    def fresh():  # the quantity the protocol estimates: independent m- and R-example means
        a = (mu + sigma * rng.normal(size=(m, d))).mean(0)
        b = (mu + sigma * rng.normal(size=(r, d))).mean(0)
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    truth = np.mean([fresh() for _ in range(400)])
    assert abs(disjoint.mean() - truth) < 0.02, (disjoint.mean(), truth)
    assert self_ref.mean() > truth + 0.03, (self_ref.mean(), truth)


def test_bf16_master_weights_extract_the_float32_direction(hf_dir, names, batch, extractor):
    """bf16 parameters and compute at 12 layers: the task gradient points where the float32 one does."""
    bf16 = load_model(hf_dir, dtype="bfloat16", compute_dtype="bfloat16")
    assert P.flatten(bf16)["model/layers/11/mlp/up_proj/kernel"].dtype == jnp.bfloat16
    got = X.TaskExtractor(bf16, names, OPTIONS, compiler_options=FAST)(batch, task="t", chunks=3)
    want = extractor(batch, task="t", chunks=3)
    cos = got.vector @ want.vector / np.linalg.norm(got.vector) / np.linalg.norm(want.vector)
    assert got.vector.dtype == np.float32 and cos > 0.99, cos
    np.testing.assert_allclose(got.losses, want.losses, rtol=0.05)


def test_the_stability_reference_is_disjoint_and_leaves_the_calibration_examples_alone():
    import types

    from ml_collections import ConfigDict

    from merit_jax.config import data_settings
    from merit_jax.data.mixture import _split_task

    indexed = [(i, types.SimpleNamespace(i=i, supervised_tokens=3)) for i in range(300)]

    def split(reference):
        cfg = ConfigDict({"data": {"seed": 0, "heldout_fraction": 0.1, "heldout_max": 16},
                          "extract": {"n_calib": 200, "stability_reference": reference}})
        return _split_task("t", indexed, 300, data_settings(cfg), None)

    without, with_ref = split(0), split(1000)
    assert [e.i for e in with_ref.calib] == [e.i for e in without.calib] and not without.reference
    calib, reference = {e.i for e in with_ref.calib}, {e.i for e in with_ref.reference}
    assert len(reference) == 300 - 16 - 200 and not calib & reference  # all that is left, none shared
    assert not reference & {e.i for e in with_ref.heldout}


@pytest.mark.parametrize("name", sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                                        if p.stem != "__init__"))
def test_every_shipped_config_gives_valid_extraction_settings(name):
    """Each config's extract.* builds the typed settings the stage and the plan use (ExtractOptions checks its
    own combinations), with an integer extract.logits_chunk >= -1 and a micro-chunk of at least one row."""
    import importlib

    from merit_jax import config
    cfg = importlib.import_module(f"configs.{name}").get_config()
    settings = config.extract_settings(cfg)
    assert settings.options.micro_chunk >= 1 and settings.options.logits_chunk >= 0
    assert isinstance(cfg.extract.get("logits_chunk", -1), int) and cfg.extract.get("logits_chunk", -1) >= -1
