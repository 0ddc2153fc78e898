"""Qwen2.5-3B-Instruct on a local FLAN-style mixture: configs/qwen2_5_0_5b.py with another size.

    python -m merit_jax.main --config configs/qwen2_5_3b.py --workdir runs/q3b \
        --config.model.hf_path=/models/Qwen2.5-3B-Instruct --config.data.path=/data/flan_tasks
"""

from configs import qwen2_5_0_5b


def get_config():
    c = qwen2_5_0_5b.get_config("3b")
    c.mesh.update(data=1, fsdp=-1, tp=1)  # FSDP over every device; add tp=2..8 for long sequences
    return c
