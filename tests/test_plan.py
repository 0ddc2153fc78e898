"""The planner: a tiny 12-layer bf16 model's train and eval steps and a tiny Qwen2.5-VL's train and extraction
steps compiled for TPU topologies without a TPU, the JSON's fields, the loop counting, a config too large for its chips
refused by name (the CLI), its bytes on CPU equal to the trainer's and the extractor's own compiles, and the
shipped architectures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.config import data_settings
from merit_jax import config
from merit_jax import hardware, plan
from merit_jax.config import mesh_for
from merit_jax.training.feed import to_global
from merit_jax.training.step import SplitModel, build_step_functions
from merit_jax import plan_programs as pp
from merit_jax.plan_programs import dot_flops
from tests.test_train_utils import REPO, make_config, random_params, set_key

FIELDS = ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "fits", "flops", "roofline_s", "tokens",
          "model_flops", "mfu_bound", "compile_s")
# 12 layers, 2 KV groups, bf16 compute, remat, the loss's logits in 4 chunks: the structure of the real configs
# at tiny widths. (The 12-layer extraction step alone takes ~15 s to compile: it is planned at 2 layers.)
TINY12 = {"model.tiny.num_hidden_layers": 12, "model.tiny.hidden_size": 64, "model.tiny.intermediate_size": 128,
          "model.compute_dtype": "bfloat16", "model.remat": "dots", "train.batch_size": 16, "train.seq_len": 128,
          "data.max_len": 128, "model.logits_chunk": 32, "extract.n_calib": 16, "extract.micro_chunk": 8,
          "train.eval_batch_size": 16, "train.xla_options": {}}


def check_programs(record, names):
    assert set(record["programs"]) == set(names)
    for name, p in record["programs"].items():
        assert all(p[k] is not None for k in FIELDS), (name, p)
        assert p["fits"] and p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
        assert p["flops"] > 0 and p["roofline_s"] > 0 and 0 < p["mfu_bound"] < 1


def test_tiny_model_on_a_tpu_topology_prints_the_table_and_every_json_field():
    from merit_jax.models import attention

    record = plan.plan(make_config(**TINY12), "v5p-8", programs=("train_step", "eval_step"), tokens=2_000_000, tasks=8)
    assert attention.INTERPRET is None  # restored: splash is interpreted on this CPU again
    assert (record["topology"], record["chips"], record["hbm_bytes_per_chip"]) == ("v5p-8", 4, 95 << 30)
    assert record["device_kind"] == "TPU v5" and record["mesh"] == {"data": 1, "fsdp": 4, "tp": 1}
    check_programs(record, ("train_step", "eval_step"))
    train_step = record["programs"]["train_step"]
    assert train_step["tokens"] == 16 * 128 and train_step["rows_per_chip"] == 4
    assert train_step["alias_bytes"] > 0  # the donated state
    assert train_step["loop_factor"] > 1.0  # the loss's 4 logits chunks are a loop: counted 4 times
    run = record["run"]
    assert run["source"] == "flags" and len(run["branches"]) == 4
    assert run["joint"]["steps"] == math.ceil(2e6 / (2048 * pp.PACK_FILL))  # rows filled as the packer fills them
    assert run["extract"]["seconds"] is None and run["merit_s"] is None  # the extraction step was not compiled
    text = plan.format_plan(record, "configs/default.py")
    for word in ("train_step", "eval_step", "v5p-8", "MFU bound", "extraction", "branch 3", "joint training", "merge"):
        assert word in text
    assert json.loads(json.dumps(record)) == record  # what --json writes


def test_tiny_vl_model_plans_its_image_rows():
    from configs import tiny_vl

    cfg = tiny_vl.get_config()
    for key, value in {"train.xla_options": {}, "model.compute_dtype": "bfloat16", "model.remat": "full",
                       "model.scan_layers": True}.items():
        set_key(cfg, key, value)
    # remat in the vision tower too: it once failed to trace (the eval step is the text one's, with images)
    record = plan.plan(cfg, "v5e-4", programs=("train_step", "extract_step"), tokens=100_000, tasks=4)
    check_programs(record, ("train_step", "extract_step"))
    programs = record["programs"]
    # 112 x 112 px images (data.image_max_pixels = 16 tokens): 8 fill a row of 128 in training, one per example
    assert programs["train_step"]["images_per_row"] == 8 and programs["extract_step"]["images_per_row"] == 1
    # one micro-chunk; the loop factor counts the scans over the decoder layers and vision blocks
    # (model.scan_layers), each with its trip count
    assert programs["extract_step"]["loop_factor"] > 1.0 and programs["extract_step"]["rows_per_chip"] == 4
    assert "branch 1" in plan.format_plan(record) and len(record["run"]["branches"]) == 2


def test_tiny_vl_model_with_splash_attention_compiles_for_a_tpu_slice():
    """The Pallas kernel cannot be partitioned by XLA: under a mesh both the language model's and the vision
    tower's segments (per-row images under the vmap over rows) run it per shard; here on 4 chips (fsdp 4)."""
    from configs import tiny_vl

    cfg = tiny_vl.get_config()
    # 224 x 224 px images: 256 patches, one 256-long segment per image in the full-attention blocks (a multiple
    # of the kernel's 128), 2 images per row of 128 tokens
    for key, value in {"train.xla_options": {}, "model.compute_dtype": "bfloat16", "model.remat": "full",
                       "model.scan_layers": True, "model.attention": "splash",
                       "data.image_max_pixels": 28 * 28 * 64}.items():
        set_key(cfg, key, value)
    record = plan.plan(cfg, "v5p-8", programs=("train_step", "extract_step"), tokens=100_000, tasks=4)
    check_programs(record, ("train_step", "extract_step"))
    assert record["programs"]["train_step"]["images_per_row"] == 2
    assert record["programs"]["train_step"]["kernel_flops"] > 0


