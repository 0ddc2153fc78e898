"""Corrupted files on disk get the same clean error as a bad record: `error: ...` naming the path (and the line
or tensor), exit 2, no traceback, nothing half-written. One test per reader and kind of damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from merit_jax.config import data_settings
from merit_jax import merging
from merit_jax.io import checkpoint
from merit_jax import artifacts as wd
from merit_jax.convert.__main__ import main as convert_main
from merit_jax.data import records
from merit_jax.errors import InputFileError
from merit_jax.io.load import load_model
from tests.hf_models import tiny_qwen2

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "merit_jax/data/assets/synthetic_tokenizer"


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def flip_bytes(path: Path, start: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Qwen2 with the synthetic mixture's tokenizer (vocabulary padded like Qwen's)."""
    path = tmp_path_factory.mktemp("hf") / "model"
    tiny_qwen2(path, vocab_size=384, num_hidden_layers=12, hidden_size=16, intermediate_size=24,
               num_attention_heads=4, num_key_value_heads=2)
    shutil.copytree(TOKENIZER, path, dirs_exist_ok=True)
    return path


@pytest.fixture()
def broken(hf_dir, tmp_path):
    """A fresh copy of the model directory to damage."""
    return Path(shutil.copytree(hf_dir, tmp_path / "broken"))


def convert(capsys, *argv):
    code = convert_main(list(argv))
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------ Hugging Face directories


@pytest.mark.parametrize("damage", ["truncate", "flip-header"])
def test_damaged_safetensors_is_named_by_the_converter(broken, tmp_path, capsys, damage):
    shard = broken / "model.safetensors"
    truncate(shard) if damage == "truncate" else flip_bytes(shard, 8)
    code, err = convert(capsys, "hf-to-orbax", "--hf", str(broken), "--out", str(tmp_path / "out"))
    assert code == 2 and f"error: {shard}: cannot read this safetensors file" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _shard(hf_dir: Path, out: Path) -> Path:
    """The model re-saved as several safetensors shards with an index."""
    from merit_jax.io.hf import save_hf

    save_hf(load_model(hf_dir), wd.read_json(hf_dir / "config.json"), out, max_shard_bytes=40_000)
    return out


def test_a_missing_shard_of_an_index_is_named_before_any_work(hf_dir, tmp_path, capsys):
    sharded = _shard(hf_dir, tmp_path / "sharded")
    index = wd.read_json(sharded / "model.safetensors.index.json")["weight_map"]
    victim = sorted(set(index.values()))[1]
    (sharded / victim).unlink()
    code, err = convert(capsys, "hf-to-orbax", "--hf", str(sharded), "--out", str(tmp_path / "out"))
    assert code == 2 and f"{sharded / victim}: missing (listed in model.safetensors.index.json" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(merging.MergeInputError, match=rf"{victim}"):  # the merge's own reader says the same
        merging.merge_checkpoints([sharded, hf_dir], tmp_path / "merged", method="uniform")
    assert not (tmp_path / "merged").exists()


def test_damaged_index_and_config_json_name_the_line(broken, tmp_path, capsys):
    (broken / "config.json").write_text('{"model_type": "qwen2",\n  "hidden_size": 16,\n  oops}\n')
    code, err = convert(capsys, "hf-to-orbax", "--hf", str(broken), "--out", str(tmp_path / "out"))
    assert code == 2 and f"{broken / 'config.json'}:3: invalid JSON" in err, err


def test_damaged_tokenizer_is_named(broken):
    from ml_collections import ConfigDict

    truncate(broken / "tokenizer.json", 0.3)
    from merit_jax.data.mixture import load_tokenizer

    cfg = ConfigDict({"data": {"tokenizer": str(broken), "path": ""}, "model": {"hf_path": str(broken)}})
    with pytest.raises(InputFileError, match=rf"{broken}: cannot read this tokenizer directory"):
        load_tokenizer(data_settings(cfg))


# ------------------------------------------------------------------------------ merit_jax checkpoints


@pytest.fixture(scope="module")
def ckpt_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    assert convert_main(["hf-to-orbax", "--hf", str(hf_dir), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage", ["delete-data-file", "truncate-data-file", "delete-metadata"])
def test_damaged_checkpoint_is_named(ckpt_dir, tmp_path, capsys, damage):
    ckpt = Path(shutil.copytree(ckpt_dir, tmp_path / "ckpt"))
    # Every data file: OCDBT keeps per-process copies beside the merged ones, and which file is largest (and
    # whether the reader needs it) depends on how the async writer's flushes fell, so one file is not enough.
    for f in sorted((ckpt / "params").rglob("d/*")):
        if damage == "delete-data-file":
            f.unlink()
        elif damage == "truncate-data-file":
            truncate(f, 0.3)
    if damage == "delete-metadata":
        (ckpt / "params" / "_METADATA").unlink()
    code, err = convert(capsys, "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"))
    assert code == 2 and str(ckpt / "params") in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    with pytest.raises(InputFileError, match=str(ckpt)):
        merging.merge_checkpoints([ckpt, ckpt_dir], tmp_path / "merged", method="uniform")
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------ task files


def _records(n=3):
    return [{"task": "t", "inputs": f"question {i}", "targets": f"answer {i}"} for i in range(n)]


def test_a_non_utf8_line_of_a_jsonl_task_file_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(r).encode() for r in _records()]
    lines[1] = lines[1][:20] + b"\xff\xfe" + lines[1][20:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputFileError, match=rf"{path}:2: not UTF-8 text \(byte 0xff at column 21\)"):
        list(records.iter_raw(path))


