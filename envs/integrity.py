"""Dataset integrity: buffer files of the right size, per-rollout checksums, finite values.

* :func:`check_buffer_files` runs before a task buffer is memory-mapped: every file must have exactly the size its
  metadata implies. (Opening a short file read-write would grow it with zeros, silently and for good.)
* Every rollout's checksum (:func:`rollout_checksum`, 63 bits of BLAKE2b over its fields) is computed by the worker
  that collected it and stored by the main process in ``checksums_n{N}.npy`` before the rollout is marked finished.
* :func:`verify_rollouts` recomputes them and checks that every float field is finite, naming the field, task and
  rollout of the first problem. ``python -m envs.collect --verify`` and the data module's ``prepare_data`` run it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

NO_CHECKSUM = 0  # a rollout not finished yet (or collected before checksums existed)


class DatasetError(ValueError):
    """A dataset folder is missing, corrupt, incomplete or does not match what was asked for."""


class IntegrityError(DatasetError):
    """A dataset's files or values are not what its metadata and checksums say."""


def leaf_file(folder: Path, key: Any) -> Path:
    """The file of one leaf of a memory-mapped TensorDict folder (nested keys are sub-folders)."""
    parts = (key,) if isinstance(key, str) else tuple(key)
    return folder.joinpath(*parts[:-1], f"{parts[-1]}.memmap")


def check_buffer_files(folder: Path, template: TensorDictBase) -> None:
    """``IntegrityError`` naming every leaf file of ``folder`` that is missing or not the size ``template`` implies."""
    problems = []
    for key, value in template.items(include_nested=True, leaves_only=True):
        path = leaf_file(folder, key)
        expected = value.numel() * value.element_size()
        try:
            size = os.path.getsize(path)
        except OSError:
            problems.append(f"{path.name} is missing")
            continue
        if size != expected:
            problems.append(f"{path.relative_to(folder)} has {size} bytes, its metadata implies {expected}")
    if problems:
        raise IntegrityError(f"task buffer {folder} is damaged (truncated or overwritten): " + "; ".join(problems)
                             + ": collect it again into a new folder")


def _fields(rollout: TensorDictBase) -> list[tuple[str, torch.Tensor]]:
    return sorted(((str(k), v) for k, v in rollout.items(include_nested=True, leaves_only=True)), key=lambda kv: kv[0])


def rollout_checksum(rollout: TensorDictBase) -> int:
    """A 63-bit checksum of one rollout's fields (names, dtypes, shapes and bytes), never :data:`NO_CHECKSUM`."""
    digest = hashlib.blake2b(digest_size=8)
    for name, value in _fields(rollout):
        array = value.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return (int.from_bytes(digest.digest(), "little") >> 1) or 1


def non_finite_field(rollout: TensorDictBase) -> tuple[str, int] | None:
    """The first float field of a rollout [T, ...] with a NaN/inf, and the first step where it occurs."""
    for name, value in _fields(rollout):
        if value.is_floating_point():
            bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
            if bool(bad.any()):
                return name, int(torch.nonzero(bad)[0, 0])
    return None


def verify_rollouts(buffers: list[TensorDict], checksums: np.ndarray | None, root: Path,
                    rollouts: Iterable[tuple[int, int]]) -> int:
    """Check the given (task, rollout) pairs; ``IntegrityError`` naming the first bad one. Returns how many were
    compared with a stored checksum (rollouts without one, from older datasets, get the finite check only)."""
    compared = 0
    for task, index in rollouts:
        rollout = buffers[task][index]
        bad = non_finite_field(rollout)
        if bad is not None:
            raise IntegrityError(f"dataset {root}: non-finite value in field {bad[0]} of task {task} rollout {index} "
                                 f"(step {bad[1]})")
        if checksums is not None and int(checksums[task, index]) != NO_CHECKSUM:
            computed = rollout_checksum(rollout)
            if computed != int(checksums[task, index]):
                raise IntegrityError(f"dataset {root}: task {task} rollout {index} does not match its checksum "
                                     f"(stored {int(checksums[task, index])}, computed {computed}): the buffer files "
                                     f"were changed after collection")
            compared += 1
    return compared