def test_dot_flops_count_scans_by_their_trip_counts():
    def f(x, w):
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
        return jax.lax.cond(y.sum() > 0, lambda: y @ w, lambda: y)

    jaxpr = jax.make_jaxpr(f)(jnp.ones((8, 16)), jnp.ones((16, 16))).jaxpr
    one = 2 * 8 * 16 * 16
    assert dot_flops(jaxpr) == 6 * one and dot_flops(jaxpr, loops=False) == 2 * one


def test_loop_counting_makes_chunked_and_whole_logits_agree():
    """The same eval step with the loss's logits in 4 chunks (a loop) or at once: XLA alone sees 1/4 of the
    logits' flops in the chunked one; counted by trip count the two agree."""
    out = {}
    for chunk in (0, 32):  # one small layer: the logits (vocabulary 384) are half the matmuls
        cfg = make_config(**{**TINY12, "model.tiny.num_hidden_layers": 1, "model.tiny.intermediate_size": 64,
                             "model.logits_chunk": chunk})
        out[chunk] = plan.plan(cfg, "v5e-4", programs=("eval_step",), tokens=1, tasks=1)["programs"]["eval_step"]
    assert out[0]["loop_factor"] == 1.0 and out[32]["loop_factor"] > 1.3
    assert 0.98 < out[32]["flops"] / out[0]["flops"] < 1.05


