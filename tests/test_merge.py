"""merit_jax.merge: exact weighted averages for both formats, the relative operators, validation, atomicity."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zlib

import ml_collections
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from merit_jax import merge, merging
from merit_jax.io import checkpoint
from merit_jax.merging import stream
from merit_jax.stages import merge as merge_stage

REPO = pathlib.Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------------------------- builders


def _hf_config(layers=12, tied=True, **extra):
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": layers, "vocab_size": 16,
            "tie_word_embeddings": tied, "torch_dtype": "float32", "rope_theta": 10000.0, **extra}


def _tensors(kind, seed, layers=12, tied=True, dtype=np.float32):
    """A small random model's tensors, named as HF ("a.b.weight") or merit_jax ("a/b/kernel") names them."""
    rng = np.random.default_rng(seed)
    shapes = {"embed_tokens": (16, 8), "norm": (8,)}
    for i in range(layers):
        shapes |= {f"layers.{i}.q_proj": (8, 8), f"layers.{i}.q_bias": (8,), f"layers.{i}.up_proj": (12, 8)}
    if not tied:
        shapes["lm_head"] = (16, 8)
    out = {}
    for short, shape in shapes.items():
        if kind == "hf":
            name = short + ".weight" if short == "lm_head" else f"model.{short}.weight"
        else:
            name = short.replace(".", "/") + "/kernel" if short == "lm_head" else "model/" + short.replace(".", "/")
        out[name] = rng.standard_normal(shape).astype(dtype)
    return out


def _write_hf(path, tensors, config, shards=1, tokenizer=True):
    path.mkdir(parents=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(path / fname), metadata={"format": "pt"})
            weight_map |= {n: fname for n in part}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (path / "tokenizer.json").write_text('{"version": "1.0"}')
        (path / "generation_config.json").write_text('{"do_sample": false}')
    return path


def _write(kind, path, tensors, config, **kw):
    if kind == "hf":
        return _write_hf(path, tensors, config, **kw)
    return checkpoint.save(path, tensors, config)


def _read_hf(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "np") as h:
            out |= {n: h.get_tensor(n) for n in h.keys()}
    return out


def _read(kind, path):
    return _read_hf(path) if kind == "hf" else checkpoint.load(path)


def _assert_close(got, ref, name):
    got = np.asarray(got, np.float64)
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    assert err <= 1e-6 * max(np.max(np.abs(ref)), 1e-30), f"{name}: max error {err}"


def _only(path):
    return sorted(p.name for p in path.iterdir())


# ------------------------------------------------------------------------------------------ pure math


@pytest.mark.parametrize("k", [2, 3, 8])
def test_merge_tensors_is_the_weighted_average(k):
    rng = np.random.default_rng(k)
    xs = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(k)]
    tokens = rng.integers(1, 1000, size=k)
    got = merging.merge_tensors(xs, tokens, "tokens")
    ref = sum(n * x.astype(np.float64) for n, x in zip(tokens, xs)) / tokens.sum()
    assert got.dtype == np.float32
    _assert_close(got, ref, "tokens")
    _assert_close(merging.merge_tensors(xs, None, "uniform"), np.mean(np.stack(xs).astype(np.float64), 0), "uniform")


def test_resolve_weights_rules(caplog):
    np.testing.assert_allclose(merging.resolve_weights("tokens", 3, [100, 300, 600]), [0.1, 0.3, 0.6])
    with caplog.at_level(logging.WARNING, logger="merit_jax.merging.ops"):
        np.testing.assert_allclose(merging.resolve_weights("weights", 2, [1, 3]), [0.25, 0.75])
    assert "sum to 4" in caplog.text
    np.testing.assert_allclose(merging.resolve_weights("ties", 4), [0.25] * 4)
    for method, n, w, msg in [("weights", 3, [1, 2], "2 weights given for 3 inputs"),
                              ("tokens", 2, [0, 0], "at least one must be positive"),
                              ("weights", 2, [1, -1], "non-negative"),
                              ("tokens", 2, None, "needs token counts"),
                              ("uniform", 2, [1, 1], "takes no weights"),
                              ("mean", 2, None, "unknown merge method")]:
        with pytest.raises(ValueError, match=msg):
            merging.resolve_weights(method, n, w)


