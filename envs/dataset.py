"""On-disk format of the offline datasets: one memory-mapped TensorDict per task, plus metadata.

Layout of a dataset folder::

    metadata.json        format version, env parameters, seed, noise, counts (written atomically, last)
    progress_n{N}.npy    bool [num_tasks, N]: rollout finished and flushed
    checksums_n{N}.npy   int64 [num_tasks, N]: each finished rollout's checksum (envs.integrity; 0 = none)
    task_{i}_n{N}/       TensorDict memmap of task i, batch size [N, T] (N rollouts of T agent steps)

Buffer and progress names carry N, so growing a dataset writes a new generation beside the old one and
switches to it by renaming ``metadata.json``: a run killed at any point leaves a readable dataset.

Per step ``t`` of a rollout: ``pixels`` uint8 [3, H, W] and/or ``state`` float32 [6] observed *before*
``action`` float32 [4]; ``("next", "reward")`` float32 [1] received after it, ``("next", "done" |
"terminated" | "truncated" | "success")`` bool [1], and ``task`` int64.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from envs.atomic import write_json_atomic
from envs.integrity import NO_CHECKSUM, DatasetError, check_buffer_files, verify_rollouts
from envs.keys import ACTION, DONE, PIXELS, REWARD, STATE, SUCCESS, TASK, TERMINATED, TRUNCATED, obs_keys_for
from envs.two_drawers import ACTION_DIM, EnvConfig, state_dim

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


def buffer_dir(root: Path, task: int, n: int) -> Path:
    """Folder of task ``task``'s buffer in the generation with ``n`` rollouts per task."""
    return root / f"task_{task}_n{n}"


def progress_path(root: Path, n: int) -> Path:
    """Completion flags of the generation with ``n`` rollouts per task."""
    return root / f"progress_n{n}.npy"


def checksums_path(root: Path, n: int) -> Path:
    """Per-rollout checksums of the generation with ``n`` rollouts per task."""
    return root / f"checksums_n{n}.npy"


