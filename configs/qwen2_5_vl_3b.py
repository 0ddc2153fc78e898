"""MERIT on Qwen2.5-VL-3B with the Vision-FLAN tasks (the paper's VL-3B table: 3-D split, 8 groups).

    python -m merit_jax.main --config configs/qwen2_5_vl_3b.py --workdir runs/vl3b \
        --config.model.hf_path=/data/Qwen2.5-VL-3B-Instruct \
        --config.data.path=/data/vision-flan/annotation_191-task_1k.json \
        --config.data.image_root=/data/vision-flan/images_191task_1k

Everything is local: a Hugging Face directory of the model (config.json, *.safetensors, tokenizer and
preprocessor_config.json) and a copy of the Vision-FLAN release (annotation JSON + image folder). Starts
from configs/default.py; see docs/VL.md for the choices below.

Before booking hardware, compile its programs for the slice (no weights or images needed: configs/arch holds
the architecture; images are planned at data.image_max_pixels) and read the plan (docs/SCALE.md):

    python -m merit_jax.plan --config configs/qwen2_5_vl_3b.py --topology v5p-8 \
        --config.model.hf_path=configs/arch/Qwen2.5-VL-3B-Instruct --tokens 120000000 --tasks 191
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.workdir = "runs/qwen2_5_vl_3b"

    m = c.model
    m.hf_path = "checkpoints/Qwen2.5-VL-3B-Instruct"
    m.model_type = "qwen2_5_vl"
    m.param_dtype = "float32"
    m.compute_dtype = "bfloat16"
    m.remat = "full"
    m.scan_layers = True  # decoder layers and vision blocks as one scan each (docs/TRAINING.md)
    m.attention = "xla"  # "cudnn" on GPUs that support it

    c.mesh.fsdp = -1

    d = c.data
    d.path = "data/vision-flan/annotation_191-task_1k.json"
    d.image_root = "data/vision-flan/images_191task_1k"
    d.tokenizer = ""  # the model's
    d.image_min_pixels = 56 * 56
    d.image_max_pixels = 28 * 28 * 512  # <= 512 image tokens per image (Qwen's default allows 16384)
    d.max_image_pixels = 50_000_000
    d.max_len = 2048
    d.truncation = "skip"  # an example is never cut through its image; skipped ones are counted
    d.heldout_max = 64

    c.basin.enabled = False  # θ⁰ is the released checkpoint

    e = c.extract
    e.n_calib = 200  # paper: 200 calibration examples per task
    # 4 rows per chip per micro-chunk, remat dots and whole rows' logits: 46.81 GiB per chip on v5p-8, 1.17x a
    # forward+backward of the same rows (1 row per chip with remat full: 17.88 GiB, 2.42x; docs/EXTRACT.md).
    # The per-example path (keep_example_sketches, per_example=unit) holds a gradient per row: fewer rows then.
    e.micro_chunk = 16
    e.remat = "dots"
    e.logits_chunk = 0
    e.exclude = ("embed_tokens", "lm_head", "^visual/")  # language model only
    e.keep_example_sketches = False  # a per-example pass over P each; only the stability curve needs them
    e.pack = True  # several examples (and their images) per row: no compute spent on padding (docs/EXTRACT.md)

    c.split.depth = 3  # K = 8 groups (the paper's best VL-3B row)

    t = c.train  # the LLaVA fine-tuning recipe (the paper does not publish branch hyperparameters)
    t.optimizer = "adamw"
    t.learning_rate = 2e-5
    t.schedule = "cosine"
    t.warmup_steps = 30
    t.weight_decay = 0.0
    t.epochs = 1.0
    t.batch_size = 128
    t.seq_len = 2048
    t.loader_threads = 16  # image decoding + preprocessing: ~27 ms per Vision-FLAN image on one thread
    t.freeze = ("^visual/",)  # vision tower frozen (() to train it as well)
    t.checkpoint_every = 200

    c.export.dtype = "bfloat16"
    c.evaluate.hessian_alignment = False  # text models only for now; its Lanczos basis is 44 x the parameters
    return c
