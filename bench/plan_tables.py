"""The plan tables of docs/SCALE.md and docs/EXTRACT.md, regenerated: `merit_jax.plan` for a list of (config,
topology, sequence, overrides), each in its own process (a 3B/7B compile holds GBs until its process ends),
printed as markdown.

    python bench/plan_tables.py                      # every row (hours on a 2-core CPU: compiles of 100-400 s)
    python bench/plan_tables.py --only 3b            # rows whose name contains "3b" (comma-separated: any of them)
    python bench/plan_tables.py --only 3b-2048 --programs extract_step,fwd_bwd_step
    python bench/plan_tables.py --list               # the rows and the command each runs
    python bench/plan_tables.py --from-json DIR      # the tables again from the JSON a run left in DIR
    python bench/plan_tables.py --only train-3b,train-7b --json-dir bench/plan_results   # the train-step table (12 rows)
    python bench/plan_tables.py --only train-3b,train-7b --from-json bench/plan_results  # ... printed from its JSON
    python bench/plan_tables.py --only train-vl --json-dir bench/plan_results  # the VL train-step table (12 rows)

The `train-*` rows (docs/SCALE.md "Train step: 3B and 7B on v5p-8/16/32") are the text models' train step with
splash attention, 4 rows per chip, at seq 2048 and 4096 on v5p-8 / 16 / 32: a table of their own. Each run
also records, under "host" in its JSON, this machine's 1-minute load average while the row compiled (sampled
every 5 s) and the process's wall seconds: compile times mean little without it.

Three tables for the other rows: every program's numbers; the extraction step against a plain forward+backward of its
micro-chunk run as many times (the same tokens; `vs_fwd_bwd` of the plan's JSON); and the whole extraction
projected against one joint epoch on the same slice (the run's training steps at the train step's roofline,
held-out evals left out). Roofline times are XLA's cost model, a lower bound, not a measured speed; compile
times are this machine's (say how loaded it was).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30
ALL = "train_step,extract_step,fwd_bwd_step"

# name: (config, architecture under configs/arch, topology, overrides, programs, run size flags)
ROWS = {
    "3b-2048": ("configs/qwen2_5_3b.py", "Qwen2.5-3B-Instruct", "v5p-8", {}, ALL,
                ["--tokens", "200000000", "--tasks", "64"]),
    "3b-2048-per_example": ("configs/qwen2_5_3b.py", "Qwen2.5-3B-Instruct", "v5p-8",
                            {"extract.gradients": "per_example", "extract.micro_chunk": 8, "extract.logits_chunk": -1},
                            "extract_step,fwd_bwd_step",
                            ["--tokens", "200000000", "--tasks", "64"]),
    "7b-4096": ("configs/qwen2_5_7b.py", "Qwen2.5-7B-Instruct", "v5p-8",
                {"data.max_len": 4096, "train.seq_len": 4096}, "extract_step,fwd_bwd_step",
                ["--tokens", "200000000", "--tasks", "64"]),
    "vl3b-2048": ("configs/qwen2_5_vl_3b.py", "Qwen2.5-VL-3B-Instruct", "v5p-8", {}, ALL,
                  ["--tokens", "120000000", "--tasks", "136"]),  # the paper's 136 Vision-FLAN tasks
    # plan.* of the config, as configured (splash, remat dots, 2 micro-batches: docs/SCALE.md "Qwen2.5-VL-7B on v5p-16")
    "vl7b-2048": ("configs/qwen2_5_vl_7b.py", "Qwen2.5-VL-7B-Instruct", "v5p-16", {}, ALL, []),
    # the extraction at the bucket of the mixture's typical example (~600 tokens: 768), not the longest one
    "vl7b-768": ("configs/qwen2_5_vl_7b.py", "Qwen2.5-VL-7B-Instruct", "v5p-16", {"data.max_len": 768},
                 "extract_step,fwd_bwd_step", []),
}

# The text models' train step at scale: splash attention (the TPU path; no [T, S] scores), 4 rows per chip,
# seq 2048 and 4096, on v5p-8 / v5p-16 / v5p-32 (4 / 8 / 16 chips, FSDP over all of them).
TRAIN_CHIPS = {"v5p-8": 4, "v5p-16": 8, "v5p-32": 16}
TRAIN_ROWS_PER_CHIP = 4
TEXT_MODELS = {"3b": ("configs/qwen2_5_3b.py", "Qwen2.5-3B-Instruct"),
               "7b": ("configs/qwen2_5_7b.py", "Qwen2.5-7B-Instruct")}
for _topology, _chips in TRAIN_CHIPS.items():
    for _size, (_config, _arch) in TEXT_MODELS.items():
        for _seq in (2048, 4096):
            ROWS[f"train-{_size}-{_topology.replace('-', '')}-{_seq}"] = (
                _config, _arch, _topology,
                {"model.attention": "splash", "train.seq_len": _seq, "data.max_len": _seq,
                 "train.batch_size": TRAIN_ROWS_PER_CHIP * _chips},
                "train_step", ["--tokens", "200000000", "--tasks", "64"])

# The same for Qwen2.5-VL (docs/SCALE.md "Train step: Qwen2.5-VL-3B and VL-7B on v5p-8/16/32"): splash, 4 rows per
# chip, the image budget per row sized by the plan from the sequence (data.image_max_pixels images that fit it).
# VL-3B keeps its config otherwise (remat full); VL-7B its own (splash, remat dots, train.grad_accum=2: 2
# micro-batches of 2 rows per chip). Run sizes: the vl3b-2048 row's flags; VL-7B its config's plan.*.
VL_MODELS = {"vl3b": ("configs/qwen2_5_vl_3b.py", "Qwen2.5-VL-3B-Instruct", ["--tokens", "120000000", "--tasks", "136"]),
             "vl7b": ("configs/qwen2_5_vl_7b.py", "Qwen2.5-VL-7B-Instruct", [])}
for _topology, _chips in TRAIN_CHIPS.items():
    for _size, (_config, _arch, _run_size) in VL_MODELS.items():
        for _seq in (2048, 4096):
            ROWS[f"train-{_size}-{_topology.replace('-', '')}-{_seq}"] = (
                _config, _arch, _topology,
                {"model.attention": "splash", "train.seq_len": _seq, "data.max_len": _seq,
                 "train.batch_size": TRAIN_ROWS_PER_CHIP * _chips},
                "train_step", _run_size)


def command(name: str, json_path: pathlib.Path, programs: str | None = None) -> list[str]:
    config, arch, topology, overrides, default_programs, size = ROWS[name]
    return [sys.executable, "-m", "merit_jax.plan", "--config", config, "--topology", topology,
            f"--config.model.hf_path=configs/arch/{arch}", *[f"--config.{k}={v}" for k, v in overrides.items()],
            "--programs", programs or default_programs, *size, "--json", str(json_path)]


def run(name: str, json_dir: pathlib.Path, programs: str | None) -> dict | None:
    path = json_dir / f"{name}.json"
    cmd = command(name, path, programs)
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.time()
    env = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    path.unlink(missing_ok=True)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        loads = [os.getloadavg()[0]]
        while proc.poll() is None:
            time.sleep(5)
            loads.append(os.getloadavg()[0])
        err.seek(0)
        stderr = err.read()
    wall = time.time() - start
    host = {"load_mean": sum(loads) / len(loads), "load_max": max(loads), "wall_s": wall}
    print(f"[{name}] exit {proc.returncode} after {wall:.0f} s (load {host['load_mean']:.1f}, max "
          f"{host['load_max']:.1f})", file=sys.stderr, flush=True)
    if not path.is_file():
        print(stderr[-3000:], file=sys.stderr)
        return None
    record = json.loads(path.read_text())
    record["host"] = host
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _gib(n):
    return "-" if n is None else f"{n / GIB:.2f}"


def _x(r):
    return "-" if r is None else f"{r:.2f}"


def _time(sec):
    if sec is None:
        return "n/a"
    return f"{sec / 3600:.2f} h" if sec >= 3600 else f"{sec / 60:.1f} min" if sec >= 60 else f"{sec:.3g} s"


def train_table(records: dict[str, dict]) -> str:
    """The train-* rows: one line per (model, topology, seq), the train step's numbers and the compile's load."""
    vl = any("images_per_row" in r["programs"]["train_step"] for r in records.values())  # + images per row
    out = ["| model | topology | seq | rows/chip | " + ("images/row | " if vl else "") + "args GiB | temp GiB | "
           "total GiB | fits | TFLOP/chip | roofline s | tokens/step | MFU bound | compile s | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if vl else "")]
    for name, rec in records.items():
        p, (_, arch, _, overrides, _, _) = rec["programs"]["train_step"], ROWS[name]
        fits = "-" if p["fits"] is None else "yes" if p["fits"] else "**no**"
        roof = "-" if p["roofline_s"] is None else f"{p['roofline_s']:.4g}"
        mfu = "-" if p["mfu_bound"] is None else f"{p['mfu_bound']:.2f}"
        compile_s = f"{p['compile_s']:.0f}" + (f" (+{p['cost_compile_s']:.0f})" if p.get("cost_compile_s") else "")
        host = rec.get("host")
        load = "-" if host is None else f"{host['load_mean']:.1f} (max {host['load_max']:.1f})"
        out.append(f"| {arch.removesuffix('-Instruct')} | {rec['topology']} | {overrides['train.seq_len']} | "
                   f"{p['rows_per_chip']:g} | " + (f"{p.get('images_per_row', '-')} | " if vl else "") +
                   f"{_gib(p['argument_bytes'])} | {_gib(p['temp_bytes'])} | "
                   f"{_gib(p['total_bytes'])} | {fits} | {p['flops'] / 1e12:.1f} | {roof} | {p['tokens']:,} | {mfu} | "
                   f"{compile_s} | {load} |")
    return "\n".join(out)


def all_tables(records: dict[str, dict]) -> str:
    train = {n: r for n, r in records.items() if n.startswith("train-")}
    other = {n: r for n, r in records.items() if n not in train}
    return "\n\n".join(([tables(other)] if other else []) + ([train_table(train)] if train else []))


def tables(records: dict[str, dict]) -> str:
    out = ["| row | topology | program | rows/chip | args GiB | temp GiB | total GiB | fits | TFLOP/chip | "
           "roofline s | MFU bound | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in records.items():
        for prog, p in rec["programs"].items():
            fits = "-" if p["fits"] is None else "yes" if p["fits"] else "**no**"
            roof = "-" if p["roofline_s"] is None else f"{p['roofline_s']:.4g}"
            mfu = "-" if p["mfu_bound"] is None else f"{p['mfu_bound']:.2f}"
            out.append(f"| {name} | {rec['topology']} | {prog} | {p['rows_per_chip']:g} | "
                       f"{_gib(p['argument_bytes'])} | {_gib(p['temp_bytes'])} | {_gib(p['total_bytes'])} | {fits} | "
                       f"{p['flops'] / 1e12:.1f} | {roof} | {mfu} | {p['compile_s']:.0f} |")
    out += ["", "| row | topology | extraction GiB/chip | fwd+bwd GiB/chip | bytes × | flops × | roofline × | "
            "extraction compile s | fwd+bwd compile s | train step compile s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in records.items():
        progs = rec["programs"]
        e, f, t = progs.get("extract_step"), progs.get("fwd_bwd_step"), progs.get("train_step")
        if e is None or f is None:
            continue
        vs = e.get("vs_fwd_bwd", {})
        train_compile = "-" if t is None else f"{t['compile_s']:.0f}"
        out.append(f"| {name} | {rec['topology']} | {_gib(e['total_bytes'])} | {_gib(f['total_bytes'])} | "
                   f"{_x(vs.get('total_bytes'))} | {_x(vs.get('flops'))} | {_x(vs.get('roofline_s'))} | "
                   f"{e['compile_s']:.0f} | {f['compile_s']:.0f} | {train_compile} |")
    out += ["", "| row | topology | tasks | extraction (all tasks) | joint epoch (training steps) | "
            "extraction / joint |", "|---|---|---|---|---|---|"]
    for name, rec in records.items():
        run_ = rec["run"]
        extract_s, joint_s = run_["extract"]["seconds"], run_["joint"].get("train_seconds")
        if extract_s is None or joint_s is None:
            continue
        out.append(f"| {name} | {rec['topology']} | {run_['tasks']} | {_time(extract_s)} | {_time(joint_s)} "
                   f"({run_['joint']['steps']} steps) | {100 * extract_s / joint_s:.1f} % |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated substrings of row names")
    ap.add_argument("--programs", default=None, help="override every row's --programs")
    ap.add_argument("--json-dir", default=None, help="keep each row's plan JSON here (default: a temp dir)")
    ap.add_argument("--from-json", default=None, help="print the tables from the JSON files in this directory")
    ap.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    args = ap.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    names = [n for n in ROWS if not wanted or any(w in n for w in wanted)]
    if args.from_json:
        records = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(args.from_json).glob("*.json"))
                   if p.stem in names}
        records = {n: records[n] for n in names if n in records}
        print(all_tables(records))
        return 0
    if args.list:
        for n in names:
            print(f"{n}: {' '.join(command(n, pathlib.Path(args.json_dir or 'DIR') / f'{n}.json', args.programs)[1:])}")
        return 0
    json_dir = pathlib.Path(args.json_dir or tempfile.mkdtemp(prefix="plan_tables_"))
    json_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for n in names:
        rec = run(n, json_dir, args.programs)
        if rec is not None:
            records[n] = rec
    print(all_tables(records))
    print(f"\n(JSON in {json_dir})", file=sys.stderr)
    return 0 if len(records) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
