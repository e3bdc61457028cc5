"""End-to-end offline data generation speed: rendered frames/s written into the memory-mapped dataset.

    python benchmarks/bench_collect.py [--image-size 64] [--rollouts 30] [--workers 1 2]

Each row collects a fresh dataset (2 tasks x rollouts x episode_length frames, pixels + state) in a temp
folder, with real physics, the scripted policies and MuJoCo rendering; process start-up is included.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.collect import collect_dataset  # noqa: E402
from envs.two_drawers import EnvConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=30, help="rollouts per task")
    parser.add_argument("--episode-length", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--envs-per-worker", type=int, nargs="+", default=[1],
                        help="envs stepped in lockstep per process; above 1 their frames are drawn as tiles")
    args = parser.parse_args()
    env = EnvConfig(obs_mode="pixels_state", image_size=args.image_size, episode_length=args.episode_length)
    frames = 2 * args.rollouts * args.episode_length
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    print()
    print("| workers | envs/worker | image | frames | seconds | frames/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for workers in args.workers:
        for envs in args.envs_per_worker:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                collect_dataset(Path(tmp) / "ds", env, args.rollouts, workers=workers, progress=False, envs_per_worker=envs)
                seconds = time.perf_counter() - start
            print(f"| {workers} | {envs} | {args.image_size} px | {frames} | {seconds:.1f} | {frames / seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