@dataclass(frozen=True)
class DatasetMetadata:
    """What a dataset holds and how it was made."""

    env: EnvConfig
    rollouts_per_task: int
    seed: int
    noise_std: float
    num_tasks: int | None = None  # one task per drawer: None = env.num_drawers
    fail_fraction: float = 0.0  # share of failed attempts among the rollouts (envs.collect)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.num_tasks is None:
            object.__setattr__(self, "num_tasks", self.env.num_drawers)
        if self.num_tasks != self.env.num_drawers:
            raise ValueError(f"num_tasks={self.num_tasks} but env.num_drawers={self.env.num_drawers} (one task per drawer)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "env": self.env.to_dict(),
            "num_tasks": self.num_tasks,
            "rollouts_per_task": self.rollouts_per_task,
            "seed": self.seed,
            "noise_std": self.noise_std,
            # written only when used: the metadata of datasets without failed attempts stays as it was
            **({"fail_fraction": self.fail_fraction} if self.fail_fraction else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetMetadata":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetError(f"unsupported dataset format_version {version!r} (this code reads {FORMAT_VERSION})")
        try:
            return cls(
                env=EnvConfig.from_dict(data["env"]),
                rollouts_per_task=int(data["rollouts_per_task"]),
                seed=int(data["seed"]),
                noise_std=float(data["noise_std"]),
                num_tasks=int(data["num_tasks"]),
                fail_fraction=float(data.get("fail_fraction", 0.0)),  # datasets made before the option: none
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"corrupt dataset metadata: {err}") from err

    def same_source(self, other: "DatasetMetadata") -> bool:
        """True when rollouts of ``other`` could extend this dataset (everything but the count agrees)."""
        return ((self.env, self.seed, self.noise_std, self.num_tasks, self.fail_fraction)
                == (other.env, other.seed, other.noise_std, other.num_tasks, other.fail_fraction))


def obs_keys(env: EnvConfig) -> tuple[str, ...]:
    """Observation keys stored for an env configuration."""
    return obs_keys_for(env.obs_mode)


def empty_rollouts(env: EnvConfig, n: int) -> TensorDict:
    """A zero-memory template of ``n`` rollouts (expanded zeros) with the dataset's keys, shapes and dtypes."""
    t, size = env.episode_length, env.image_size

    def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros((), dtype=dtype).expand(n, t, *shape)

    fields: dict[Any, torch.Tensor] = {
        ACTION: zeros(ACTION_DIM),
        TASK: zeros(dtype=torch.int64),
        REWARD: zeros(1),
    }
    for key in (DONE, TERMINATED, TRUNCATED, SUCCESS):
        fields[key] = zeros(1, dtype=torch.bool)
    if PIXELS in obs_keys(env):
        fields[PIXELS] = zeros(3, size, size, dtype=torch.uint8)
    if STATE in obs_keys(env):
        fields[STATE] = zeros(state_dim(env.num_drawers))
    return TensorDict(fields, batch_size=[n, t])


def read_metadata(root: str | os.PathLike) -> DatasetMetadata:
    """Read and validate ``metadata.json``; raises :class:`DatasetError` naming the problem."""
    root = Path(root)
    path = root / METADATA_FILE
    if not root.is_dir():
        raise DatasetError(f"no dataset at {root}: the folder does not exist")
    if not path.is_file():
        raise DatasetError(f"no dataset at {root}: {METADATA_FILE} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"corrupt dataset metadata {path}: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"corrupt dataset metadata {path}: expected a JSON object")
    return DatasetMetadata.from_dict(data)


def open_progress(root: Path, meta: DatasetMetadata, mode: str = "r") -> np.ndarray:
    """The [num_tasks, N] completion flags, memory-mapped."""
    path = progress_path(root, meta.rollouts_per_task)
    try:
        progress = np.load(path, mmap_mode=mode)
    except (OSError, ValueError) as err:
        raise DatasetError(f"corrupt or missing {path.name} in {root}: {err}") from err
    expected = (meta.num_tasks, meta.rollouts_per_task)
    if progress.shape != expected or progress.dtype != np.bool_:
        raise DatasetError(f"corrupt {path.name} in {root}: shape {progress.shape}, expected {expected}")
    return progress


def open_checksums(root: Path, meta: DatasetMetadata, mode: str = "r") -> np.ndarray | None:
    """The [num_tasks, N] rollout checksums, memory-mapped; None for a dataset collected before they existed."""
    path = checksums_path(root, meta.rollouts_per_task)
    if not path.exists():
        return None
    try:
        sums = np.load(path, mmap_mode=mode)
    except (OSError, ValueError) as err:
        raise DatasetError(f"corrupt {path.name} in {root}: {err}") from err
    if sums.shape != (meta.num_tasks, meta.rollouts_per_task) or sums.dtype != np.int64:
        raise DatasetError(f"corrupt {path.name} in {root}: shape {sums.shape} {sums.dtype}")
    return sums


def _load_buffer(root: Path, task: int, meta: DatasetMetadata) -> TensorDict:
    path = buffer_dir(root, task, meta.rollouts_per_task)
    template = empty_rollouts(meta.env, meta.rollouts_per_task)
    if path.is_dir():
        check_buffer_files(path, template)  # before mapping: a short file would be grown with zeros
    try:
        buffer = TensorDict.load_memmap(path)
    except Exception as err:  # tensordict raises several types for broken folders
        raise DatasetError(f"corrupt task buffer {path}: {err}") from err
    want = {k: (tuple(v.shape), v.dtype) for k, v in template.items(include_nested=True, leaves_only=True)}
    have = {k: (tuple(v.shape), v.dtype) for k, v in buffer.items(include_nested=True, leaves_only=True)}
    if want != have:
        missing = sorted(str(k) for k in set(want) - set(have))
        wrong = sorted(str(k) for k in set(want) & set(have) if want[k] != have[k])
        raise DatasetError(f"task buffer {path} does not match its metadata: missing {missing}, wrong shape/dtype {wrong}")
    return buffer


class OfflineDataset:
    """A collected dataset opened for reading: per-task memory-mapped buffers of batch size [N, T]."""

    def __init__(self, root: str | os.PathLike, require_complete: bool = True):
        self.root = Path(root)
        self.metadata = read_metadata(self.root)
        progress = open_progress(self.root, self.metadata)
        if require_complete and not progress.all():
            done, total = int(progress.sum()), progress.size
            raise DatasetError(
                f"dataset {self.root} is incomplete ({done}/{total} rollouts): run the collector again to finish it"
            )
        self.buffers: list[TensorDict] = [_load_buffer(self.root, i, self.metadata) for i in range(self.metadata.num_tasks)]

    @property
    def env_config(self) -> EnvConfig:
        return self.metadata.env

    @property
    def num_tasks(self) -> int:
        return self.metadata.num_tasks

    @property
    def rollouts_per_task(self) -> int:
        return self.metadata.rollouts_per_task

    @property
    def episode_length(self) -> int:
        return self.metadata.env.episode_length

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return obs_keys(self.metadata.env)

    def verify(self, sample: int | None = None, seed: int = 0) -> tuple[int, int]:
        """Recompute rollout checksums and check finite values (all rollouts, or ``sample`` random ones);
        :class:`~envs.integrity.IntegrityError` naming the first bad rollout. Returns (checked, with checksum)."""
        pairs = [(t, i) for t in range(self.num_tasks) for i in range(self.rollouts_per_task)]
        if sample is not None and sample < len(pairs):
            chosen = np.random.default_rng(seed).choice(len(pairs), size=sample, replace=False)
            pairs = [pairs[j] for j in sorted(chosen)]
        checksums = open_checksums(self.root, self.metadata)
        return len(pairs), verify_rollouts(self.buffers, checksums, self.root, pairs)

    def __repr__(self) -> str:
        m = self.metadata
        return (f"OfflineDataset({self.root}, tasks={m.num_tasks}, rollouts_per_task={m.rollouts_per_task}, "
                f"T={m.env.episode_length}, obs={self.obs_keys}, image_size={m.env.image_size})")


def open_dataset(root: str | os.PathLike) -> OfflineDataset:
    """Open a complete dataset; raises :class:`DatasetError` if it is missing, corrupt or incomplete."""
    return OfflineDataset(root)


def create_or_extend(root: Path, meta: DatasetMetadata) -> None:
    """Make ``root`` hold ``meta.rollouts_per_task`` slots per task, keeping finished rollouts.

    A new folder is created; an existing one with the same source (env parameters, seed, noise) and fewer
    rollouts is grown into a new generation; any mismatch raises :class:`DatasetError` and changes nothing.
    """
    if root.is_dir() and not (root / METADATA_FILE).exists():
        leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(("task_", "progress", "checksums")))
        if leftovers:
            raise DatasetError(f"{root} holds dataset files ({', '.join(leftovers[:3])}{', ...' if len(leftovers) > 3 else ''}) "
                               f"but no {METADATA_FILE}: refusing to write into it; restore {METADATA_FILE} or move "
                               f"the folder away, or collect into another root")
    root.mkdir(parents=True, exist_ok=True)
    old: DatasetMetadata | None = None
    if (root / METADATA_FILE).exists():
        old = read_metadata(root)
        if not old.same_source(meta):
            raise DatasetError(
                f"{root} holds a dataset made with other parameters: refusing to extend it.\n"
                f"  existing: {old.to_dict()}\n  requested: {meta.to_dict()}\n"
                f"choose another root or the same env parameters, seed, noise_std and fail_fraction"
            )
        if old.rollouts_per_task >= meta.rollouts_per_task:
            open_progress(root, old)
            for task in range(old.num_tasks):
                _load_buffer(root, task, old)
            return
    n = meta.rollouts_per_task
    progress = np.zeros((meta.num_tasks, n), dtype=bool)
    sums = np.full((meta.num_tasks, n), NO_CHECKSUM, dtype=np.int64)
    for task in range(meta.num_tasks):
        staging = buffer_dir(root, task, n)
        if staging.exists():  # left by a run killed before it switched generations
            shutil.rmtree(staging)
        grown = empty_rollouts(meta.env, n).memmap_like(staging)
        if old is not None:
            grown[: old.rollouts_per_task] = _load_buffer(root, task, old)
        del grown
    if old is not None:
        progress[:, : old.rollouts_per_task] = open_progress(root, old)
        old_sums = open_checksums(root, old)
        if old_sums is not None:
            sums[:, : old.rollouts_per_task] = old_sums
    for array, path in ((progress, progress_path(root, n)), (sums, checksums_path(root, n))):
        tmp = root / f"{path.stem}.tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, path)
    write_json_atomic(root / METADATA_FILE, meta.to_dict())  # the switch
    keep = {buffer_dir(root, t, n) for t in range(meta.num_tasks)} | {progress_path(root, n), checksums_path(root, n)}
    for stale in list(root.glob("task_*_n*")) + list(root.glob("progress_n*.npy")) + list(root.glob("checksums_n*.npy")):
        if stale not in keep:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
