"""Qwen2.5-3B-Instruct on a local FLAN-style mixture: configs/qwen2_5_0_5b.py with another size.

    python -m merit_jax.main --config configs/qwen2_5_3b.py --workdir runs/q3b \
        --config.model.hf_path=/models/Qwen2.5-3B-Instruct --config.data.path=/data/flan_tasks

Before booking hardware, compile its programs for the slice (no weights needed: configs/arch holds the
architecture) and read the plan (docs/SCALE.md):

    python -m merit_jax.plan --config configs/qwen2_5_3b.py --topology v5p-8 \
        --config.model.hf_path=configs/arch/Qwen2.5-3B-Instruct --tokens 200000000 --tasks 64
"""

from configs import qwen2_5_0_5b


def get_config():
    c = qwen2_5_0_5b.get_config("3b")
    c.mesh.update(data=1, fsdp=-1, tp=1)  # FSDP over every device; add tp=2..8 for long sequences
    # Unrolled layers: scanned, the step keeps every layer's saved matmul outputs (remat dots, 16 rows per chip)
    # and a whole layer's backward at once: 98.9 GiB per v5p-8 chip, over its 95; unrolled 82.1 GiB, compiled in
    # 81 s (docs/TRAINING.md). Scanned, it fits with train.grad_accum=2 (62.9 GiB).
    c.model.scan_layers = False
    # Extraction: 10 rows per chip per micro-chunk (200 calibration examples: 5 chunks) and whole rows' logits
    # (no chunk recomputed): 67.81 GiB per chip on v5p-8, 1.08x a forward+backward of the same rows, 7.88 s per
    # task in the plan; the 0.5B family's 2 rows per chip and chunked logits: 19.44 GiB (1.45x), 8.54 s
    # (docs/EXTRACT.md, "Cost at scale"). On 8 GPUs of 80 GB: 5 rows each. The per-example path (per_example=unit,
    # keep_example_sketches, gradients=per_example) holds a gradient per row: use micro_chunk=8 and logits_chunk=-1.
    c.extract.micro_chunk = 40
    c.extract.logits_chunk = 0
    return c