def test_a_config_too_large_for_its_chips_is_refused_by_name(tmp_path):
    overrides = {"train.seq_len": 16384, "data.max_len": 16384, "train.batch_size": 16, "model.tiny.num_hidden_layers": 2}
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run([sys.executable, "-m", "merit_jax.plan", "--config", "configs/default.py", "--topology",
                           "v5e-4", "--programs", "train_step", "--tokens", "1000", "--tasks", "2", "--json",
                           str(tmp_path / "plan.json"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: train_step does not fit v5e-4" in proc.stderr and "raise train.grad_accum" in proc.stderr
    assert "train_step" in proc.stdout  # the table still shows what was measured
    assert json.loads((tmp_path / "plan.json").read_text())["programs"]["train_step"]["fits"] is False


def test_plan_bytes_on_cpu_equal_the_trainers_and_extractors_own_compiles():
    from merit_jax import gradients as extract
    from merit_jax.training.tiny import tiny_config
    from merit_jax.models.registry import model_factory
    from merit_jax.data.mixture import load_tokenizer

    cfg = make_config(**{**TINY12, "model.tiny.num_hidden_layers": 2, "train.xla_options": {}})
    record = plan.plan(cfg, "cpu", programs=("train_step", "extract_step", "fwd_bwd_step"), tokens=1, tasks=1)
    assert record["chips"] == len(jax.devices()) == 8 and record["programs"]["train_step"]["fits"] is None
    # the extraction's yardstick: one forward+backward of its micro-chunk, and the ratios over the same tokens
    fwd_bwd, extract_step = record["programs"]["fwd_bwd_step"], record["programs"]["extract_step"]
    assert all(fwd_bwd[k] is not None for k in FIELDS if k not in ("roofline_s", "mfu_bound", "fits"))
    assert fwd_bwd["rows_per_chip"] == extract_step["rows_per_chip"] and fwd_bwd["tokens"] == 8 * 128
    vs = extract_step["vs_fwd_bwd"]
    assert vs["chunks"] == 2 and vs["total_bytes"] > 1 and vs["flops"] > 1 and vs["roofline_s"] is None
    assert "extract_step against fwd_bwd_step x 2" in plan.format_plan(record)

    s = config.train_settings(cfg)
    mesh = mesh_for(cfg)
    hf = tiny_config(config.model_settings(cfg), load_tokenizer(data_settings(cfg)))
    make = model_factory(hf, dtype=s.param_dtype, compute_dtype=s.compute_dtype, remat=s.remat,
                         scan_layers=s.scan_layers)
    model = SplitModel(nnx.eval_shape(make))
    fns = build_step_functions(model, s, num_steps=10, mesh=mesh)
    params = {k: jax.device_put(v, fns.param_shardings[k]) for k, v in random_params(hf).items()}
    batch = {k: np.zeros((s.batch_size, s.seq_len), np.float32 if k == "loss_mask" else np.int32)
             for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    with jax.set_mesh(mesh):
        state = fns.init_state(params)
        direct = {"train_step": fns.train_step.lower(state, to_global(batch, mesh, s.batch_size)).compile()}
    module = model.module(params)  # the weights on the mesh, as load_model places them
    names = extract.select_params(list(params), list(cfg.extract.include), list(cfg.extract.exclude))
    ex = extract.TaskExtractor(module, names, config.extract_options(cfg), mesh=mesh)
    direct["extract_step"] = ex.lower(int(cfg.extract.n_calib), extract.seq_bucket(cfg.data.max_len)).compile()
    for name, compiled in direct.items():
        m, p = compiled.memory_analysis(), record["programs"][name]
        assert (p["argument_bytes"], p["output_bytes"], p["alias_bytes"], p["temp_bytes"]) == (
            m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes), name


def test_the_run_size_comes_from_the_configs_plan_without_data_or_flags():
    from configs import qwen2_5_vl_7b

    cfg = qwen2_5_vl_7b.get_config()
    cfg.data.path = str(REPO / "no-such-mixture")
    size = plan.run_size(config.settings(cfg), None, None)
    assert (size["source"], size["tasks"], size["tokens"]) == ("flags", 176, 1_600_000 * 600)
    # rows filled as the extraction's (PACK_FILL), not densely: both sides of the overhead count tokens alike
    per_step = cfg.train.batch_size * cfg.train.seq_len * pp.PACK_FILL
    assert 0.9 < pp.PACK_FILL < 1 and size["joint_steps"] == math.ceil(1_600_000 * 600 / per_step)


def test_the_plans_row_fill_is_what_the_packer_gives():
    """PACK_FILL (the rows' fill the plan assumes for training and packed extraction alike) against the
    project's own packer on examples of ~600 tokens in rows of 2048: a whole run's rows (plan_rows) and one
    task's 200 calibration examples (first_fit)."""
    from merit_jax.data.packing import first_fit, plan_rows

    rng = np.random.default_rng(0)
    lengths = rng.integers(300, 901, 20_000)
    rows = plan_rows(lengths, seq_len=2048, batch_size=8, seed=0, num_epochs=1.0)
    task = [lengths[i:i + 200] for i in range(0, 4000, 200)]
    task_fill = np.mean([t.sum() / (2048 * len(first_fit(t, 2048))) for t in task])
    assert abs(lengths.sum() / (2048 * len(rows)) - pp.PACK_FILL) < 0.02 and abs(task_fill - pp.PACK_FILL) < 0.02


def test_topology_names_as_cloud_tpu_writes_them():
    assert [(hardware.topology(n).chips, hardware.topology(n).topology_name) for n in ("v5p-8", "v5p-128", "v5e-8", "v4-8")] \
        == [(4, "v5p:2x2x1"), (64, "v5p:4x4x4"), (8, "v5e:2x4"), (4, "v4:2x2x1")]
    assert hardware.topology("v5p-128").wrap == (True, True, True)
    with pytest.raises(ValueError, match="v5p-7.*expected one of cpu, v4-8"):
        hardware.topology("v5p-7")


ARCH = {"Qwen2.5-0.5B-Instruct": 0.494, "Qwen2.5-1.5B-Instruct": 1.544, "Qwen2.5-3B-Instruct": 3.086,
        "Qwen2.5-7B-Instruct": 7.616, "Qwen2.5-VL-3B-Instruct": 3.755, "Qwen2.5-VL-7B-Instruct": 8.292}


@pytest.mark.parametrize("name", sorted(ARCH))
def test_shipped_architectures_are_the_public_models(name):
    import transformers

    from merit_jax.models.registry import model_factory
    from merit_jax.models import params as P

    path = REPO / "configs" / "arch" / name
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    hf = json.loads((path / "config.json").read_text())
    config = transformers.AutoConfig.from_pretrained(str(path))  # transformers reads every field
    text = config.get_text_config()
    assert text.vocab_size == (151936 if text.hidden_size < 3584 else 152064)
    n = sum(math.prod(shape) for shape, _ in P.specs(nnx.eval_shape(model_factory(hf, str(path)))).values())
    assert round(n / 1e9, 3) == ARCH[name]