def _ties_reference(xs, w, base, density, lam):
    """Element by element, straight from the TIES definition."""
    taus = [x.astype(np.float64).ravel() - base.astype(np.float64).ravel() for x in xs]
    n = taus[0].size
    keep = int(np.ceil(density * n))
    trimmed = []
    for t in taus:
        order = np.argsort(-np.abs(t), kind="stable")
        m = np.zeros(n)
        m[order[:keep]] = t[order[:keep]]
        trimmed.append(m)
    out = np.zeros(n)
    for j in range(n):
        gamma = np.sign(sum(wk * t[j] for wk, t in zip(w, trimmed)))
        agree = [(wk, t[j]) for wk, t in zip(w, trimmed) if t[j] != 0 and np.sign(t[j]) == gamma]
        if agree:
            out[j] = sum(wk * v for wk, v in agree) / sum(wk for wk, _ in agree)
    return (base.astype(np.float64).ravel() + lam * out).reshape(base.shape)


def test_relative_methods_follow_their_definitions():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 5)).astype(np.float32)
    xs = [base + rng.standard_normal(base.shape).astype(np.float32) for _ in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    ref_ta = base + 0.7 * sum(wk * (x.astype(np.float64) - base) for wk, x in zip(w, xs))
    _assert_close(merging.merge_tensors(xs, w, "task_arithmetic", base, lam=0.7), ref_ta, "task_arithmetic")
    # λ = 1 task arithmetic is the plain weighted average
    _assert_close(merging.merge_tensors(xs, w, "task_arithmetic", base),
                  merging.merge_tensors(xs, w, "weights").astype(np.float64), "ta λ=1")

    got = merging.merge_tensors(xs, w, "ties", base, density=0.3, lam=0.9)
    _assert_close(got, _ties_reference(xs, w, base, 0.3, 0.9), "ties")
    assert np.count_nonzero(merging.ties_trim(xs[0] - base, 0.3)) == int(np.ceil(0.3 * base.size))

    # DARE: p = 0 is task arithmetic; otherwise survivors are rescaled by 1/(1-p), seeded, and p of them drop
    _assert_close(merging.merge_tensors(xs, w, "dare", base, drop_p=0.0),
                  merging.merge_tensors(xs, w, "task_arithmetic", base).astype(np.float64), "dare p=0")
    tau = rng.standard_normal(20000).astype(np.float32)
    dropped = merging.dare_drop(tau, 0.75, np.random.default_rng(1))
    kept = dropped != 0
    assert abs(kept.mean() - 0.25) < 0.02
    np.testing.assert_allclose(dropped[kept], tau[kept] * 4.0, rtol=1e-6)
    a = merging.merge_tensors(xs, w, "dare", base, drop_p=0.5, seed=3)
    b = merging.merge_tensors(xs, w, "dare", base, drop_p=0.5, seed=3)
    c = merging.merge_tensors(xs, w, "dare", base, drop_p=0.5, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="pass base"):
        merging.merge_tensors(xs, w, "ties")


# ------------------------------------------------------------------------------- streaming, both formats


@pytest.mark.parametrize("kind", ["hf", "merit_jax"])
@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("tied", [True, False])
def test_merged_checkpoint_equals_numpy_average(tmp_path, kind, k, tied):
    tensors = [_tensors(kind, seed, tied=tied) for seed in range(k)]
    config = _hf_config(tied=tied)
    # HF inputs: one of them sharded with an index; tiny chunks so large tensors are cut into row blocks.
    inputs = [_write(kind, tmp_path / f"in{i}", t, config, **({"shards": 2} if kind == "hf" and i == 1 else {}))
              for i, t in enumerate(tensors)]
    tokens = np.random.default_rng(k).integers(1, 10**6, size=k)
    out = merging.merge_checkpoints(inputs, tmp_path / "out", method="tokens", weights=tokens.tolist(),
                                    chunk_bytes=128, max_shard_bytes=600)
    merged = _read(kind, out)
    assert set(merged) == set(tensors[0])
    for name in tensors[0]:
        ref = sum(n * t[name].astype(np.float64) for n, t in zip(tokens, tensors)) / tokens.sum()
        assert merged[name].dtype == np.float32 and merged[name].shape == ref.shape
        _assert_close(merged[name], ref, name)
    record = json.loads((out / merging.MERGE_INFO_FILE).read_text())
    assert record["method"] == "tokens"
    np.testing.assert_allclose(record["weights"], tokens / tokens.sum())
    if kind == "hf":
        assert json.loads((out / "config.json").read_text()) == config
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors[0])
        assert len(set(index["weight_map"].values())) > 1
        assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    else:
        assert checkpoint.read_hf_config(out) == config
    assert _only(tmp_path) == sorted([f"in{i}" for i in range(k)] + ["out"])


