"""Seconds to build the envs of one lockstep evaluation: the scene compiled per env vs once per process.

An evaluation (``lightning_modules.evaluation.runner.MetaRolloutRunner``) builds one ``SawyerTwoDrawersEnv`` per
lockstep trial, and the periodic evaluation callback builds them again every time it runs. ``envs.scene.build_model``
compiles each scene configuration once per process and gives every env its own copy of the compiled model; this
script measures both ways on this machine, for 2, 3 and 4 drawers (state observations, no rendering):

* ``compile per env``: the cache emptied before every env, so each compiles (what every env did before the cache),
* ``compiled once``: the first env compiles, the others copy (``build_model``; the cache is cleared first).

Usage (repo root)::

    MUJOCO_GL=egl python benchmarks/bench_env_build.py --envs 32 --drawers 2 3 4
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.gl import select_headless_gl  # noqa: E402

select_headless_gl()

import torch  # noqa: E402

from envs import scene  # noqa: E402
from envs.two_drawers import EnvConfig, SawyerTwoDrawersEnv  # noqa: E402


def build_envs(num_drawers: int, num_envs: int, cached: bool) -> float:
    """Seconds to construct ``num_envs`` envs of ``num_drawers`` drawers; ``cached=False`` empties the compiled-scene
    cache before every env, so that each one compiles its scene (as every env did before the cache)."""
    config = EnvConfig(num_drawers=num_drawers, obs_mode="state")
    scene._compiled_model.cache_clear()
    envs = []
    start = time.perf_counter()
    for _ in range(num_envs):
        if not cached:
            scene._compiled_model.cache_clear()
        envs.append(SawyerTwoDrawersEnv(config))
    seconds = time.perf_counter() - start
    for env in envs:
        env.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=32, help="envs per evaluation (default 32)")
    parser.add_argument("--drawers", type=int, nargs="+", default=[2, 3, 4], help="drawer counts (default 2 3 4)")
    args = parser.parse_args(argv)
    if args.envs < 1 or any(n < 2 for n in args.drawers):
        parser.error("--envs must be >= 1 and every --drawers value >= 2")
    print(f"# {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{args.envs} envs per evaluation\n")
    print("| drawers | compile per env (s) | compiled once (s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for n in args.drawers:
        build_envs(n, 1, cached=True)  # warm-up: imports, Metaworld's asset files in the page cache
        slow = build_envs(n, args.envs, cached=False)
        fast = build_envs(n, args.envs, cached=True)
        print(f"| {n} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
