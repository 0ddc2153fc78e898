"""Planning before hardware: the programs a config runs, compiled for a TPU topology on this machine.

    python -m merit_jax.plan --config CONFIG --topology NAME [--config.KEY=VALUE ...] [--json FILE]
        [--tokens N --tasks T] [--workdir DIR] [--programs train_step,extract_step,fwd_bwd_step,eval_step]

Compiles, without weights and without the hardware (XLA's deviceless compilation through libtpu), the branch
train step, the extraction step (and one plain forward+backward of its micro-chunk, its yardstick) and the
held-out eval step of the config on the named topology (Cloud TPU's
names: v5p-8, v5e-16, v4-8, ...; `cpu` compiles for this machine's CPU devices) with the config's mesh and
shardings, and prints per program the bytes per chip against the chip's HBM, flops, XLA's roofline time, the
roofline MFU bound and the compile time; then the whole run projected from the mixture's token counts (or
--tokens / --tasks when no data is at hand). `model.hf_path` may be a directory holding only config.json
(configs/arch/ ships the public Qwen2.5 architectures). Roofline times are a lower bound from XLA's cost
model, not a measurement (docs/SCALE.md). A program that does not fit exits 2 with `error: ...` naming it,
its bytes and what to change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys

if __name__ == "__main__":  # planning needs none of this machine's accelerators: keep jax off them (and quiet)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from merit_jax import hardware  # noqa: E402
from merit_jax.config import Settings, settings  # noqa: E402
from merit_jax.plan_programs import PACK_FILL, PROGRAMS, PlanError  # noqa: E402

log = logging.getLogger("merit_jax")
DISK_BYTES_PER_S = 1e9  # merge I/O is reported in seconds at this read/write rate (an assumption)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file (a .py with get_config()).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, f"Target: {', '.join(hardware.names())}.")
_JSON = flags.DEFINE_string("json", None, "Write the plan as JSON to this file.")
_TOKENS = flags.DEFINE_integer("tokens", None, "Training tokens of the whole mixture (one epoch), when no data.")
_TASKS = flags.DEFINE_integer("tasks", None, "Number of tasks of the mixture, when no data is at hand.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A work directory whose split/partition.json gives the groups.")
_PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile.")


# ------------------------------------------------------------------------------------------ the plan


def hf_config_of(st: Settings) -> dict:
    """The model's HF config: model.hf_path/config.json (weights are never read), or the random tiny model."""
    if st.model.hf_path:
        from merit_jax.io.load import read_config
        return read_config(st.model.hf_path)
    from merit_jax.data.mixture import load_tokenizer
    from merit_jax.training.tiny import tiny_config
    return tiny_config(st.model, load_tokenizer(st.data))


def plan(cfg, topology: str, programs=PROGRAMS, tokens: int | None = None, tasks: int | None = None,
         workdir=None) -> dict:
    """The plan of `cfg` on `topology` as the --json record (see module docstring); raises PlanError."""
    from merit_jax import plan_programs as pp
    from merit_jax.models import attention
    from merit_jax.sharding import make_mesh

    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise PlanError(f"--programs: unknown {unknown}; expected some of {', '.join(PROGRAMS)}")
    topo = hardware.topology(topology)
    devices = hardware.devices(topo)
    st = settings(cfg)
    s = st.train
    try:
        mesh = make_mesh(int(st.mesh.data), int(st.mesh.fsdp), int(st.mesh.tp), devices=devices)
        s.validate(mesh)
    except ValueError as e:
        raise PlanError(f"{topo.name} ({topo.chips} chips): {e}") from None
    size = run_size(st, tokens, tasks, workdir)
    source = f"{st.model.hf_path or 'model.tiny'}/config.json"
    hf = hf_config_of(st)  # (the random tiny model's reads the tokenizer: once)
    model = pp.abstract_model(hf, s, mesh, source)
    extract_model = model  # the extraction's own remat (extract.remat), where it differs
    if st.extract.remat and st.extract.remat != s.remat and {"extract_step", "fwd_bwd_step"} & set(programs):
        extract_model = pp.abstract_model(hf, dataclasses.replace(s, remat=st.extract.remat), mesh, source)
    interpret = attention.INTERPRET
    attention.INTERPRET = None if not topo.is_tpu else False  # splash: the real kernel for a TPU, not interpreted
    try:
        out = {name: compile_program(name, st, extract_model if name in ("extract_step", "fwd_bwd_step") else model,
                                     mesh, topo, size["tasks"]) for name in programs}
    finally:
        attention.INTERPRET = interpret
    record = {"topology": topo.name, "chips": topo.chips, "hbm_bytes_per_chip": topo.chip and topo.chip.hbm_bytes,
              "peak_flops_per_chip": topo.chip and topo.chip.peak_bf16_flops, "device_kind": devices[0].device_kind,
              "mesh": dict(mesh.shape), "params": int(sum(math.prod(v[0]) for v in _specs(model).values())),
              "programs": out}
    if "extract_step" in out and "fwd_bwd_step" in out:
        out["extract_step"]["vs_fwd_bwd"] = versus(out["extract_step"], out["fwd_bwd_step"])
    record["run"] = project(st, size, out, record["params"])
    return record


