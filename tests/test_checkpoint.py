"""merit_jax.io.checkpoint: round trip, partial and sharded restore, atomicity, clear errors."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from merit_jax.io import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
HF_CONFIG = {"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 2, "tie_word_embeddings": True}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model/embed_tokens/embedding": rng.standard_normal((11, 8)).astype(np.float32),
        "model/layers/0/self_attn/q_proj/kernel": rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16),
        "model/layers/0/self_attn/q_proj/bias": jnp.asarray(rng.standard_normal(8), jnp.bfloat16),
        "model/layers/1/mlp/up_proj/kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
        "model/norm/scale": rng.standard_normal(8).astype(np.float16),
        "step": np.asarray(7, np.int32),
    }


def _bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.itemsize > 1 else x


def test_round_trip_is_bit_identical(tmp_path):
    params = _params()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"t": 1}')
    (tok / "chat_template.jinja").write_text("{{ x }}")
    (tok / "unrelated.bin").write_text("x")
    ckpt = checkpoint.save(tmp_path / "ckpt", params, HF_CONFIG, tokenizer_dir=tok)

    assert checkpoint.is_checkpoint(ckpt)
    assert json.loads((ckpt / "merit_jax.json").read_text()) == {"format": "merit_jax", "version": 1}
    assert checkpoint.read_hf_config(ckpt) == HF_CONFIG
    assert (ckpt / "tokenizer.json").read_text() == '{"t": 1}'
    assert (ckpt / "chat_template.jinja").is_file() and not (ckpt / "unrelated.bin").exists()
    # no temp directory left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]

    specs = checkpoint.tensor_specs(ckpt)
    assert specs == {k: (tuple(np.shape(v)), np.dtype(v.dtype)) for k, v in params.items()}
    loaded = checkpoint.load(ckpt)
    assert set(loaded) == set(params)
    for name, value in params.items():
        got = loaded[name]
        assert isinstance(got, np.ndarray), name
        assert got.dtype == np.dtype(value.dtype) and got.shape == np.shape(value), name
        np.testing.assert_array_equal(_bits(got), _bits(value), err_msg=name)


def test_partial_load(tmp_path):
    params = _params(1)
    ckpt = checkpoint.save(tmp_path / "c", params, HF_CONFIG)
    names = ["model/norm/scale", "model/layers/0/self_attn/q_proj/kernel"]
    loaded = checkpoint.load(ckpt, names=names)
    assert list(loaded) == names
    for n in names:
        np.testing.assert_array_equal(_bits(loaded[n]), _bits(params[n]))
    with pytest.raises(KeyError, match="model/nope"):
        checkpoint.load(ckpt, names=["model/nope"])


def test_load_into_sharding(tmp_path):
    params = _params(2)
    ckpt = checkpoint.save(tmp_path / "c", params, HF_CONFIG)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    loaded = checkpoint.load(ckpt, names=["model/layers/1/mlp/up_proj/kernel"], shardings=sharding)
    got = loaded["model/layers/1/mlp/up_proj/kernel"]
    assert isinstance(got, jax.Array) and got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(params["model/layers/1/mlp/up_proj/kernel"]))


def test_sharded_save_and_load_on_four_devices(tmp_path):
    # A fresh process, because the host device count is fixed when jax starts.
    script = textwrap.dedent(
        """
        import sys, numpy as np, jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from merit_jax.io import checkpoint
        assert jax.device_count() == 4, jax.devices()
        mesh = Mesh(np.array(jax.devices()), ("fsdp",))
        row = NamedSharding(mesh, P("fsdp", None))
        w = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8)
        w = jax.device_put(w.astype(jnp.bfloat16), row)
        path = sys.argv[1]
        checkpoint.save(path, {"model/w": w, "model/b": np.ones(3, np.float32)}, {"model_type": "qwen2"})
        col = NamedSharding(mesh, P(None, "fsdp"))
        out = checkpoint.load(path, names=["model/w"], shardings={"model/w": col})["model/w"]
        assert out.sharding == col and out.dtype == jnp.bfloat16
        assert {s.data.shape for s in out.addressable_shards} == {(8, 2)}
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.arange(64, dtype=np.float32).reshape(8, 8))
        # the streaming Writer: each device's shard written on its own, read back resharded
        streamed = path + "-streamed"
        with checkpoint.Writer(streamed, {"model_type": "qwen2"}) as writer:
            writer.write({"model/w": w})
            writer.write({"model/b": np.ones(3, np.float32)})
            writer.commit()
        out = checkpoint.load(streamed, names=["model/w"], shardings={"model/w": col})["model/w"]
        assert out.sharding == col and out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.arange(64, dtype=np.float32).reshape(8, 8))
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_writer_streams_the_same_checkpoint_as_save(tmp_path):
    params = _params(6)
    names = list(params)
    saved = checkpoint.save(tmp_path / "saved", params, HF_CONFIG)
    target = tmp_path / "streamed"
    with checkpoint.Writer(target, HF_CONFIG, extra_json={"how.json": {"parts": 3}}) as writer:
        for part in (names[:1], names[1:4], names[4:]):
            writer.write({n: params[n] for n in part})
        assert not target.exists()  # nothing under the final name before commit
        assert writer.commit() == target
    assert checkpoint.is_checkpoint(target)
    assert json.loads((target / "merit_jax.json").read_text()) == {"format": "merit_jax", "version": 1}
    assert json.loads((target / "how.json").read_text()) == {"parts": 3}
    assert checkpoint.read_hf_config(target) == HF_CONFIG
    assert checkpoint.tensor_specs(target) == checkpoint.tensor_specs(saved)
    loaded = checkpoint.load(target)
    for name, value in params.items():
        assert isinstance(loaded[name], np.ndarray) and loaded[name].dtype == np.dtype(value.dtype), name
        np.testing.assert_array_equal(_bits(loaded[name]), _bits(value), err_msg=name)
    # partial and sharded loads, as from a saved checkpoint
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("x",)),
                                          jax.sharding.PartitionSpec())
    name = "model/layers/1/mlp/up_proj/kernel"
    got = checkpoint.load(target, names=[name], shardings=sharding)[name]
    assert isinstance(got, jax.Array) and got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(params[name]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "streamed"]