def test_a_non_utf8_json_task_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "t.json"
    text = json.dumps(_records(), indent=1).encode()
    at = text.index(b"answer 2")
    path.write_bytes(text[:at] + b"\xc3\x28" + text[at:])
    line = text[:at].count(b"\n") + 1
    with pytest.raises(InputFileError, match=rf"{path}:{line}: not UTF-8 text"):
        list(records.iter_raw(path))


def test_truncated_parquet_and_damaged_saved_dataset_are_named(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(_records(50))
    ds.to_parquet(str(tmp_path / "t.parquet"))
    truncate(tmp_path / "t.parquet", 0.6)
    with pytest.raises(InputFileError, match=rf"{tmp_path / 't.parquet'}: cannot read this Parquet file"):
        list(records.iter_raw(tmp_path / "t.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for arrow in (tmp_path / "saved").glob("*.arrow"):
        truncate(arrow, 0.5)
    with pytest.raises(InputFileError, match=rf"{tmp_path / 'saved'}.*cannot read this datasets.save_to_disk"):
        list(records.iter_raw(tmp_path / "saved"))


# ------------------------------------------------------------------------------ work-directory JSON


def test_truncated_partition_and_tasks_json_name_the_file(tmp_path):
    (tmp_path / "extract").mkdir()
    tasks = tmp_path / "extract" / "tasks.json"
    tasks.write_text('{"tasks": [{"name": "a", "n_calib": 3,\n')
    with pytest.raises(InputFileError, match=rf"{tasks}:2: invalid JSON"):
        wd.read_tasks(tasks)
    partition = tmp_path / "partition.json"
    partition.write_bytes(b'{"groups": [["a"]], "method": "\xff"}')
    with pytest.raises(InputFileError, match=rf"{partition}:1: not UTF-8"):
        wd.read_json(partition)


# ------------------------------------------------------------------------------ the pipeline's own entry


def test_the_pipeline_names_a_truncated_model_and_a_non_utf8_task_file(hf_dir, broken, tmp_path):
    truncate(broken / "model.safetensors")
    data = tmp_path / "tasks"
    data.mkdir()
    for name in ("a", "b"):
        (data / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    with open(data / "b.jsonl", "ab") as f:
        f.write(b'{"inputs": "caf\xe9", "targets": "x"}\n')  # latin-1, not UTF-8
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "merit_jax.main", "--config", "configs/default.py", "--config.basin.enabled=False"]
    model = subprocess.run([*base, "--workdir", str(tmp_path / "w1"), "--stage", "extract",
                            f"--config.model.hf_path={broken}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert model.returncode == 2, model.stderr[-2000:]
    assert f"error: {broken / 'model.safetensors'}: cannot read this safetensors file" in model.stderr
    assert "Traceback" not in model.stderr
    tasks = subprocess.run([*base, "--workdir", str(tmp_path / "w2"), "--stage", "extract",
                            f"--config.data.path={data}", f"--config.data.tokenizer={TOKENIZER}",
                            f"--config.model.hf_path={hf_dir}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert tasks.returncode == 2, tasks.stderr[-2000:]
    assert f"error: {data / 'b.jsonl'}:4: not UTF-8 text (byte 0xe9 at column 16)" in tasks.stderr, tasks.stderr[-2000:]
    assert not (tmp_path / "w2" / "extract" / "tasks.json").exists()


# ------------------------------------------------------------------------------ images and the processor


def test_truncated_or_garbled_images_and_a_damaged_processor_config_are_named(tmp_path):
    from PIL import Image

    from merit_jax.data import vision

    image = tmp_path / "cat.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)).save(image, quality=95)
    truncate(image, 0.5)
    with pytest.raises(vision.ImageError, match=rf"annotation.json \[record 3\]: unreadable image {image}"):
        vision.load_image(image, "annotation.json [record 3]")
    garbled = tmp_path / "dog.png"
    garbled.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(vision.ImageError, match=rf"unreadable image {garbled}"):
        vision.load_image(garbled, "annotation.json [record 4]")
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 3136, "max_pix')
    with pytest.raises(InputFileError, match=rf"{tmp_path / 'preprocessor_config.json'}"):
        vision.image_processor(tmp_path)
