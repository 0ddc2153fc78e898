"""Qwen2.5-1.5B-Instruct on a local FLAN-style mixture: configs/qwen2_5_0_5b.py with another size.

    python -m merit_jax.main --config configs/qwen2_5_1_5b.py --workdir runs/q1_5b \
        --config.model.hf_path=/models/Qwen2.5-1.5B-Instruct --config.data.path=/data/flan_tasks
"""

from configs import qwen2_5_0_5b


def get_config():
    c = qwen2_5_0_5b.get_config("1.5b")
    c.mesh.update(data=1, fsdp=-1, tp=1)  # FSDP over every device; add tp=2..8 for long sequences
    return c