def test_writer_discards_everything_unless_committed(tmp_path):
    target = tmp_path / "c"
    with pytest.raises(RuntimeError, match="injected"):
        with checkpoint.Writer(target, HF_CONFIG) as writer:
            writer.write({"a": np.ones(3, np.float32)})
            with pytest.raises(ValueError, match="'a' was already written"):
                writer.write({"a": np.zeros(3, np.float32)})
            writer.write({"b": np.ones(2, np.float32)})
            raise RuntimeError("injected")
    assert list(tmp_path.iterdir()) == []
    with checkpoint.Writer(target, HF_CONFIG) as writer:
        with pytest.raises(ValueError, match="nothing was written"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []
    # an existing checkpoint is refused before anything is written, as by save
    checkpoint.save(target, {"w": np.ones(2, np.float32)}, HF_CONFIG)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.Writer(target, HF_CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_refuses_to_overwrite_unless_told(tmp_path):
    first, second = _params(3), _params(4)
    ckpt = checkpoint.save(tmp_path / "c", first, HF_CONFIG)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save(ckpt, second, HF_CONFIG)
    name = "model/embed_tokens/embedding"
    np.testing.assert_array_equal(checkpoint.load(ckpt, [name])[name], first[name])
    checkpoint.save(ckpt, second, {"model_type": "other"}, overwrite=True)
    np.testing.assert_array_equal(checkpoint.load(ckpt, [name])[name], second[name])
    assert checkpoint.read_hf_config(ckpt) == {"model_type": "other"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_save_leaves_nothing_complete(tmp_path):
    params = _params(5)
    params["model/bad"] = "not an array"
    with pytest.raises(TypeError, match="model/bad"):
        checkpoint.save(tmp_path / "c", params, HF_CONFIG)
    assert not (tmp_path / "c").exists()
    # A missing tokenizer directory is found before anything is written.
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        checkpoint.save(tmp_path / "c", _params(5), HF_CONFIG, tokenizer_dir=tmp_path / "no_such_tokenizer")
    assert not (tmp_path / "c").exists()
    assert not checkpoint.is_checkpoint(tmp_path / "c")


def test_killed_save_leaves_nothing_complete(tmp_path):
    # SIGKILL the writer while it is inside the Orbax save: the final name must not exist afterwards,
    # and a later save to the same name must succeed (the stale temp directory is discarded).
    script = textwrap.dedent(
        """
        import os, signal, sys, numpy as np, orbax.checkpoint as ocp
        from merit_jax.io import checkpoint
        real_save = ocp.Checkpointer.save
        def save_then_die(self, *a, **k):
            real_save(self, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        ocp.Checkpointer.save = save_then_die
        checkpoint.save(sys.argv[1], {"w": np.ones((4, 4), np.float32)}, {"model_type": "qwen2"})
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    target = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-c", script, str(target)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "c"]
    assert leftovers and not any(checkpoint.is_checkpoint(p) for p in leftovers)
    checkpoint.save(target, {"w": np.zeros((2,), np.float32)}, HF_CONFIG)
    assert checkpoint.is_checkpoint(target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_clear_errors_for_non_checkpoints(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match=r"hf.*merit_jax.json.*Hugging Face"):
        checkpoint.tensor_specs(hf)

    ckpt = checkpoint.save(tmp_path / "c", {"w": np.ones(2, np.float32)}, HF_CONFIG)
    (ckpt / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="incomplete.*config.json"):
        checkpoint.read_hf_config(ckpt)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "params" / "_METADATA").unlink()
    assert "incomplete" in checkpoint.checkpoint_problem(ckpt)
    (ckpt / "merit_jax.json").write_text('{"format": "other"}')
    with pytest.raises(checkpoint.CheckpointError, match="format"):
        checkpoint.check_checkpoint(ckpt)


def test_relative_paths_work(tmp_path, monkeypatch):
    """A user's `--workdir workdir/default` is relative; Orbax itself needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    params = {"model/norm/scale": np.arange(4, dtype=np.float32)}
    checkpoint.save("rel/ckpt", params, {"model_type": "qwen2"})
    assert checkpoint.tensor_specs("rel/ckpt") == {"model/norm/scale": ((4,), np.dtype(np.float32))}
    np.testing.assert_array_equal(checkpoint.load("rel/ckpt")["model/norm/scale"], params["model/norm/scale"])
