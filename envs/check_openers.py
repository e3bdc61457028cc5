"""Measure the scripted openers under a collection config's conditions and print a table (no learning here).

    python -m envs.check_openers --config configs/collect/drawers3_state.yaml --episodes 100
    python -m envs.check_openers --config configs/collect/drawers3_state.yaml --preview docs/drawers3_preview.png

Per drawer: success at the last step (the drawer open beyond ``open_threshold``), how far the other drawers moved
(the most any of them moved in any episode), and the median step at which the drawer first counted as open. The
episodes use the collector's seeds and noise, so the figures describe the data. ``--preview`` writes a PNG: the
scene after reset, then the last frame of one episode per drawer (at 128 px, or ``--preview-size``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from envs.collect import load_config, rollout_seed
from envs.errors import run_command
from envs.scripted import DrawerOpener
from envs.two_drawers import EnvConfig, SawyerTwoDrawersEnv, task_names


def measure(env_config: EnvConfig, episodes: int, noise_std: float, seed: int) -> list[dict[str, Any]]:
    """One row per drawer: ``success``, ``others_moved_cm`` (max over episodes), ``median_open_step``."""
    env = SawyerTwoDrawersEnv(EnvConfig.from_dict({**env_config.to_dict(), "obs_mode": "state"}))
    rows = []
    try:
        for task, name in enumerate(task_names(env.num_tasks)):
            successes, moved, first_open = 0, 0.0, []
            for index in range(episodes):
                episode_seed = rollout_seed(seed, task, index)
                policy = DrawerOpener(task, noise_std=noise_std, seed=episode_seed)
                env.reset(seed=episode_seed, options={"task": task})
                first = None
                for t in range(env.config.episode_length):
                    _, _, _, _, info = env.step(policy(env))
                    first = t + 1 if first is None and info["success"] else first
                    moved = max(moved, float(np.delete(env.openings(), task).max()))
                successes += bool(info["success"])
                first_open.append(first if first is not None else np.nan)
            rows.append({"drawer": task, "name": name, "success": successes / episodes, "episodes": episodes,
                         "others_moved_cm": 100.0 * moved,
                         "median_open_step": float(np.nanmedian(first_open)) if successes else float("nan")})
    finally:
        env.close()
    return rows


def table(rows: list[dict[str, Any]], episode_length: int) -> str:
    """Markdown table of :func:`measure`'s rows."""
    lines = ["| drawer | success | other drawers moved (max) | median step first open (of "
             f"{episode_length}) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['drawer']} ({r['name']}) | {r['success']:.2f} ({r['episodes']} episodes) | "
              f"{r['others_moved_cm']:.2f} cm | {r['median_open_step']:.0f} |" for r in rows]
    return "\n".join(lines)


def write_preview(env_config: EnvConfig, path: str | os.PathLike, size: int, noise_std: float, seed: int) -> Path:
    """PNG: the scene after reset, then the last frame of one opener episode per drawer; written atomically."""
    from PIL import Image

    env = SawyerTwoDrawersEnv(EnvConfig.from_dict({**env_config.to_dict(), "obs_mode": "pixels", "image_size": size}))
    try:
        frames = [env.reset(seed=seed, options={"task": 0})[0]["pixels"]]
        for task in range(env.num_tasks):
            policy = DrawerOpener(task, noise_std=noise_std, seed=seed)
            obs, _ = env.reset(seed=seed, options={"task": task})
            for _ in range(env.config.episode_length):
                obs, *_ = env.step(policy(env))
            frames.append(obs["pixels"])
    finally:
        env.close()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    Image.fromarray(np.concatenate(frames, axis=1)).save(tmp)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (named errors: one line, exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m envs.check_openers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="collection config (YAML) whose env and noise to use")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per drawer")
    parser.add_argument("--preview", default=None, help="also write this PNG (scene, then each drawer opened)")
    parser.add_argument("--preview-size", type=int, default=128)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. env.num_drawers=4")
    args = parser.parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.episodes < 1 or args.preview_size < 8:
        raise ValueError(f"--episodes must be >= 1 and --preview-size >= 8, got {args.episodes}, {args.preview_size}")
    config = load_config(args.config, args.overrides)
    env_config = EnvConfig.from_dict(config.env)
    if args.preview is not None:
        print(f"wrote {write_preview(env_config, args.preview, args.preview_size, config.noise_std, config.seed)}")
    rows = measure(env_config, args.episodes, config.noise_std, config.seed)
    print(f"{env_config.num_drawers} drawers, noise_std {config.noise_std}, hand_offset {list(env_config.hand_offset)}")
    print(table(rows, env_config.episode_length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
