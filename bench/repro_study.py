"""Reproduction study on the shipped synthetic mixture: MERIT 1D/2D/3D against joint training (1 and 2
epochs), random 2/4/8, the conflict split and the uniform soup, at equal training tokens, over seeds.

    python bench/repro_study.py [--seeds 0 1 2] [--out runs/study] [--doc FILE] [-- --config.KEY=V ...]
    python bench/repro_study.py --split-only [--seeds 0 1 2 3 4] [--out runs/split_study] [-- --config.KEY=V ...]

Per seed, one 2D run trains every baseline (joint, joint2, random 4, conflict 4, uniform soup of its branches);
the 1D and 3D runs reuse its θ⁰, data and gradients (copied) and add random 2 / random 8. Every model is scored
by the `evaluate` stage on the same held-out examples. Writes a markdown table (mean ± std over seeds), the
wall time of each stage, and per seed the merge diagnostics and the split's family separation.

--split-only runs just the `basin` and `extract` stages (reduction=full) per seed and measures the split at
that θ⁰: family separation of the top-level cut and of the depth-2 groups against 200 seeded token-balanced
random splits, mean cosine within and across families, the calibration-stability curve, and whether
`sketch` (extract.dim) and `stride` (extract.stride) give exactly the split `full` gives (with the largest
cosine error of each). ~30 s per seed on 2 CPU cores.
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
sys.path.insert(0, str(ROOT))  # configs/ and merit_jax/ of this checkout
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


def stage(workdir: pathlib.Path, seed: int, name: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "merit_jax.main", "--config", "configs/default.py", "--workdir", str(workdir),
           f"--config.seed={seed}", f"--config.data.seed={seed}", f"--config.split.seed={seed}", "--stage", name,
           *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def split_measures(workdir: pathlib.Path, seed: int, extra: list[str]) -> dict:
    """The split at the θ⁰ of the default config (with `extra` overrides): see the module docstring."""
    import jax
    import jax.numpy as jnp

    from configs.default import get_config
    from merit_jax.io import checkpoint
    from merit_jax import sketch as sk
    from merit_jax import partition as S

    stage(workdir, seed, "basin", extra)
    stage(workdir, seed, "extract", [*extra, "--config.extract.reduction=full"])
    record = json.loads((workdir / "extract" / "tasks.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    e = config.get("extract", {})
    defaults = get_config()
    dim, stride = int(e.get("dim", defaults.extract.dim)), int(e.get("stride", defaults.extract.stride))
    sketch_seed = int(e.get("seed", seed))
    depth = int(config.get("split", {}).get("depth", defaults.split.depth))
    tasks = record["tasks"]
    names = [t["name"] for t in tasks]
    families = [t["family"] for t in tasks]
    tokens = np.array([t["train_tokens"] for t in tasks])
    grads = np.load(workdir / "extract" / "task_grads.npy")
    specs = checkpoint.tensor_specs(workdir / "basin")
    layout = sk.Layout(tuple(record["params"]["names"]),
                       tuple(tuple(specs[n][0]) for n in record["params"]["names"]))

    def reduce(x):
        flat = {n: x[o:o + k].reshape(sh) for n, o, k, sh in zip(layout.names, layout.offsets, layout.sizes,
                                                                   layout.shapes)}
        return sk.reduce_flat(flat, layout, "sketch", d=dim, seed=sketch_seed)

    reduced = {"sketch": np.asarray(jax.jit(jax.vmap(reduce))(jnp.asarray(grads))), "stride": grads[:, ::stride]}
    cos = S.cosine_matrix(grads)
    fam = np.asarray(families)
    off = ~np.eye(len(names), dtype=bool)
    same = (fam[:, None] == fam[None, :]) & off
    groups = S.conflict_split(grads, tokens, depth, names=names)
    half = len(groups) // 2
    top = [sorted(sum(groups[:half], [])), sorted(sum(groups[half:], []))]
    out = {"top": S.family_separation(top, families, tokens, n_random=200),
           "final": S.family_separation(groups, families, tokens, n_random=200),
           "cos_within": float(cos[same].mean()), "cos_across": float(cos[~same & off].mean()),
           "stability": json.loads((workdir / "extract" / "stability.json").read_text())}
    for label, rows in reduced.items():
        err = np.abs(S.cosine_matrix(rows) - cos)[off]
        out[label] = {"max_cos_err": float(err.max()),
                      "equal": [S.conflict_split(rows, tokens, d, names=names) ==
                                S.conflict_split(grads, tokens, d, names=names) for d in (1, depth)]}
    return out


def render_split(measures: dict[int, dict], extra: list[str], seconds: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"Seeds {sorted(measures)}; commit {commit}; {datetime.date.today()}; overrides: {extra or 'none'}; "
             f"total wall time {seconds / 60:.1f} min.", "",
             "| seed | top-level cut: ARI (random: mean ± std), rank | depth-2 groups: ARI / purity | cosine within / "
             "across families | calibration stability m=10 / 50 / 100 | sketch = full (depth 1, 2); max cos err | "
             "stride = full; max cos err |", "|---|---|---|---|---|---|---|"]
    for seed, m in sorted(measures.items()):
        t, f, st = m["top"], m["final"], m["stability"]
        curve = dict(zip(st.get("m", []), st.get("mean", [])))
        stab = " / ".join(f"{curve[k]:.2f}" if k in curve else "–" for k in (10, 50, 100))
        red = {k: f"{'yes' if all(m[k]['equal']) else 'no ' + str(m[k]['equal'])}; {m[k]['max_cos_err']:.3f}"
               for k in ("sketch", "stride")}
        lines.append(f"| {seed} | {t['ari']:.2f} ({t['random_ari_mean']:+.2f} ± {t['random_ari_std']:.2f}), "
                     f"{t['random_ari_rank']:.2f} | {f['ari']:.2f} / {f['purity']:.2f} | {m['cos_within']:+.2f} / "
                     f"{m['cos_across']:+.2f} | {stab} | {red['sketch']} | {red['stride']} |")
    return "\n".join(lines) + "\n"


def timings(workdir: pathlib.Path) -> dict[str, float]:
    return {json.loads(f.read_text())["stage"]: json.loads(f.read_text())["seconds"]
            for f in sorted((workdir / "timings").glob("*.json"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "study")
    p.add_argument("--doc", type=pathlib.Path, default=None, help="write the markdown table here too")
    p.add_argument("--split-only", action="store_true", help="only basin + extract + the split measures")
    args, extra = p.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    if args.split_only:
        start = time.time()
        measures = {seed: split_measures(args.out / f"seed{seed}", seed, extra) for seed in args.seeds}
        table = render_split(measures, extra, time.time() - start)
        print(table)
        if args.doc:
            args.doc.write_text(table)
        return 0
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
    partitions = {seed: json.loads((args.out / f"seed{seed}" / "d2" / "split" / "partition.json").read_text())
                  for seed in args.seeds}
    table = render(results, args.seeds, walls, extra, time.time() - start, partitions)
    print(table)
    if args.doc:
        args.doc.write_text(table)
    return 0


def render(results, seeds, walls, extra, seconds, partitions=None) -> str:
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
    diags = {s: results[(s, 2)].get("diagnostics", {}) for s in seeds}
    lines += ["", "Per seed, the 2D run: merge diagnostics and the MERIT split against the task families "
              "(ARI; in brackets the mean ± std over 100 seeded token-balanced random splits, as the split stage records it):", "",
              "| | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]

    def row(label, fn):
        cells = []
        for s in seeds:
            try:
                cells.append(fn(s))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("max LMC barrier (θ⁰ and the branches, all pairs)",
        lambda s: f"{max(p['barrier'] for p in diags[s]['lmc']):.4f}")
    row("merging gain Σ w_k L(θ_k) − L(θ̄) (Theorem 1: ≥ 0)", lambda s: f"{diags[s]['merging_gain']:.4f}")
    row("‖θ_joint − θ⁰‖ / ‖θ̄ − θ⁰‖",
        lambda s: f"{diags[s]['displacement']['joint'] / diags[s]['displacement']['merit']:.2f}")
    if partitions:
        sep = lambda s, key: partitions[s][key]
        row("top-level cut vs families: ARI (random)", lambda s: (
            f"{sep(s, 'family_separation_top_level')['ari']:.2f} "
            f"({sep(s, 'family_separation_top_level')['random_ari_mean']:+.2f} ± "
            f"{sep(s, 'family_separation_top_level')['random_ari_std']:.2f})"))
        row("4 groups vs families: ARI / purity", lambda s: (
            f"{sep(s, 'family_separation')['ari']:.2f} / {sep(s, 'family_separation')['purity']:.2f}"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
