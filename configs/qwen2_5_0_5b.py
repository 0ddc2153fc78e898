"""Qwen2.5-0.5B-Instruct on a local FLAN-style mixture (one file per task, or a directory of them).

    python -m merit_jax.main --config configs/qwen2_5_0_5b.py --workdir runs/q05 \
        --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct --config.data.path=/data/flan_tasks

θ⁰ is the pretrained instruct checkpoint (no basin stage); bf16 compute with fp32 master weights.

Before booking hardware, compile its programs for the slice (no weights needed: configs/arch holds the
architecture) and read the plan (docs/SCALE.md):

    python -m merit_jax.plan --config configs/qwen2_5_0_5b.py --topology v5p-8 \
        --config.model.hf_path=configs/arch/Qwen2.5-0.5B-Instruct --tokens 200000000 --tasks 64
"""

from configs import default


def get_config(size: str = "0.5b"):
    c = default.get_config()
    c.model.hf_path = ""  # required: --config.model.hf_path=/path/to/Qwen2.5-{size}-Instruct
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "dots"
    c.model.scan_layers = True  # compile time independent of depth (configs/qwen2_5_3b.py: off, docs/TRAINING.md)
    c.model.attention = "xla"  # "cudnn" on NVIDIA GPUs
    c.basin.enabled = False
    c.mesh.update(data=1, fsdp=-1, tp=1)
    c.data.max_len = 2048
    c.data.heldout_max = 200
    c.extract.n_calib = 200
    c.extract.micro_chunk = 8
    c.extract.reduction = "sketch"
    c.extract.keep_example_sketches = False  # per-example sketches cost a pass over P each; the stability curve needs them
    c.extract.dim = 8192
    c.extract.pack = True  # several calibration examples per row: no compute spent on padding (docs/EXTRACT.md)
    c.split.depth = 2
    c.train.learning_rate = {"0.5b": 1e-5, "1.5b": 1e-5, "3b": 5e-6, "7b": 5e-6}[size]
    c.train.schedule = "cosine"
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.0
    c.train.epochs = 1.0
    c.train.batch_size = 64
    c.train.seq_len = 2048
    c.train.checkpoint_every = 500
    c.train.eval_every = 500
    c.train.log_every = 10
    c.evaluate.baselines = ("joint", "uniform")
    c.evaluate.max_new_tokens = 64
    # the Hessian–PCA alignment's Lanczos basis is 44 x the selected parameters (~85 GB at 0.5B): on only with
    # a narrow extract.include (evaluate.hessian_max_bytes guards it anyway)
    c.evaluate.hessian_alignment = False
    c.export.dtype = "bfloat16"
    return c