def versus(program: dict, base: dict) -> dict:
    """`program` (e.g. the extraction step: one task) against `base` (one forward+backward of a micro-chunk)
    run `chunks` times over the same tokens: ratios of per-chip bytes, flops and roofline time."""
    chunks = program["tokens"] / base["tokens"]

    def ratio(key, times):
        a, b = program.get(key), base.get(key)
        return None if a is None or not b else a / (times * b)

    return {"chunks": chunks, "total_bytes": ratio("total_bytes", 1), "flops": ratio("flops", chunks),
            "roofline_s": ratio("roofline_s", chunks), "compile_s": ratio("compile_s", 1),
            "compile_cpu_s": ratio("compile_cpu_s", 1)}


def compile_program(name: str, st: Settings, model, mesh, topo: hardware.Topology, num_tasks: int) -> dict:
    """One program's numbers (plan_programs.Program as a dict, + images_per_row for Qwen2.5-VL)."""
    from merit_jax import plan_programs as pp
    from merit_jax.models.attention import supported

    log.info("plan: compiling %s for %s", name, topo.name)
    s = st.train
    vl = getattr(model, "vl_config", None)
    counts = pp.flop_model(model, s)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if name == "train_step":
        images = pp.image_budget(st.data, vl, s.seq_len) if vl else None
        fn, args = pp.train_step(model, s, mesh, images)
        rows, seq, per_chip = s.batch_size, s.seq_len, s.batch_size / s.grad_accum / dp
        flops = pp.model_flops(counts, "train", rows, seq, images, vl, counts["vision_trained"])
    elif name == "eval_step":
        images = pp.image_budget(st.data, vl, s.seq_len, 1) if vl else None
        fn, args = pp.eval_step(model, s, mesh, images, num_tasks)
        rows, seq = s.eval_batch_size or s.batch_size, s.seq_len
        per_chip = rows / dp
        flops = pp.model_flops(counts, "eval", rows, seq, images, vl)
    else:  # extract_step (one task) or fwd_bwd_step (one of its micro-chunks)
        from merit_jax.gradients import seq_bucket
        seq = seq_bucket(int(st.data.max_len))
        per_row = None if st.extract.options.packed else 1  # packed rows: as many images as their tokens take
        images = pp.image_budget(st.data, vl, seq, per_row) if vl else None
        if name == "extract_step":
            fn, args, ex = pp.extract_step(st.extract, st.data.max_len, model, mesh, images,
                                           st.plan.example_tokens)
            chunks = args[3]["input_ids"].shape[0]
        else:
            fn, args, ex = pp.fwd_bwd_step(st.extract, st.data.max_len, model, mesh, images)
            chunks = 1
        rows, per_chip = chunks * ex.micro_chunk, ex.micro_chunk / math.prod(mesh.shape[a] for a in ex.batch_axes)
        visual = any(n.startswith("visual/") for n in ex.layout.names)
        flops = pp.model_flops(counts, "extract", rows, seq, images, vl, visual)
    kind = name.split("_")[0]  # splash attention's kernel flops, which XLA's cost model does not see
    kernel = pp.attention_flops(counts, kind, rows, seq) if s.attention == "splash" and supported(seq) else 0.0
    chip = topo.chip
    out = vars(pp.measure(fn, args, mesh, tokens=rows * seq, model_flops=flops, rows_per_chip=per_chip,
                          kernel_flops=kernel, chips=topo.chips, hbm_bytes=chip and chip.hbm_bytes,
                          peak_flops=chip and chip.peak_bf16_flops, hbm_bytes_per_s=chip and chip.hbm_bytes_per_s))
    if images is not None:
        out["images_per_row"] = images["images"]
    return out


