"""The CountSketch of a whole model's gradient compiled alone for a TPU slice (deviceless): what XLA makes of
each form, its roofline, bytes accessed, memory and compile time (docs/EXTRACT.md, "The sketch at P = 3e9").

    python bench/bench_sketch_plan.py [--arch configs/arch/Qwen2.5-3B-Instruct] [--topology v5p-8] \
        [--dim 8192] [--forms matmul,scatter,raveled,tensorcore]

The input is the mean gradient as the extraction holds it: every parameter but the embeddings and the head,
float32, sharded like the parameters (fsdp over the slice). Forms: `matmul` and `scatter` (sketch.sketch_vector's
two methods), `raveled` (the scatter as it was written before: each tensor raveled first), `tensorcore` (the
scatter with XLA's offload to the SparseCores off, so that its cost model can cost it). Each form compiles in
its own process (a few minutes each on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(arch: str, topology: str, dim: int, form: str) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import qwen2_5_3b
    from merit_jax import config, hardware, plan
    from merit_jax import gradients as extract
    from merit_jax import plan_programs as pp
    from merit_jax import sketch as sk
    from merit_jax.models import params as P
    from merit_jax.sharding import make_mesh

    cfg = qwen2_5_3b.get_config()
    cfg.model.hf_path = arch
    topo = hardware.topology(topology)
    devices = hardware.devices(topo)
    mesh = make_mesh(1, len(devices), 1, devices=devices)
    st = config.settings(cfg)
    model = pp.abstract_model(plan.hf_config_of(st), st.train, mesh)
    names = extract.select_params(list(P.specs(model)), list(st.extract.include), list(st.extract.exclude))
    flat = extract._flat(extract.split_model(model, names)[1])
    layout = sk.Layout.of(flat)
    args = {n: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=v.sharding) for n, v in flat.items()}

    def raveled(f):
        out = jnp.zeros((dim,), jnp.float32)
        for name, shape in zip(layout.names, layout.shapes):
            bucket, sign = sk.hash_buckets(shape, sk.tensor_key(0, name), dim)
            out = out.at[jnp.ravel(bucket)].add(jnp.ravel(sign * f[name]))
        return out

    fns = {"matmul": lambda f: sk.sketch_vector(f, layout, dim, 0, "matmul"),
           "scatter": lambda f: sk.sketch_vector(f, layout, dim, 0, "scatter"),
           "tensorcore": lambda f: sk.sketch_vector(f, layout, dim, 0, "scatter"), "raveled": raveled}
    options = pp.NO_SPARSECORE_SCATTER if form == "tensorcore" else None
    start = time.perf_counter()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(fns[form], compiler_options=options).trace(args).lower().compile()
    seconds = time.perf_counter() - start
    cost, mem, hlo = pp._cost(compiled), compiled.memory_analysis(), compiled.as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    return {"form": form, "coordinates": layout.total, "tensors": len(layout.names), "compile_s": round(seconds, 1),
            "optimal_seconds": cost.get("optimal_seconds"), "flops_per_chip": cost.get("flops"),
            "bytes_accessed_per_chip": cost.get("bytes accessed"), "uncosted_ops": pp.uncosted_ops(hlo),
            "temp_gib": mem.temp_size_in_bytes / 2 ** 30, "argument_gib": mem.argument_size_in_bytes / 2 ** 30,
            "all_gathers": len(re.findall(r" all-gather\(", entry)), "sorts": len(re.findall(r" sort\(", hlo)),
            "load": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="configs/arch/Qwen2.5-3B-Instruct")
    ap.add_argument("--topology", default="v5p-8")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--forms", default="matmul,scatter,raveled,tensorcore")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single form, in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.arch, args.topology, args.dim, args.one)))
        return 0
    env = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    for form in args.forms.split(","):
        proc = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--topology", args.topology,
                               "--dim", str(args.dim), "--one", form], cwd=REPO, env=env, capture_output=True,
                              text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else f"{form}: failed\n{proc.stderr[-2000:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
