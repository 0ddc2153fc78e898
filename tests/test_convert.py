"""HF -> merit_jax checkpoint -> HF round trips, and loading a model from either kind of directory."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from merit_jax.io import checkpoint
from merit_jax.convert.__main__ import main as convert_main
from merit_jax.io.load import load_model
from tests.hf_models import tiny_qwen2


def _hf_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_round_trip_is_bit_identical(tmp_path, tied, dtype):
    ref = tiny_qwen2(tmp_path / "hf", tie_word_embeddings=tied, num_hidden_layers=12)
    if dtype != torch.float32:
        ref.to(dtype).save_pretrained(tmp_path / "hf")
    assert convert_main(["hf-to-orbax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert checkpoint.is_checkpoint(tmp_path / "ckpt")
    out_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    assert convert_main(["orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"),
                         "--dtype", out_dtype]) == 0
    a, b = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def test_model_from_checkpoint_equals_model_from_hf(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    convert_main(["hf-to-orbax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    ids = jnp.asarray(np.arange(20).reshape(2, 10) % 97)
    a = load_model(tmp_path / "hf")(ids)
    b = load_model(tmp_path / "ckpt")(ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_errors_name_the_problem(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "merit_jax.convert", "orbax-to-hf", "--ckpt",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
