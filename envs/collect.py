"""Collect the offline per-task datasets with the scripted behaviour policies.

    python -m envs.collect                                   # small embedded default -> data/quickstart
    python -m envs.collect --config configs/data/two_drawers.yaml [key=value ...]

Rollout ``j`` of task ``i`` always uses the seed derived from (seed, i, j), so a killed run started again
re-collects only the unfinished rollouts and ends with exactly the dataset an uninterrupted run makes.
Workers are separate processes (each with its own EGL context) writing into the shared memory-mapped
buffers; only the main process marks rollouts finished.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from envs.gl import select_headless_gl

select_headless_gl()

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from envs.dataset import (  # noqa: E402
    DatasetMetadata,
    OfflineDataset,
    buffer_dir,
    create_or_extend,
    obs_keys,
    open_progress,
    read_metadata,
)
from envs.scripted import DrawerOpener  # noqa: E402
from envs.two_drawers import EnvConfig, SawyerTwoDrawersEnv  # noqa: E402


@dataclass
class CollectConfig:
    """Everything ``python -m envs.collect`` reads from its YAML config (and ``key=value`` overrides)."""

    root: str = "data/quickstart"
    rollouts_per_task: int = 20
    seed: int = 0
    noise_std: float = 0.3
    workers: int = 2
    preview: bool = True
    env: dict[str, Any] = field(default_factory=lambda: {"obs_mode": "pixels_state", "image_size": 64})


def rollout_seed(seed: int, task: int, index: int) -> int:
    """The seed of rollout ``index`` of task ``task`` (independent of worker count and order)."""
    return int(np.random.SeedSequence([seed, task, index]).generate_state(1)[0])


def run_rollout(env: SawyerTwoDrawersEnv, task: int, seed: int, noise_std: float) -> TensorDict:
    """One episode of the scripted opener of drawer ``task``, as a TensorDict of batch size [T]."""
    policy = DrawerOpener(task, noise_std=noise_std, seed=seed)
    obs, _ = env.reset(seed=seed, options={"task": task})
    steps: dict[Any, list[np.ndarray]] = {}

    def add(key: Any, value: Any) -> None:
        steps.setdefault(key, []).append(np.asarray(value))

    for _ in range(env.config.episode_length):
        if "pixels" in obs:
            add("pixels", obs["pixels"].transpose(2, 0, 1))
        if "state" in obs:
            add("state", obs["state"])
        action = policy(env)
        obs, reward, terminated, truncated, info = env.step(action)
        add("action", action)
        add(("next", "reward"), [reward])
        add(("next", "terminated"), [terminated])
        add(("next", "truncated"), [truncated])
        add(("next", "done"), [terminated or truncated])
        add(("next", "success"), [info["success"]])
        add("task", task)
    t = env.config.episode_length
    return TensorDict({k: torch.from_numpy(np.stack(v)) for k, v in steps.items()}, batch_size=[t]).apply(
        lambda x: x.float() if x.dtype == torch.float64 else x
    )


class _Writer:
    """Runs rollouts and writes them into the memory-mapped buffers (one per process)."""

    def __init__(self, root: str, meta: dict[str, Any]):
        self.meta = DatasetMetadata.from_dict(meta)
        self.env = SawyerTwoDrawersEnv(self.meta.env)
        n = self.meta.rollouts_per_task
        self.buffers = [TensorDict.load_memmap(buffer_dir(Path(root), i, n)) for i in range(self.meta.num_tasks)]

    def __call__(self, job: tuple[int, int]) -> tuple[int, int]:
        task, index = job
        rollout = run_rollout(self.env, task, rollout_seed(self.meta.seed, task, index), self.meta.noise_std)
        self.buffers[task][index] = rollout
        return job


_WORKER: _Writer | None = None


def _init_worker(root: str, meta: dict[str, Any]) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _Writer(root, meta)


def _work(job: tuple[int, int]) -> tuple[int, int]:
    assert _WORKER is not None
    return _WORKER(job)


def collect_dataset(
    root: str | os.PathLike,
    env: EnvConfig,
    rollouts_per_task: int,
    seed: int = 0,
    noise_std: float = 0.3,
    workers: int = 0,
    progress: bool = True,
) -> OfflineDataset:
    """Collect (or finish, or extend) the dataset at ``root`` and return it opened.

    ``workers=0`` collects in this process. A dataset made with other env parameters, seed or noise is
    refused with :class:`envs.dataset.DatasetError`; one with at least ``rollouts_per_task`` finished
    rollouts per task is returned as it is.
    """
    if rollouts_per_task < 1:
        raise ValueError(f"rollouts_per_task must be >= 1, got {rollouts_per_task}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    SawyerTwoDrawersEnv(env).close()  # validates the env parameters before anything is written
    root = Path(root)
    wanted = DatasetMetadata(env=env, rollouts_per_task=rollouts_per_task, seed=seed, noise_std=noise_std)
    create_or_extend(root, wanted)
    meta = read_metadata(root)
    flags = open_progress(root, meta, mode="r+")
    jobs = [(int(t), int(i)) for t, i in zip(*np.nonzero(~flags))]
    if jobs:
        for task, index in _run(str(root), meta, jobs, workers, progress):
            flags[task, index] = True
            flags.flush()
    del flags
    return OfflineDataset(root)


def _run(root: str, meta: DatasetMetadata, jobs: list[tuple[int, int]], workers: int, progress: bool) -> Iterable[tuple[int, int]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("collecting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress)
    with bar:
        task_id = bar.add_task("rollouts", total=len(jobs))
        if workers == 0:
            writer = _Writer(root, meta.to_dict())
            results: Iterable[tuple[int, int]] = map(writer, jobs)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(root, meta.to_dict()))
            results = pool.imap_unordered(_work, jobs)
        try:
            for done in results:
                bar.advance(task_id)
                yield done
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


def load_config(path: str | None, overrides: list[str]) -> CollectConfig:
    """Read a collection config (YAML) and ``key=value`` overrides; unknown keys raise ValueError naming them."""
    from omegaconf import OmegaConf

    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file not found: {path}")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[assignment]
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must be a mapping of keys to values")
    if overrides:
        data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(overrides)), resolve=True)  # type: ignore[assignment]
    known = {f.name for f in fields(CollectConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown collection config key(s) {unknown}; known keys: {sorted(known)}")
    config = CollectConfig(**data)
    EnvConfig.from_dict(config.env)  # fail early on unknown env parameters
    return config


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m envs.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML collection config (default: small embedded quickstart)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollouts_per_task=50 env.image_size=32")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        env = EnvConfig.from_dict(config.env)
        dataset = collect_dataset(config.root, env, config.rollouts_per_task, config.seed, config.noise_std, config.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(dataset)
    if config.preview:
        if "pixels" in obs_keys(env):
            from envs.preview import write_preview

            path = write_preview(dataset, Path(config.root) / "preview.png")
            print(f"preview grid: {path}")
        else:
            print("preview skipped: the dataset has no pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