def _specs(model):
    from merit_jax.models import params as P
    return P.specs(model)


# ------------------------------------------------------------------------------------------ the run


def run_size(st: Settings, tokens: int | None, tasks: int | None, workdir=None) -> dict:
    """Tasks, groups and per-group training steps: from tokens / tasks when given (--tokens / --tasks), else
    from the data (the project's own packing plan) when it is at hand, else from the config's plan.tokens /
    plan.tasks."""

    s = st.train
    k = st.split.num_groups
    if tokens is None and tasks is None and _data_at_hand(st):
        return _size_from_data(st, s, k, workdir)
    defaults = st.plan
    tokens = tokens if tokens is not None else int(defaults.tokens) or None
    tasks = tasks if tasks is not None else int(defaults.tasks) or None
    if tokens is None or tasks is None:
        raise PlanError("no data at hand to project the run from: pass --tokens N (training tokens of the "
                        "mixture, one epoch) and --tasks T (or set plan.tokens / plan.tasks in the config)")
    # the training rows are packed first fit (data.packing.plan_rows), as packed extraction rows are
    # (plan_programs.extract_step with extract.pack and plan.example_tokens): at the same fill, so that both
    # sides of "extraction / joint training" count tokens alike. PACK_FILL is the packer's fill on ~600-token
    # examples in rows of 2048; shorter examples pack tighter (~0.98), so their joint epoch reads a few % long
    per_row = s.batch_size * s.seq_len * PACK_FILL
    joint = math.ceil(tokens * s.epochs / per_row)
    heldout = int(st.data.heldout_max)
    groups = [{"tasks": tasks / k, "steps": math.ceil(joint / k), "heldout": math.ceil(tasks / k) * heldout}
              for _ in range(k)]
    return {"source": "flags", "tasks": int(tasks), "tokens": int(tokens), "joint_steps": joint,
            "heldout": tasks * heldout, "groups": groups, "balanced": True}


def _data_at_hand(st: Settings) -> bool:
    """data.tasks, an existing data.path, or the synthetic mixture of a random tiny model."""
    if st.data.tasks:
        return True
    return pathlib.Path(st.data.path).exists() if st.data.path else not st.model.hf_path


def _size_from_data(st: Settings, s, k: int, workdir) -> dict:
    from merit_jax import artifacts as wd
    from merit_jax.data.mixture import load_mixture, load_tokenizer
    from merit_jax.data.pipeline import num_train_steps

    try:
        tokenizer = load_tokenizer(st.data)
    except (OSError, ValueError) as e:
        raise PlanError(f"reading the data needs the model's tokenizer (configs/arch holds none): set "
                        f"data.tokenizer, or pass --tokens / --tasks ({e})") from None
    mixture = load_mixture(st.data, tokenizer, None)
    kw = dict(seq_len=s.seq_len, batch_size=s.batch_size, seed=s.seed, num_epochs=float(s.epochs))
    joint = num_train_steps(mixture.train_examples(), **kw)
    names = mixture.names
    partition = wd.partition_file(workdir) if workdir else None
    if partition is not None and partition.is_file():
        groups = []
        for tasks in wd.read_partition(workdir)["groups"]:
            groups.append({"tasks": len(tasks), "steps": num_train_steps(mixture.train_examples(tasks), **kw),
                           "heldout": sum(len(mixture.tasks[t].heldout) for t in tasks)})
        balanced = False
    else:  # before the split: K equal groups
        heldout = sum(len(t.heldout) for t in mixture.tasks.values())
        groups = [{"tasks": len(names) / k, "steps": math.ceil(joint / k), "heldout": math.ceil(heldout / k)}
                  for _ in range(k)]
        balanced = True
    tokens = sum(len(ex) for ex in mixture.train_examples())
    return {"source": "data", "tasks": len(names), "tokens": int(tokens), "joint_steps": joint,
            "heldout": sum(len(t.heldout) for t in mixture.tasks.values()), "groups": groups, "balanced": balanced}


