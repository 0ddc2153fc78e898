"""Reproduction study on the shipped synthetic mixture: MERIT 1D/2D/3D against joint training (1 and 2
epochs), random 2/4/8, the conflict split and the uniform soup, at equal training tokens, over seeds.

    python bench/repro_study.py [--seeds 0 1 2] [--out runs/study] [--doc docs/RESULTS.md] [-- --config.KEY=V ...]

Per seed, one 2D run trains every baseline (joint, joint2, random 4, conflict 4, uniform soup of its branches);
the 1D and 3D runs reuse its θ⁰, data and gradients (copied) and add random 2 / random 8. Every model is scored
by the `evaluate` stage on the same held-out examples. Writes a markdown table (mean ± std over seeds) and the
wall time of each stage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = [  # (label, run depth, model name in evaluate/results.json)
    ("joint training (1 ep)", 2, "joint"), ("joint training (2 ep)", 2, "joint2"),
    ("random (2 groups)", 1, "random"), ("random (4 groups)", 2, "random"), ("random (8 groups)", 3, "random"),
    ("conflict-induced (4 groups)", 2, "conflict"), ("uniform soup (4)", 2, "uniform"),
    ("MERIT 1D (2 groups)", 1, "merit"), ("MERIT 2D (4 groups)", 2, "merit"), ("MERIT 3D (8 groups)", 3, "merit"),
    ("θ⁰ (before fine-tuning)", 2, "theta0"),
]


def run(workdir: pathlib.Path, seed: int, depth: int, baselines: tuple[str, ...], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "merit_jax.main", "--config", "configs/default.py", "--workdir", str(workdir),
           f"--config.seed={seed}", f"--config.data.seed={seed}", f"--config.split.seed={seed}",
           f"--config.split.depth={depth}", f"--config.evaluate.baselines={baselines!r}", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((workdir / "evaluate" / "results.json").read_text())


def timings(workdir: pathlib.Path) -> dict[str, float]:
    return {json.loads(f.read_text())["stage"]: json.loads(f.read_text())["seconds"]
            for f in sorted((workdir / "timings").glob("*.json"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "study")
    p.add_argument("--doc", type=pathlib.Path, default=None, help="write the markdown table here too")
    args, extra = p.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    results: dict[tuple[int, int], dict] = {}
    walls: dict[int, dict[str, float]] = {}
    start = time.time()
    for seed in args.seeds:
        base = args.out / f"seed{seed}"
        results[(seed, 2)] = run(base / "d2", seed, 2, ("joint", "joint2", "random", "conflict", "uniform"), extra)
        for depth in (1, 3):
            w = base / f"d{depth}"
            for part in ("basin", "extract", "data"):
                if not (w / part).exists() and (base / "d2" / part).exists():
                    shutil.copytree(base / "d2" / part, w / part)
            results[(seed, depth)] = run(w, seed, depth, ("random",), extra)
        walls[seed] = timings(base / "d2")
    table = render(results, args.seeds, walls, extra, time.time() - start)
    print(table)
    if args.doc:
        args.doc.write_text(table)
    return 0


def render(results, seeds, walls, extra, seconds) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"Seeds {seeds}; commit {commit}; {datetime.date.today()}; overrides: {extra or 'none'}; "
             f"total wall time {seconds / 60:.1f} min.", "",
             "| method | held-out exact match | held-out loss |", "|---|---|---|"]
    for label, depth, name in ROWS:
        acc = [results[(s, depth)]["models"][name]["mean_accuracy"] for s in seeds]
        loss = [results[(s, depth)]["models"][name]["mean_loss"] for s in seeds]
        lines.append(f"| {label} | {np.mean(acc):.3f} ± {np.std(acc):.3f} | {np.mean(loss):.3f} ± {np.std(loss):.3f} |")
    stages = sorted({k for w in walls.values() for k in w})
    lines += ["", "Wall time of the 2D run's stages (s, mean over seeds; `evaluate` includes training the "
              "baselines):", "", "| " + " | ".join(stages) + " |", "|" + "---|" * len(stages),
              "| " + " | ".join(f"{np.mean([w.get(k, 0) for w in walls.values()]):.1f}" for k in stages) + " |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
