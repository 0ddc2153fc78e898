"""MERIT on Qwen2.5-VL-7B (the paper's 7B VL run: 176 data sources, 1.6M examples, a 2-D split: 4 groups).

    python -m merit_jax.main --config configs/qwen2_5_vl_7b.py --workdir runs/vl7b \
        --config.model.hf_path=/data/Qwen2.5-VL-7B-Instruct \
        --config.data.path=/data/vl_mixture --config.data.image_root=/data/vl_mixture/images

configs/qwen2_5_vl_3b.py with the 7B model and the larger mixture: data.path is a directory with one record
file per source (a source is a task; Vision-FLAN-format records, docs/DATA.md), images resolving against
data.image_root. Planning before hardware needs neither weights nor data (docs/SCALE.md):

    python -m merit_jax.plan --config configs/qwen2_5_vl_7b.py --topology v5p-16 \
        --config.model.hf_path=configs/arch/Qwen2.5-VL-7B-Instruct

which projects the run from `plan` below (the paper's size) until the mixture is at hand.
"""

import ml_collections

from configs import qwen2_5_vl_3b


def get_config() -> ml_collections.ConfigDict:
    c = qwen2_5_vl_3b.get_config()
    c.workdir = "runs/qwen2_5_vl_7b"
    c.model.hf_path = "checkpoints/Qwen2.5-VL-7B-Instruct"
    c.data.path = "data/vl_mixture"
    c.data.image_root = "data/vl_mixture/images"
    c.split.depth = 2  # K = 4 groups: the paper's 2-D split for the 7B VL run
    c.train.learning_rate = 1e-5  # the LLaVA recipe's 2e-5 halved for the larger model
    # Fitting v5p-16 (8 chips, fsdp 8, 95 GiB each) at the image budget (4 images of 512 tokens per row of 2048):
    # splash attention (the language model's and the vision tower's: no T x S scores) and 2 micro-batches of
    # 8 rows per chip, so remat can save the matmul outputs (dots) instead of recomputing each layer (full).
    # The plan (deviceless, docs/SCALE.md "Qwen2.5-VL-7B on v5p-16"): 74.54 GiB per chip, MFU bound 0.59, 1639
    # TFLOP per chip; splash with remat full, 16 rows: 37.93 GiB, 0.57, 1942 TFLOP; the VL-3B config's XLA
    # attention and remat full: 57.19 GiB. Splash is TPU-only (interpreted, slowly, elsewhere): xla or cudnn on
    # GPUs.
    c.model.attention = "splash"
    c.model.remat = "dots"
    c.train.grad_accum = 2  # the global batch stays 128 rows
    # Extraction (packed rows, configs/qwen2_5_vl_3b.py): 8 rows per chip per micro-chunk (a task's 200 examples
    # of ~600 tokens fill 62 rows: one chunk) and the logits of whole rows at once (no chunk recomputed in the
    # backward): 86.17 GiB per chip, 2.41 s per task in the plan, the whole extraction 1.9 % of a joint epoch.
    # 4 rows per chip: 52.83 GiB, 2.63 s (2.0 %); 4 rows with chunked logits: 41.19 GiB, 2.77 s (2.1 %)
    # (docs/SCALE.md, "The whole extraction"). A task whose examples pack into more than 64 rows (longer than
    # ~620 tokens on average) takes a second chunk: micro_chunk=32 then wastes less. On GPUs of 80 GB (8 rows
    # each with whole logits will not fit) set micro_chunk to 2-4 rows per GPU.
    c.extract.micro_chunk = 64
    c.extract.logits_chunk = 0
    # The run's size for `merit_jax.plan` while the mixture is not at hand: 176 sources, 1.6M examples of
    # ~600 tokens (<= 512 image tokens at data.image_max_pixels plus the text): an estimate, the data's own
    # count replaces it as soon as data.path exists.
    c.plan.tasks = 176
    c.plan.tokens = 1_600_000 * 600
    c.plan.example_tokens = 600  # how many packed rows a task's 200 calibration examples fill
    return c
