"""Splash attention against XLA attention, compiled for a TPU topology without the hardware (deviceless AOT):
per-chip temp memory and the cost model's roofline time of one attention forward+backward.

    TPU_SKIP_MDS_QUERY=1 python bench/bench_splash_plan.py [--topology v5p:2x2x1] [--seq 4096] [--rows 8]

Shapes: Qwen2.5-3B attention (16 query heads, 2 KV heads, head_dim 128), bf16, rows sharded over fsdp.
Pallas kernels are custom calls: the roofline counts their operands but may not count their flops, so read
the memory column as the real difference and the time column with care.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from merit_jax.models import attention as A  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    A.INTERPRET = False  # compile the TPU kernel itself
    dims = tuple(int(x) for x in args.topology.split(":")[1].split("x"))
    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology, chip_config_name="default",
                                        chips_per_host_bounds=dims, num_slices=1)
    mesh = Mesh(np.array(topo.devices).reshape(1, -1, 1), ("data", "fsdp", "tp"))
    b, t, n, k, h = args.rows, args.seq, 16, 2, 128
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=rows) for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h))]
    shapes.append(jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows))

    def grads(attend):
        def f(q, kk, v, seg):
            return jax.grad(lambda *x: jnp.sum(attend(*x, seg).astype(jnp.float32)), argnums=(0, 1, 2))(q, kk, v)
        return f

    impls = {"splash": A.splash_attention,
             "xla": lambda q, kk, v, seg: jax.nn.dot_product_attention(q, kk, v, mask=A.dense_mask(seg))}
    print(f"{args.topology}: {len(topo.devices)} chips, rows {b}, seq {t}, 16/2 heads x 128, bf16, fwd+bwd")
    result = {}
    for name, attend in impls.items():
        start = time.time()
        with jax.set_mesh(mesh):
            compiled = jax.jit(grads(attend)).lower(*shapes).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        temp = compiled.memory_analysis().temp_size_in_bytes
        result[name] = temp
        print(f"  {name:6s} temp {temp / 2**30:6.2f} GiB/chip  roofline {cost.get('optimal_seconds', float('nan')):.4f} s"
              f"  compile {time.time() - start:.1f} s")
    print(f"  temp memory xla / splash: {result['xla'] / result['splash']:.1f}x")


if __name__ == "__main__":
    main()
