"""The robustness suite: every deployment shift for one or more phase-2 checkpoints, into one table.

    python -m lightning_modules.robustness --checkpoints runs/pipeline_quickstart/ours/seed_*/phase2/checkpoints/last.ckpt \\
        --trials 50 --out runs/robustness

For each checkpoint (a seed) and each shift of :mod:`lightning_modules.evaluation.shifts` that applies to its
filter's observations, ``--trials`` fresh trials are played; ``<out>/robustness.json`` holds every summary and
``<out>/robustness.md`` the table: success per episode, mean over the checkpoints with a 95% interval (Student-t
over checkpoints when there are several, else binomial over the trials).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from envs.gl import select_headless_gl

select_headless_gl()

import numpy as np  # noqa: E402

from envs.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from envs.errors import run_command  # noqa: E402
from lightning_modules.cql.module import LatentCQLModule  # noqa: E402
from lightning_modules.evaluation.protocol import default_episodes  # noqa: E402
from lightning_modules.evaluation.results import MethodCurve  # noqa: E402
from lightning_modules.evaluation.runner import run_trials  # noqa: E402
from lightning_modules.evaluation.shifts import SHIFTS, get_shift  # noqa: E402


def checkpoint_label(path: Path) -> str:
    """``<method>/<seed>`` for a pipeline checkpoint (``.../<method>/seed_k/phase2/checkpoints/x.ckpt``), else the
    path."""
    parts = path.resolve().parts
    if len(parts) >= 5 and parts[-3] == "phase2" and parts[-4].startswith("seed_"):
        return f"{parts[-5]}/{parts[-4]}"
    return str(path)


def table(rows: list[dict], episodes: int) -> str:
    """Markdown: one row per shift, success per episode as mean +- 95% interval over the checkpoints."""
    lines = ["| shift | what changes | checkpoints | trials | " + " | ".join(f"episode {e + 1}" for e in range(episodes))
             + " |", "|---|---|---:|---:|" + "---:|" * episodes]
    for row in rows:
        curve = MethodCurve(row["shift"], row["checkpoints"], np.array(row["per_checkpoint"], dtype=float), row["trials"])
        cells = [f"{m:.2f} ± {h:.2f}" for m, h in zip(curve.mean, curve.ci95)]
        lines.append(f"| {row['shift']} | {row['description']} | {len(row['checkpoints'])} | {row['trials']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (named errors: one line, exit 2)."""
    p = argparse.ArgumentParser(prog="python -m lightning_modules.robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="phase-2 checkpoints (e.g. one per seed)")
    p.add_argument("--shifts", nargs="+", default=None, help=f"default: every one that applies ({sorted(SHIFTS)})")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--episodes", type=int, default=None, help="default: one more than the drawers (3 for two)")
    p.add_argument("--seed", type=int, default=2000, help="trial seed (fresh: not the training-time evaluations')")
    p.add_argument("--out", type=Path, required=True, help="folder for robustness.json and robustness.md")
    args = p.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.trials < 1 or (args.episodes is not None and args.episodes < 1):
        raise ValueError(f"--trials and --episodes must be >= 1, got {args.trials} and {args.episodes}")
    for name in args.shifts or []:
        get_shift(name)
    paths = [Path(c) for c in args.checkpoints]
    missing = [str(c) for c in paths if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"--checkpoints: {', '.join(missing)} not found")
    args.out.mkdir(parents=True, exist_ok=True)
    models = {}
    for i, path in enumerate(paths):  # every file readable before the first trial
        label = checkpoint_label(path)
        models[label if label not in models else f"{label} (#{i + 1})"] = LatentCQLModule.load_phase2(path)
    results: dict[str, dict[str, dict]] = {}
    for name in args.shifts or list(SHIFTS):
        shift = SHIFTS[name]
        for label, model in models.items():
            try:
                get_shift(name, model.filter.obs_keys)
            except ValueError:
                if args.shifts:  # asked for by name: say why not
                    raise
                continue  # e.g. an image shift for a state checkpoint
            start = time.perf_counter()
            result = run_trials(model, trials=args.trials,
                                episodes=args.episodes or default_episodes(model.filter.num_tasks), seed=args.seed,
                                shift=shift)
            results.setdefault(name, {})[label] = result.summary
            rates = ", ".join(f"{r:.2f}" for r in result.summary["success_per_episode"])
            print(f"{name:>15} {label}: [{rates}] ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = [{"shift": name, "description": SHIFTS[name].description, "checkpoints": list(per),
             "trials": min(s["trials"] for s in per.values()),
             "per_checkpoint": [s["success_per_episode"] for s in per.values()]} for name, per in results.items()]
    write_json_atomic(args.out / "robustness.json", {"trials": args.trials, "seed": args.seed, "rows": rows,
                                                     "summaries": results})
    text = table(rows, min(len(s) for r in rows for s in r["per_checkpoint"]) if rows else (args.episodes or 0))
    write_text_atomic(args.out / "robustness.md", text + "\n")
    print(f"\n{text}\n\nwrote {args.out / 'robustness.json'} and {args.out / 'robustness.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
