"""Evaluate a saved phase-2 checkpoint online and write the same JSON as the training-time evaluation.

    python -m lightning_modules.evaluate --checkpoint runs/cql_quickstart/version_0/checkpoints/last.ckpt \\
        --trials 50 --episodes 3 --out results.json

The checkpoint is self-contained (the filter's weights and hyper-parameters and the dataset's env parameters are
stored in it); ``--dataset ROOT`` takes the env parameters from a dataset's metadata instead (e.g. for a checkpoint
written before they were stored). ``--video out.mp4`` also writes trial 0 as a video (moviepy<2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from envs.gl import select_headless_gl

select_headless_gl()

import torch  # noqa: E402

from envs.errors import run_command  # noqa: E402

from lightning_modules.cql.module import LatentCQLModule  # noqa: E402
from lightning_modules.evaluation.protocol import SUCCESS_METRICS, default_episodes, eval_env_config  # noqa: E402
from lightning_modules.evaluation.results import write_results  # noqa: E402
from lightning_modules.evaluation.runner import run_trials  # noqa: E402
from lightning_modules.evaluation.shifts import NOMINAL, SHIFTS, get_shift  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lightning_modules.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="phase-2 (LatentCQLModule) checkpoint")
    p.add_argument("--trials", type=int, default=50, help="number of trials M (target drawn uniformly per trial)")
    p.add_argument("--episodes", type=int, default=None, help="episodes E per trial (belief carried over; default: "
                   "one more than the drawers, i.e. 3 for two)")
    p.add_argument("--out", required=True, help="JSON file to write (atomically)")
    p.add_argument("--num-envs", type=int, default=None, help="envs stepped in lockstep (default min(trials, 32))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--success-metric", choices=SUCCESS_METRICS, default="last")
    p.add_argument("--dataset", default=None, help="take the env parameters from this dataset's metadata")
    p.add_argument("--device", default="cpu")
    p.add_argument("--video", default=None, help="also write trial 0 as a video file (e.g. trial0.mp4)")
    p.add_argument("--shift", default=NOMINAL, choices=sorted(SHIFTS),
                   help="deployment shift (lightning_modules/evaluation/shifts.py); default: the training conditions")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before the checkpoint is loaded or a trial runs (named ``ValueError``)."""
    if args.trials < 1 or (args.episodes is not None and args.episodes < 1):
        raise ValueError(f"--trials and --episodes must be >= 1, got {args.trials} and {args.episodes}")
    if args.num_envs is not None and args.num_envs < 1:
        raise ValueError(f"--num-envs must be >= 1, got {args.num_envs}")
    check_writable_file(args.out, "--out")
    if args.video is not None:
        check_writable_file(args.video, "--video")


def check_writable_file(path: str, option: str) -> None:
    """``option``'s file can be written: not a folder, its folder exists (or can be made) and is writable."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder: give a file name, e.g. {Path(path) / 'results.json'}")
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"{option} {path}: its folder cannot be created ({err.strerror})") from err
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise PermissionError(f"{option} {path} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (named errors: one line, exit 2; see :mod:`envs.errors`)."""
    args = parse_args(argv)
    return run_command(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    check_args(args)
    model = LatentCQLModule.load_phase2(args.checkpoint, map_location="cpu").to(args.device)
    env_source = model.env_config
    if args.dataset is not None:
        from envs.dataset import read_metadata

        env_source = read_metadata(args.dataset).env
    shift = get_shift(args.shift, model.filter.obs_keys)
    cfg = eval_env_config(model.filter, env_source)
    episodes = args.episodes or default_episodes(model.filter.num_tasks)
    result = run_trials(model, cfg, trials=args.trials, episodes=episodes, num_envs=args.num_envs,
                        seed=args.seed, success_metric=args.success_metric, video=args.video is not None, shift=shift)
    data = {"env_config": shift.env_config(cfg).to_dict(), "checkpoint": str(Path(args.checkpoint).resolve()),
            "shift": {"name": shift.name, "description": shift.description, "action_noise": shift.action_noise,
                      "obs_noise": shift.obs_noise},
            "evaluations": [{"step": model.loaded_step, "epoch": model.loaded_epoch, **result.to_json()}]}
    path = write_results(args.out, data)
    s = result.summary
    rates = ", ".join(f"{r:.2f}" for r in s["success_per_episode"])
    label = "" if shift.name == NOMINAL else f"shift {shift.name}: "
    print(f"{label}success per episode ({s['success_metric']} step, {s['trials']} trials): [{rates}]; "
          f"{s['episodes_per_second']:.1f} episodes/s; wrote {path}")
    if args.video is not None and result.video is not None:
        _write_video(result.video, args.video)
    return 0


def _write_video(video: torch.Tensor, path: str, fps: int = 10) -> None:
    from moviepy.editor import ImageSequenceClip

    frames = list(video[0].permute(0, 2, 3, 1).numpy())
    ImageSequenceClip(frames, fps=fps).write_videofile(path, logger=None)


if __name__ == "__main__":
    sys.exit(main())