def project(st: Settings, size: dict, programs: dict, params: int) -> dict:
    """Seconds of each stage at the programs' roofline times (None where a program was not compiled or has
    no roofline): extraction, basin, every branch (training + its held-out evals), merge I/O, joint training."""
    def seconds(name, n):
        r = programs.get(name, {}).get("roofline_s")
        return None if r is None else n * r

    def add(*xs):
        return None if any(x is None for x in xs) else sum(xs)

    s = st.train

    eval_rows = s.eval_batch_size or s.batch_size

    def training(steps, heldout):
        evals = 2 + ((steps - 1) // s.eval_every if s.eval_every else 0)
        eval_steps = evals * math.ceil(heldout / eval_rows)
        train_s = seconds("train_step", steps)
        return {"steps": steps, "eval_steps": eval_steps, "train_seconds": train_s,
                "seconds": add(train_s, seconds("eval_step", eval_steps))}

    out = {"source": size["source"], "tasks": size["tasks"], "tokens": size["tokens"],
           "groups_assumed_equal": size["balanced"]}
    out["extract"] = {"tasks": size["tasks"], "steps": size["tasks"],
                      "seconds": seconds("extract_step", size["tasks"])}
    if st.basin.enabled:
        out["basin"] = training(int(st.basin.steps), size["heldout"])
    out["branches"] = [{"branch": i, "tasks": g["tasks"], **training(g["steps"], g["heldout"])}
                       for i, g in enumerate(size["groups"])]
    param_bytes = params * DTYPE_BYTES[s.param_dtype]
    merged_bytes = params * DTYPE_BYTES[st.merge.dtype or s.param_dtype]
    read, write = len(size["groups"]) * param_bytes, merged_bytes + params * DTYPE_BYTES[st.export.dtype]
    out["merge"] = {"read_bytes": read, "write_bytes": write, "seconds": (read + write) / DISK_BYTES_PER_S}
    before = add(out["extract"]["seconds"], out.get("basin", {}).get("seconds", 0.0), out["merge"]["seconds"])
    branch_s = [b["seconds"] for b in out["branches"]]
    out["merit_s"] = add(before, *branch_s)
    out["merit_parallel_s"] = None if None in branch_s or before is None else before + max(branch_s)
    out["joint"] = training(size["joint_steps"], size["heldout"])
    return out


# ------------------------------------------------------------------------------------------ output


def _gib(n):
    return "-" if n is None else f"{n / hardware.GIB:.2f}"


def _count(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _time(sec):
    if sec is None:
        return "n/a"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if sec >= size:
            return f"{sec / size:.1f} {unit}"
    return f"{sec:.3g} s"


def format_plan(record: dict, config_name: str = "") -> str:
    hbm = record["hbm_bytes_per_chip"]
    head = (f"plan: {config_name} on {record['topology']} ({record['chips']} x {record['device_kind']}"
            + (f", {_gib(hbm)} GiB HBM, {record['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip" if hbm
               else "") + f"); mesh {record['mesh']}; {_count(record['params'])} parameters")
    cols = ("program", "rows/chip", "args GiB", "out GiB", "temp GiB", "total GiB", "fits", "TFLOP/chip",
            "roofline s", "tokens/step", "MFU bound", "compile s", "compile CPU s")
    rows = []
    for name, p in record["programs"].items():
        fits = "-" if p["fits"] is None else "yes" if p["fits"] else "NO"
        rows.append((name, f"{p['rows_per_chip']:g}", _gib(p["argument_bytes"]), _gib(p["output_bytes"]),
                     _gib(p["temp_bytes"]), _gib(p["total_bytes"]), fits, f"{p['flops'] / 1e12:.2f}",
                     "-" if p["roofline_s"] is None else f"{p['roofline_s']:.4g}", str(p["tokens"]),
                     "-" if p["mfu_bound"] is None else f"{p['mfu_bound']:.2f}", f"{p['compile_s']:.1f}",
                     f"{p.get('compile_cpu_s', 0.0):.1f}"))
    lines = [head, "", _table(cols, rows), ""]
    vs = record["programs"].get("extract_step", {}).get("vs_fwd_bwd")
    if vs:
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"
        lines += [f"extract_step against fwd_bwd_step x {vs['chunks']:g} (the same tokens): bytes/chip "
                  f"{fmt(vs['total_bytes'])}, flops {fmt(vs['flops'])}, roofline {fmt(vs['roofline_s'])}; compile "
                  f"{fmt(vs['compile_s'])} (CPU time {fmt(vs['compile_cpu_s'])})", ""]
    run = record["run"]
    src = ("the data" if run["source"] == "data" else "--tokens / --tasks") + (
        ", groups assumed equal" if run["groups_assumed_equal"] else ", groups from split/partition.json")
    lines.append(f"run ({run['tasks']} tasks, {run['tokens']:,} training tokens, from {src}); roofline times, "
                 "one slice of this topology:")
    stage = [("extraction", f"{run['extract']['tasks']} tasks x 1 step", _time(run["extract"]["seconds"]))]
    if "basin" in run:
        stage.append(("basin", f"{run['basin']['steps']} + {run['basin']['eval_steps']} eval",
                      _time(run["basin"]["seconds"])))
    for b in run["branches"]:
        stage.append((f"branch {b['branch']} ({b['tasks']:g} tasks)", f"{b['steps']} + {b['eval_steps']} eval",
                      _time(b["seconds"])))
    m = run["merge"]
    stage.append(("merge + export I/O", f"{m['read_bytes'] / 1e9:.1f} GB read, {m['write_bytes'] / 1e9:.1f} GB "
                  "written", _time(m["seconds"]) + f" at {DISK_BYTES_PER_S / 1e9:g} GB/s"))
    stage.append(("MERIT, branches one after another", "", _time(run["merit_s"])))
    stage.append((f"MERIT, branches on {len(run['branches'])} slices at once", "", _time(run["merit_parallel_s"])))
    joint = run["joint"]
    joint_time = _time(joint["seconds"]) if joint["seconds"] is not None or joint.get("train_seconds") is None \
        else f"{_time(joint['train_seconds'])} + evals (eval_step not compiled)"
    stage.append(("joint training (all tasks)", f"{joint['steps']} + {joint['eval_steps']} eval", joint_time))
    lines.append(_table(("stage", "steps", "time"), stage))
    if run["extract"]["seconds"] is not None and joint.get("train_seconds"):
        share = run["extract"]["seconds"] / joint["train_seconds"]
        lines.append(f"whole extraction / joint training's steps: {100 * share:.1f} %")
    return "\n".join(lines)


def _table(cols, rows) -> str:
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def refusals(record: dict, st: Settings) -> list[str]:
    """One message per program that does not fit the chip's HBM, naming its bytes and what to change."""
    out = []
    hbm, topo = record["hbm_bytes_per_chip"], record["topology"]
    dp = record["mesh"]["data"] * record["mesh"]["fsdp"]
    for name, p in record["programs"].items():
        if p["fits"] is not False:
            continue
        parts = (f"arguments {_gib(p['argument_bytes'])}, temporaries {_gib(p['temp_bytes'])} GiB" if not p["error"]
                 else f"the compiler: {p['error']}")
        if name == "train_step":
            fix = (f"fewer rows per chip (now {p['rows_per_chip']:g}: train.batch_size={st.train.batch_size} over "
                   f"mesh.data*mesh.fsdp={dp} chips and train.grad_accum={st.train.grad_accum}; raise "
                   "train.grad_accum)")
        elif name in ("extract_step", "fwd_bwd_step"):
            fix = f"fewer examples per chip (now {p['rows_per_chip']:g}: lower extract.micro_chunk)"
        else:
            fix = f"fewer rows per chip (now {p['rows_per_chip']:g}: set train.eval_batch_size)"
        remat = "" if st.model.remat == "full" else f", model.remat=full (now {st.model.remat})"
        out.append(f"{name} does not fit {topo}: {_gib(p['total_bytes'])} GiB per chip ({parts}) > "
                   f"{_gib(hbm)} GiB HBM. Change: {fix}{remat}, or more chips (a larger --topology; "
                   "mesh.tp > 1 splits long sequences' activations)")
    return out


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = _CONFIG.value
    try:
        if not _TOPOLOGY.value:
            raise PlanError(f"--topology is required: one of {', '.join(hardware.names())}")
        record = plan(cfg, _TOPOLOGY.value, tuple(_PROGRAMS.value), _TOKENS.value, _TASKS.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("MERIT_DEBUG"):
            raise
        print(f"error: {e}\n(set MERIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    print(format_plan(record, _config_path()))
    if _JSON.value:
        pathlib.Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(_JSON.value).write_text(json.dumps(record, indent=1) + "\n")
    problems = refusals(record, settings(cfg))
    for message in problems:
        print(f"error: {message}", file=sys.stderr)
    return 2 if problems else 0


def _config_path() -> str:
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
    return "configs/default.py"


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