def test_hf_output_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                   tie_word_embeddings=False)
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(tmp_path / f"m{seed}")
        states.append({k: v.float().numpy() for k, v in model.state_dict().items()})
    out = tmp_path / "merged"
    assert merge.main([*sum([["--ckpt", str(tmp_path / f"m{s}")] for s in range(3)], []),
                       "--weights", "0.5,0.25,0.25", "--out", str(out)]) == 0
    merged = transformers.Qwen2ForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.bfloat16
    for name, value in merged.state_dict().items():
        ref = 0.5 * states[0][name] + 0.25 * states[1][name] + 0.25 * states[2][name]
        got = value.float().numpy()
        # bf16 output: within one bf16 rounding of the fp32 average
        np.testing.assert_allclose(got, ref, rtol=2**-8, atol=1e-6, err_msg=name)


def test_bf16_inputs_keep_dtype_or_take_the_requested_one(tmp_path):
    tensors = [_tensors("hf", s, dtype=BF16) for s in range(2)]
    inputs = [_write_hf(tmp_path / f"in{i}", t, _hf_config(torch_dtype="bfloat16")) for i, t in enumerate(tensors)]
    same = _read_hf(merging.merge_checkpoints(inputs, tmp_path / "same", method="uniform"))
    wide = merging.merge_checkpoints(inputs, tmp_path / "wide", method="uniform", dtype="float32")
    wide_tensors = _read_hf(wide)
    assert json.loads((wide / "config.json").read_text())["torch_dtype"] == "float32"
    for name in tensors[0]:
        ref = (tensors[0][name].astype(np.float32) + tensors[1][name].astype(np.float32)) / 2
        assert same[name].dtype == BF16 and wide_tensors[name].dtype == np.float32
        _assert_close(wide_tensors[name], ref.astype(np.float64), name)
        np.testing.assert_array_equal(same[name], ref.astype(BF16))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_streamed_relative_methods_equal_the_pure_function(tmp_path, method):
    base = _tensors("merit_jax", 100)
    rng = np.random.default_rng(7)
    branches = [{n: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
                for _ in range(3)]
    base_path = checkpoint.save(tmp_path / "base", base, _hf_config())
    inputs = [checkpoint.save(tmp_path / f"b{i}", t, _hf_config()) for i, t in enumerate(branches)]
    opts = dict(lam=0.8, density=0.4, drop_p=0.3, seed=5)
    out = merging.merge_checkpoints(inputs, tmp_path / "out", method=method, weights=[1, 2, 1], base=base_path,
                                    **opts)
    merged = checkpoint.load(out)
    for name in base:
        expected = merging.merge_tensors([b[name] for b in branches], [1, 2, 1], method, base[name],
                                         lam=0.8, density=0.4, drop_p=0.3, seed=(5, zlib.crc32(name.encode())))
        np.testing.assert_array_equal(merged[name], expected, err_msg=name)
    with pytest.raises(merging.MergeInputError, match="--base"):
        merging.merge_checkpoints(inputs, tmp_path / "out2", method=method)


def test_sharded_placement_gives_the_same_merge(tmp_path):
    tensors = [_tensors("merit_jax", s) for s in range(2)]
    inputs = [checkpoint.save(tmp_path / f"in{i}", t, _hf_config()) for i, t in enumerate(tensors)]
    host = checkpoint.load(merging.merge_checkpoints(inputs, tmp_path / "host", method="weights", weights=[0.3, 0.7]))
    dev = checkpoint.load(merging.merge_checkpoints(inputs, tmp_path / "dev", method="weights", weights=[0.3, 0.7],
                                                    placement=merging.fsdp_placement()))
    for name in host:
        np.testing.assert_array_equal(host[name], dev[name])


def test_merit_jax_output_is_written_in_batches_of_groups(tmp_path, monkeypatch):
    # The merged model is never assembled: consecutive groups go to the checkpoint writer in about
    # MAX_WRITES batches, each written (one Orbax partial save) as soon as it is full.
    tensors = [_tensors("merit_jax", s, layers=4) for s in range(3)]
    inputs = [checkpoint.save(tmp_path / f"in{i}", t, _hf_config(layers=4)) for i, t in enumerate(tensors)]
    writes, real_write = [], checkpoint.Writer.write

    def recording_write(self, part):
        writes.append({name: np.asarray(x).nbytes for name, x in part.items()})
        return real_write(self, part)

    monkeypatch.setattr(checkpoint.Writer, "write", recording_write)
    monkeypatch.setattr(stream, "MAX_WRITES", 4)
    chunk = 200
    out = merging.merge_checkpoints(inputs, tmp_path / "out", method="uniform", chunk_bytes=chunk)

    groups = [[name for name, _, _ in g] for g in merging.plan_pieces(checkpoint.tensor_specs(inputs[0]), chunk, False)]
    writes = [w for w in writes if w]  # the final (possibly empty) rest
    assert [n for w in writes for n in w] == [n for g in groups for n in g]  # each tensor once, in plan order
    ends = {g[-1] for g in groups}
    assert all(list(w)[-1] in ends for w in writes)  # batches of whole groups
    batch = sum(x.nbytes for x in tensors[0].values()) // 4
    assert len(groups) > 8 and 3 <= len(writes) <= 5
    for w in writes[:-1]:
        last_group = next(g for g in groups if g[-1] == list(w)[-1])
        assert sum(w.values()) >= batch > sum(w.values()) - sum(w[n] for n in last_group)  # full, not more
    merged = checkpoint.load(out)
    for name in tensors[0]:
        _assert_close(merged[name], np.mean([t[name].astype(np.float64) for t in tensors], axis=0), name)


def test_sharded_merge_on_four_devices(tmp_path):
    # Each device holds and merges only its shard of every tensor (the multi-host path, on fake devices).
    tensors = [_tensors("merit_jax", s) for s in range(3)]
    inputs = [checkpoint.save(tmp_path / f"in{i}", t, _hf_config()) for i, t in enumerate(tensors)]
    script = textwrap.dedent(
        """
        import sys, jax
        from merit_jax import merging
        assert jax.device_count() == 4
        shapes = []
        place = merging.fsdp_placement()
        def recording_place(name, shape):
            sharding = place(name, shape)
            shapes.append(sharding.shard_shape(shape))
            return sharding
        merging.merge_checkpoints(sys.argv[2:], sys.argv[1], method="tokens", weights=[5, 3, 2],
                                  placement=recording_place)
        assert (4, 8) in shapes, shapes  # the 16 x 8 embedding, split four ways
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), *map(str, inputs)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = checkpoint.load(tmp_path / "out")
    for name in tensors[0]:
        ref = sum(w * t[name].astype(np.float64) for w, t in zip([0.5, 0.3, 0.2], tensors))
        _assert_close(merged[name], ref, name)


# ---------------------------------------------------------------------------------------- validation


def _mismatch_cases():
    base = _tensors("hf", 0)
    renamed = dict(base)
    renamed["model.layers.0.k_proj.weight"] = renamed.pop("model.layers.0.q_proj.weight")
    other_dtype = dict(base)
    other_dtype["model.norm.weight"] = other_dtype["model.norm.weight"].astype(np.float16)
    other_shape = dict(base)
    other_shape["model.norm.weight"] = np.zeros(9, np.float32)
    return {
        "layer_count": (_tensors("hf", 1, layers=13), _hf_config(layers=13), r"model\.layers\.12\..*3 extra"),
        "renamed": (renamed, _hf_config(), r"model\.layers\.0\.q_proj\.weight.* missing"),
        "dtype": (other_dtype, _hf_config(), r"model\.norm\.weight.*dtype float16"),
        "shape": (other_shape, _hf_config(), r"model\.norm\.weight.*shape \(9,\)"),
        "config": (_tensors("hf", 1), _hf_config(rope_theta=5.0), r"config.json.*key rope_theta \(10000.0 vs 5.0\)"),
    }


@pytest.mark.parametrize("case", list(_mismatch_cases()))
@pytest.mark.parametrize("kind", ["hf", "merit_jax"])
def test_mismatched_inputs_are_refused_and_nothing_is_written(tmp_path, case, kind):
    tensors, config, msg = _mismatch_cases()[case]
    if kind == "merit_jax":  # the same mismatch in merit_jax naming
        tensors = {n.replace(".weight", "").replace(".", "/"): v for n, v in tensors.items()}
        msg = msg.replace(r"\.weight", "").replace(r"\.", "/")
    first = {n.replace(".weight", "").replace(".", "/"): v for n, v in _tensors("hf", 0).items()} \
        if kind == "merit_jax" else _tensors("hf", 0)
    a = _write(kind, tmp_path / "a", first, _hf_config())
    b = _write(kind, tmp_path / "b", tensors, config)
    with pytest.raises(merging.MergeInputError, match=rf"input .*b does not match .*a: .*{msg}"):
        merging.merge_checkpoints([a, b], tmp_path / "out", method="uniform")
    assert _only(tmp_path) == ["a", "b"]


def test_missing_unreadable_and_mixed_inputs(tmp_path):
    a = _write_hf(tmp_path / "a", _tensors("hf", 0), _hf_config())
    with pytest.raises(merging.MergeInputError, match=r"input .*nope does not exist"):
        merging.merge_checkpoints([a, tmp_path / "nope"], tmp_path / "out")
    bad = _write_hf(tmp_path / "bad", _tensors("hf", 1), _hf_config())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(merging.MergeInputError, match=r"bad/model\.safetensors is not a readable safetensors"):
        merging.merge_checkpoints([a, bad], tmp_path / "out")
    sharded = _write_hf(tmp_path / "sh", _tensors("hf", 2), _hf_config(), shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(merging.MergeInputError, match="shard model-00002-of-00002.safetensors .* missing"):
        merging.merge_checkpoints([a, sharded], tmp_path / "out")
    mj = checkpoint.save(tmp_path / "mj", _tensors("merit_jax", 0), _hf_config())
    with pytest.raises(merging.MergeInputError, match="merit_jax checkpoint but .*a is hf"):
        merging.merge_checkpoints([a, mj], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(merging.MergeInputError, match="neither a merit_jax checkpoint .* nor a Hugging Face"):
        merging.merge_checkpoints([a, empty], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # an existing output is not replaced without overwrite
    with pytest.raises(FileExistsError, match="overwrite"):
        merging.merge_checkpoints([a, a], mj)
    assert merge.main(["--ckpt", str(a), "--ckpt", str(empty), "--out", str(tmp_path / "out")]) == 2


# ----------------------------------------------------------------------------------------- atomicity


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from merit_jax import merge
    from merit_jax.merging import stream
    real = stream._merge_group
    calls = [0]
    def merge_group_then_die(*a, **k):
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    stream._merge_group = merge_group_then_die
    sys.exit(merge.main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("kind", ["hf", "merit_jax"])
def test_killed_merge_leaves_nothing_that_looks_complete(tmp_path, kind):
    inputs = [_write(kind, tmp_path / f"in{i}", _tensors(kind, i), _hf_config()) for i in range(2)]
    out = tmp_path / "out"
    args = ["--ckpt", str(inputs[0]), "--ckpt", str(inputs[1]), "--out", str(out), "--chunk-mb", "0.0001"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, "4", *args], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    for leftover in tmp_path.iterdir():
        if leftover.name.startswith("in"):
            continue
        assert leftover.name.startswith("."), leftover
        assert not checkpoint.is_checkpoint(leftover) and not (leftover / "config.json").exists()
    # the same command, not killed, completes and cleans up after the killed run
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, "-1", *args], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _only(tmp_path) == ["in0", "in1", "out"]
    merged = _read(kind, out)
    for name, a in _tensors(kind, 0).items():
        _assert_close(merged[name], (a.astype(np.float64) + _tensors(kind, 1)[name]) / 2, name)


def test_failure_mid_merge_writes_nothing(tmp_path, monkeypatch):
    inputs = [_write_hf(tmp_path / f"in{i}", _tensors("hf", i), _hf_config()) for i in range(2)]
    real, calls = stream._merge_group, []

    def fail_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real(*a, **k)

    monkeypatch.setattr(stream, "_merge_group", fail_on_third)
    with pytest.raises(OSError, match="injected"):
        merging.merge_checkpoints(inputs, tmp_path / "out", chunk_bytes=64)
    assert _only(tmp_path) == ["in0", "in1"]


# ------------------------------------------------------------------------------------- the stage form


def test_stage_merges_branches_with_token_weights_and_skips_when_done(tmp_path, caplog):
    workdir = tmp_path / "wd"
    tokens = [300, 100]
    (workdir / "split").mkdir(parents=True)
    (workdir / "split" / "partition.json").write_text(json.dumps(
        {"method": "merit", "depth": 1, "groups": [["a"], ["b"]], "tokens": tokens, "weights": [0.75, 0.25]}))
    branches = [_tensors("merit_jax", s) for s in range(2)]
    for k, t in enumerate(branches):
        checkpoint.save(workdir / "branches" / str(k) / "final", t, _hf_config())
    cfg = ml_collections.ConfigDict({"seed": 0, "merge": {"method": "tokens", "weights": [], "dtype": ""}})
    out = merge_stage.run(cfg, workdir)
    assert out == workdir / "merged" and checkpoint.is_checkpoint(out)
    merged = checkpoint.load(out)
    for name in branches[0]:
        _assert_close(merged[name], 0.75 * branches[0][name].astype(np.float64) + 0.25 * branches[1][name], name)
    stamp = (out / "merit_jax.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="merit_jax.stages.merge"):
        merge_stage.run(cfg, workdir)
    assert "skipping" in caplog.text and (out / "merit_jax.json").stat().st_mtime_ns == stamp

    cfg.merge.method = "ties"
    with pytest.raises(merging.MergeInputError, match="needs θ⁰"):
        merge_stage.run(cfg, _fresh_copy(workdir, tmp_path / "wd2"))


def _fresh_copy(workdir, dst):
    shutil.copytree(workdir / "split", dst / "split")
    shutil.copytree(workdir / "branches", dst / "branches")
    return dst
