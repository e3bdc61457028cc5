"""Collect the offline per-task datasets with the scripted behaviour policies.

    python -m envs.collect                                   # small embedded default -> data/quickstart
    python -m envs.collect --config configs/collect/two_drawers.yaml [key=value ...]
    python -m envs.collect --config configs/collect/two_drawers.yaml --verify   # check a collected dataset

Rollout ``j`` of task ``i`` always uses the seed derived from (seed, i, j), so a killed run started again
re-collects only the unfinished rollouts and ends with exactly the dataset an uninterrupted run makes.
Workers are separate processes (each with its own EGL context) writing into the shared memory-mapped
buffers; only the main process marks rollouts finished. With ``envs_per_worker > 1`` a worker steps that many
envs in lockstep and draws their frames as tiles of one offscreen buffer (:class:`envs.tiled_render.TiledRenderer`):
one read-back per step for all of them, which is what makes rendering fast on a GPU. Tiled frames equal
``mujoco.Renderer``'s up to rare 1-grey-level rounding differences, so keep one setting per dataset. Each rollout's
checksum (:mod:`envs.integrity`) is stored before the rollout is marked finished; ``--verify`` recomputes them.
``fail_fraction``: the share of rollouts that are failed attempts (the opener aims above the handle, nothing opens;
drawn per rollout from its seed, :func:`is_failed_attempt`): data in which a reach can come to nothing, as an
agent's own replay data would hold. 0 (the default) collects exactly what it did before the option existed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
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
    open_checksums,
    open_dataset,
    open_progress,
    read_metadata,
)
from envs.errors import run_command  # noqa: E402
from envs.integrity import rollout_checksum  # noqa: E402
from envs.scripted import MISS_AIM, DrawerOpener  # noqa: E402
from envs.keys import ACTION, DONE, PIXELS, REWARD, STATE, SUCCESS, TASK, TERMINATED, TRUNCATED  # noqa: E402
from envs.seeding import derive_seed  # noqa: E402
from envs.tiled_render import TiledRenderer  # noqa: E402
from envs.two_drawers import EnvConfig, SawyerTwoDrawersEnv  # noqa: E402
from envs.typed import check_types  # noqa: E402


@dataclass
class CollectConfig:
    """Everything ``python -m envs.collect`` reads from its YAML config (and ``key=value`` overrides)."""

    root: str = "data/quickstart"
    rollouts_per_task: int = 20
    seed: int = 0
    noise_std: float = 0.3
    fail_fraction: float = 0.0
    workers: int = 2
    envs_per_worker: int = 1
    preview: bool = True
    env: dict[str, Any] = field(default_factory=lambda: {"obs_mode": "pixels_state", "image_size": 64})


def rollout_seed(seed: int, task: int, index: int) -> int:
    """The seed of rollout ``index`` of task ``task`` (independent of worker count and order)."""
    return derive_seed(seed, task, index, bits=32)


FAIL_STREAM = 7  # the random stream of the failed-attempt draw


def is_failed_attempt(seed: int, fail_fraction: float) -> bool:
    """Whether the rollout of this seed is a failed attempt (its own stream: the opener's noise is unchanged)."""
    return fail_fraction > 0 and bool(np.random.default_rng(derive_seed(seed, FAIL_STREAM)).random() < fail_fraction)


def run_rollouts(
    envs: list[SawyerTwoDrawersEnv],
    tasks: list[int],
    seeds: list[int],
    noise_std: float,
    renderer: TiledRenderer | None = None,
    fail_fraction: float = 0.0,
) -> list[TensorDict]:
    """Episodes of the scripted openers, one per env, stepped in lockstep; TensorDicts of batch size [T].

    With ``renderer`` the frames of all envs are drawn by it (the envs must not render observations);
    without it each env renders its own ``pixels`` observation. A share ``fail_fraction`` of the rollouts are
    failed attempts (:func:`is_failed_attempt`).
    """
    n = len(tasks)
    policies = [DrawerOpener(task, noise_std=noise_std, seed=seed,
                             aim_offset=MISS_AIM if is_failed_attempt(seed, fail_fraction) else (0.0, 0.0, 0.0))
                for task, seed in zip(tasks, seeds)]
    obs = [env.reset(seed=seed, options={"task": task})[0] for env, task, seed in zip(envs[:n], tasks, seeds)]
    steps: list[dict[Any, list[np.ndarray]]] = [{} for _ in range(n)]
    keys = obs_keys(envs[0].config)

    def add(i: int, key: Any, value: Any) -> None:
        steps[i].setdefault(key, []).append(np.asarray(value))

    for _ in range(envs[0].config.episode_length):
        if renderer is not None:
            datas = [env.data for env in envs[:n]]
            frames = renderer.render(datas + [datas[-1]] * (renderer.num_envs - n))
            for i in range(n):
                obs[i][PIXELS] = frames[i]
        for i, env in enumerate(envs[:n]):
            if PIXELS in keys:
                add(i, PIXELS, obs[i][PIXELS].transpose(2, 0, 1))
            if STATE in keys:
                add(i, STATE, obs[i][STATE])
            action = policies[i](env)
            obs[i], reward, terminated, truncated, info = env.step(action)
            add(i, ACTION, action)
            add(i, REWARD, [reward])
            add(i, TERMINATED, [terminated])
            add(i, TRUNCATED, [truncated])
            add(i, DONE, [terminated or truncated])
            add(i, SUCCESS, [info["success"]])
            add(i, TASK, tasks[i])
    t = envs[0].config.episode_length
    return [
        TensorDict({k: torch.from_numpy(np.stack(v)) for k, v in record.items()}, batch_size=[t]).apply(
            lambda x: x.float() if x.dtype == torch.float64 else x
        )
        for record in steps
    ]


class _Writer:
    """Runs rollouts and writes them into the memory-mapped buffers (one per process)."""

    def __init__(self, root: str, meta: dict[str, Any], envs_per_worker: int = 1):
        self.meta = DatasetMetadata.from_dict(meta)
        tiled = envs_per_worker > 1 and PIXELS in obs_keys(self.meta.env)
        self.envs = [SawyerTwoDrawersEnv(self.meta.env, render_observations=not tiled) for _ in range(envs_per_worker)]
        self.renderer = TiledRenderer(self.envs[0].model, self.meta.env.image_size, envs_per_worker) if tiled else None
        n = self.meta.rollouts_per_task
        self.buffers = [TensorDict.load_memmap(buffer_dir(Path(root), i, n)) for i in range(self.meta.num_tasks)]

    def __call__(self, jobs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """Collect and write the rollouts; returns (task, index, checksum) for each."""
        tasks = [task for task, _ in jobs]
        seeds = [rollout_seed(self.meta.seed, task, index) for task, index in jobs]
        done = []
        for (task, index), rollout in zip(jobs, run_rollouts(self.envs, tasks, seeds, self.meta.noise_std, self.renderer,
                                                                  self.meta.fail_fraction)):
            self.buffers[task][index] = rollout
            done.append((task, index, rollout_checksum(self.buffers[task][index])))
        return done

    def close(self) -> None:
        for env in self.envs:
            env.close()
        if self.renderer is not None:
            self.renderer.close()


_WORKER: _Writer | None = None


def _init_worker(root: str, meta: dict[str, Any], envs_per_worker: int) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _Writer(root, meta, envs_per_worker)


def _work(jobs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    assert _WORKER is not None
    return _WORKER(jobs)


def collect_dataset(
    root: str | os.PathLike,
    env: EnvConfig,
    rollouts_per_task: int,
    seed: int = 0,
    noise_std: float = 0.3,
    workers: int = 0,
    progress: bool = True,
    envs_per_worker: int = 1,
    fail_fraction: float = 0.0,
) -> OfflineDataset:
    """Collect (or finish, or extend) the dataset at ``root`` and return it opened.

    ``workers=0`` collects in this process; ``envs_per_worker`` envs are stepped in lockstep per process,
    their frames drawn as tiles of one buffer when it is above 1. A dataset made with other env parameters, seed or noise is
    refused with :class:`envs.dataset.DatasetError`; one with at least ``rollouts_per_task`` finished
    rollouts per task is returned as it is.
    """
    if rollouts_per_task < 1:
        raise ValueError(f"rollouts_per_task must be >= 1, got {rollouts_per_task}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if envs_per_worker < 1:
        raise ValueError(f"envs_per_worker must be >= 1, got {envs_per_worker}")
    if not 0.0 <= fail_fraction <= 1.0:
        raise ValueError(f"fail_fraction must be in [0, 1], got {fail_fraction}")
    SawyerTwoDrawersEnv(env).close()  # validates the env parameters before anything is written
    root = Path(root)
    wanted = DatasetMetadata(env=env, rollouts_per_task=rollouts_per_task, seed=seed, noise_std=noise_std,
                             fail_fraction=fail_fraction)
    create_or_extend(root, wanted)
    meta = read_metadata(root)
    flags = open_progress(root, meta, mode="r+")
    sums = open_checksums(root, meta, mode="r+")
    jobs = [(int(t), int(i)) for t, i in zip(*np.nonzero(~flags))]
    if jobs:
        chunks = [jobs[i : i + envs_per_worker] for i in range(0, len(jobs), envs_per_worker)]
        for finished in _run(str(root), meta, chunks, workers, envs_per_worker, progress):
            if sums is not None:  # the checksums first: a finished rollout always has its checksum
                for task, index, checksum in finished:
                    sums[task, index] = checksum
                sums.flush()
            for task, index, _ in finished:
                flags[task, index] = True
            flags.flush()
    del flags, sums
    return OfflineDataset(root)


def _run(root: str, meta: DatasetMetadata, chunks: list[list[tuple[int, int]]], workers: int, envs_per_worker: int,
         progress: bool) -> Iterable[list[tuple[int, int, int]]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("collecting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress)
    with bar:
        task_id = bar.add_task("rollouts", total=sum(len(c) for c in chunks))
        writer, pool = None, None
        if workers == 0:
            writer = _Writer(root, meta.to_dict(), envs_per_worker)
            results: Iterable[list[tuple[int, int, int]]] = map(writer, chunks)
        else:
            initargs = (root, meta.to_dict(), envs_per_worker)
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs)
            results = pool.imap_unordered(_work, chunks)
        try:
            for done in results:
                bar.advance(task_id, len(done))
                yield done
        finally:
            if writer is not None:
                writer.close()
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
    check_types(config)
    EnvConfig.from_dict(config.env)  # fail early on unknown env parameters or values of the wrong type
    if config.rollouts_per_task < 1 or config.workers < 0 or config.envs_per_worker < 1:
        raise ValueError(f"rollouts_per_task and envs_per_worker must be >= 1 and workers >= 0, got "
                         f"{config.rollouts_per_task}, {config.envs_per_worker}, {config.workers}")
    return config


def verify(root: str | os.PathLike, sample: int | None = None) -> str:
    """Verify the dataset at ``root`` (:meth:`OfflineDataset.verify`); a one-line report, or a named error."""
    start = time.perf_counter()
    dataset = open_dataset(root)  # buffer file sizes checked on open
    checked, with_checksum = dataset.verify(sample)
    note = "" if with_checksum == checked else f" ({checked - with_checksum} without a stored checksum: finite check only)"
    return (f"{dataset.root}: {checked} rollouts verified, {with_checksum} against their checksums{note}, all values "
            f"finite, in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (named errors: one line, exit 2; see :mod:`envs.errors`)."""
    parser = argparse.ArgumentParser(prog="python -m envs.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML collection config (default: small embedded quickstart)")
    parser.add_argument("--verify", action="store_true",
                        help="verify the dataset at the config's root (file sizes, checksums, finite values); collect nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollouts_per_task=50 env.image_size=32")
    args = parser.parse_args(argv)
    return run_command(lambda: _collect(args))


def _collect(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.verify:
        print(verify(config.root))
        return 0
    env = EnvConfig.from_dict(config.env)
    dataset = collect_dataset(config.root, env, config.rollouts_per_task, config.seed, config.noise_std,
                              config.workers, envs_per_worker=config.envs_per_worker,
                              fail_fraction=config.fail_fraction)
    print(dataset)
    if config.preview:
        if PIXELS in obs_keys(env):
            from envs.preview import write_preview

            path = write_preview(dataset, Path(config.root) / "preview.png")
            print(f"preview grid: {path}")
        else:
            print("preview skipped: the dataset has no pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
