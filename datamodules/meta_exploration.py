"""Synthetic exploration (paper section 3.5): K-extended meta-rollouts from N per-task offline buffers.

One sample of the distribution M^K: task indices ``i_1..i_K`` drawn uniformly with replacement from the N
tasks (or, for a ``search_fraction`` of the meta-rollouts, the first min(K, N) of them distinct tasks in a random
or cyclic ``search_order``: beyond the paper, for N > 2 drawers where a search needs several failures in a row), one
trajectory (or a crop of length T of one) drawn uniformly from each chosen buffer, and a target task
``i*`` drawn uniformly and independently; rewards of segments with ``i_j != i*`` are set to zero and the K
segments are concatenated into one sequence of length L = K*T. The ``no_expl`` mode (the paper's "No Expl"
ablation) takes all K segments from the target task's own buffer and keeps the real rewards.

Pure torch/tensordict, no Lightning: :class:`MetaExplorationSampler` turns a ``torch.Generator`` into one
batch (a TensorDict of batch size [B, L]); :class:`MetaExplorationStream` is the IterableDataset that derives
batch ``g`` of a stream from (seed, stream id, rank, g) alone, so the stream does not depend on the number
of DataLoader workers, differs between DDP ranks and can be resumed from a batch count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch.utils.data import IterableDataset, get_worker_info

from envs.keys import ACTION, OBS_KEYS, ORIGINAL_REWARD, REWARD, ROLLOUT, SEGMENT, SEGMENT_START, STEP, TARGET_TASK, TASK
from envs.seeding import derive_seed

MODES = ("synthetic", "no_expl")
SEARCH_ORDERS = ("random", "cyclic")  # the order of the distinct tasks of a search (see SamplerConfig)
_GATHERED = (ACTION, REWARD)  # gathered besides the observations


class SampleIndices(NamedTuple):
    """Index tensors of one batch (all int64, on CPU): what a batch is made of, before any data is read."""

    task: torch.Tensor  # [B, K] task of each segment
    rollout: torch.Tensor  # [B, K] rollout index inside that task's buffer
    offset: torch.Tensor  # [B, K] first step of the crop inside the episode
    target: torch.Tensor  # [B] target task i*


@dataclass(frozen=True)
class SamplerConfig:
    """What one batch looks like: B meta-rollouts of K segments of T steps; ``obs_keys`` None = all stored."""

    batch_size: int = 16
    num_segments: int = 2
    segment_length: int | None = None
    mode: str = "synthetic"
    obs_keys: tuple[str, ...] | None = None
    # synthetic mode: the fraction of meta-rollouts whose first min(K, N) segments come from distinct tasks in a
    # random order (a systematic search; later segments i.i.d.); 0 = the paper's i.i.d. segment tasks
    search_fraction: float = 0.0
    # the order of a search's distinct tasks: "random" (a random permutation) or "cyclic" (a random first task, then
    # the next ones in index order modulo N: the same next drawer after the same failures, one search to imitate)
    search_order: str = "random"


def _windows(flat: np.ndarray, length: int) -> np.ndarray:
    """Read-only view [R - length + 1, length * F] of a C-contiguous [R, F] array: row r = rows r..r+length-1."""
    rows, width = flat.shape
    return np.lib.stride_tricks.as_strided(flat, (rows - length + 1, length * width), flat.strides, writeable=False)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain-tensor view (memory-mapped tensors stay memory-mapped but skip the subclass dispatch)."""
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


class MetaExplorationSampler:
    """Draws K-extended meta-rollouts from per-task buffers of batch size [N_i, T_full].

    ``buffers[i]`` is task i's TensorDict (memory-mapped as opened by :func:`envs.dataset.open_dataset`, or in
    memory) with ``pixels`` and/or ``state``, ``action`` and ``("next", "reward")``. By default the buffers stay
    where they are (memory-mapped: nothing is read until gathered); ``in_memory=True`` copies them into one
    tensor per key in RAM, and ``device`` (implies ``in_memory``) puts that copy on a device (e.g. "cuda"),
    where batches are then gathered with index tensors and returned. CPU batches are gathered with numpy
    (one fancy index of whole segments per block); device ones with ``torch.index_select`` (``torch_gather``
    forces either path, e.g. to test the device path on CPU).
    """

    def __init__(self, buffers: Sequence[TensorDictBase], config: SamplerConfig = SamplerConfig(), *,
                 in_memory: bool = False, device: str | torch.device | None = None, torch_gather: bool | None = None):
        if config.mode not in MODES:
            raise ValueError(f"unknown sampler mode {config.mode!r}; choose one of {MODES}")
        if not 0.0 <= config.search_fraction <= 1.0:
            raise ValueError(f"search_fraction must be in [0, 1], got {config.search_fraction}")
        if config.search_order not in SEARCH_ORDERS:
            raise ValueError(f"unknown search_order {config.search_order!r}; choose one of {SEARCH_ORDERS}")
        if config.batch_size < 1 or config.num_segments < 1:
            raise ValueError(f"batch_size and num_segments must be >= 1, got {config.batch_size} and {config.num_segments}")
        if len(buffers) < 1:
            raise ValueError("need at least one task buffer")
        self._init_args = (list(buffers), config, in_memory, device, torch_gather)
        self.config = config
        self.device = torch.device(device) if device is not None else None
        self.in_memory = in_memory or self.device is not None

        first = buffers[0]
        if first.batch_dims != 2:
            raise ValueError(f"task buffers must have batch size [N, T], got {list(first.batch_size)}")
        self.episode_length = int(first.batch_size[1])
        stored = tuple(k for k in OBS_KEYS if k in first.keys())
        self.obs_keys = tuple(config.obs_keys) if config.obs_keys is not None else stored
        if not self.obs_keys:
            raise ValueError(f"no observation key to deliver: the buffers hold none of {OBS_KEYS}")
        unknown = [k for k in self.obs_keys if k not in OBS_KEYS]
        missing = [k for k in self.obs_keys if k not in stored]
        if unknown or missing:
            raise ValueError(f"observation keys {unknown + missing} requested but the buffers hold {list(stored)}")
        self.keys: tuple[Any, ...] = self.obs_keys + _GATHERED

        T = config.segment_length if config.segment_length is not None else self.episode_length
        if not 1 <= T <= self.episode_length:
            raise ValueError(f"segment_length must be in [1, {self.episode_length}] (the episode length), got {T}")
        self.segment_length = T

        shapes: dict[Any, tuple[tuple[int, ...], torch.dtype]] = {}
        counts = []
        for task, buf in enumerate(buffers):
            if buf.batch_dims != 2 or buf.batch_size[1] != self.episode_length or buf.batch_size[0] < 1:
                raise ValueError(f"task {task} buffer has batch size {list(buf.batch_size)}, expected [N>=1, {self.episode_length}]")
            for key in self.keys:
                if key not in buf.keys(include_nested=True):
                    raise ValueError(f"task {task} buffer lacks key {key!r}")
                t = buf.get(key)
                sig = (tuple(t.shape[2:]), t.dtype)
                if shapes.setdefault(key, sig) != sig:
                    raise ValueError(f"task {task} buffer key {key!r} has shape/dtype {sig}, task 0 has {shapes[key]}")
            counts.append(int(buf.batch_size[0]))
        self.feature_shapes = shapes
        self.rollouts_per_task = torch.tensor(counts, dtype=torch.int64)

        # Storage. CPU (memory-mapped or in RAM): numpy "window" views [rows - T + 1, T * F] over each block's flat
        # [rows, F] data, so one segment (T consecutive steps) is one row and a batch is one fancy index per block
        # (numpy: single-threaded, unaffected by OpenMP contention). Memory-mapped: one block per task; in RAM:
        # one concatenated block. On a device: one concatenated tensor per key gathered with torch.index_select.
        flat = {key: [_plain(buf.get(key)).reshape(-1, *shapes[key][0]) for buf in buffers] for key in self.keys}
        rows_before = torch.cumsum(torch.tensor([0] + counts[:-1]), 0) * self.episode_length
        if torch_gather is None:
            torch_gather = self.device is not None and self.device.type != "cpu"
        if torch_gather:
            self.in_memory = True
            self._device_storage = {key: torch.cat(parts).to(self.device or "cpu") for key, parts in flat.items()}
            self._task_row = rows_before
        else:
            self._device_storage = None
            if self.in_memory:
                blocks = [{key: torch.cat(parts).numpy() for key, parts in flat.items()}]
                self._task_block, self._task_row = torch.zeros(len(counts), dtype=torch.int64), rows_before
            else:
                blocks = [{key: parts[i].numpy() for key, parts in flat.items()} for i in range(len(counts))]
                self._task_block, self._task_row = torch.arange(len(counts)), torch.zeros(len(counts), dtype=torch.int64)
            self._blocks = blocks  # keeps the arrays (and memory maps) alive
            self._windows = [{key: _windows(arr.reshape(arr.shape[0], -1), T) for key, arr in blk.items()} for blk in blocks]
        self._steps = torch.arange(T)

    def __getstate__(self) -> dict[str, Any]:
        # rebuilt from the buffers when unpickled (e.g. in spawned processes): the window views must not be pickled
        return {"init_args": self._init_args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        buffers, config, in_memory, device, torch_gather = state["init_args"]
        self.__init__(buffers, config, in_memory=in_memory, device=device, torch_gather=torch_gather)

    # ------------------------------------------------------------------ shapes
    @property
    def num_tasks(self) -> int:
        return len(self.rollouts_per_task)

    @property
    def sequence_length(self) -> int:
        """L = K * T."""
        return self.config.num_segments * self.segment_length

    # ------------------------------------------------------------------ sampling
    def sample_indices(self, generator: torch.Generator) -> SampleIndices:
        """Draw the task, rollout, crop offset and target indices of one batch (CPU, reproducible)."""
        B, K, N = self.config.batch_size, self.config.num_segments, self.num_tasks
        target = torch.randint(N, (B,), generator=generator)
        if self.config.mode == "synthetic":
            task = torch.randint(N, (B, K), generator=generator)
            if self.config.search_fraction > 0:  # (drawn only then: the i.i.d. stream stays as it was)
                first = min(K, N)
                if self.config.search_order == "cyclic":
                    start = torch.randint(N, (B, 1), generator=generator)
                    order = (start + torch.arange(first)) % N
                else:
                    order = torch.argsort(torch.rand((B, N), generator=generator), dim=1)[:, :first]
                searching = torch.rand(B, generator=generator) < self.config.search_fraction
                task[:, :first] = torch.where(searching[:, None], order, task[:, :first])
        else:  # no_expl: every segment from the target task's own buffer
            task = target[:, None].expand(B, K).clone()
        u = torch.rand((B, K), generator=generator, dtype=torch.float64)
        counts = self.rollouts_per_task[task]
        rollout = torch.minimum((u * counts).long(), counts - 1)
        span = self.episode_length - self.segment_length + 1
        offset = torch.randint(span, (B, K), generator=generator) if span > 1 else torch.zeros((B, K), dtype=torch.int64)
        return SampleIndices(task, rollout, offset, target)

    def sample(self, generator: torch.Generator) -> TensorDict:
        """One batch: a TensorDict of batch size [B, L] (see :meth:`gather`)."""
        return self.gather(self.sample_indices(generator))

    def gather(self, idx: SampleIndices) -> TensorDict:
        """Read the indexed segments and assemble the [B, L] batch.

        Keys: the observation keys, ``action``, ``("next", "reward")`` (relabelled), ``("next",
        "original_reward")`` (as stored), ``segment_start`` bool [B, L, 1], ``task``, ``target_task``,
        ``segment``, ``rollout`` and ``step`` (time index inside the source episode), all int64 [B, L].
        """
        B, K, T = self.config.batch_size, self.config.num_segments, self.segment_length
        L = K * T
        out_device = self.device or torch.device("cpu")

        def per_step(x: torch.Tensor) -> torch.Tensor:  # [B, K] -> [B, K, T]
            return x[..., None].expand(B, K, T)

        # all per-step index fields are made on CPU and cross to the device in one transfer
        first = idx.rollout * self.episode_length + idx.offset + self._task_row[idx.task]  # [B, K] first flat row
        meta = torch.stack([per_step(idx.task), per_step(idx.target[:, None].expand(B, K)),
                            per_step(torch.arange(K).expand(B, K)), per_step(idx.rollout),
                            idx.offset[..., None] + self._steps, first[..., None] + self._steps]).view(6, B, L)
        task, target, segment, rollout, step, rows = meta.to(out_device, non_blocking=True).unbind(0)

        out: dict[Any, torch.Tensor] = {}
        if self._device_storage is not None:
            rows = rows.reshape(-1)
            for key in self.keys:
                out[key] = torch.index_select(self._device_storage[key], 0, rows).view(B, L, *self.feature_shapes[key][0])
        else:
            first_np = first.reshape(-1).numpy()
            if len(self._windows) == 1:
                arrays = {key: win[first_np] for key, win in self._windows[0].items()}
            else:
                block = self._task_block[idx.task].reshape(-1)
                arrays = {key: np.empty((B * K, win.shape[1]), dtype=win.dtype) for key, win in self._windows[0].items()}
                for b in torch.unique(block).tolist():
                    seg = (block == b).nonzero().squeeze(1).numpy()
                    for key, win in self._windows[b].items():
                        arrays[key][seg] = win[first_np[seg]]
            for key, arr in arrays.items():
                out[key] = torch.from_numpy(arr).view(B, L, *self.feature_shapes[key][0])

        original = out.pop(REWARD)
        fields: dict[Any, torch.Tensor] = dict(out)
        fields[REWARD] = torch.where((task == target)[..., None], original, torch.zeros((), dtype=original.dtype, device=out_device))
        fields[ORIGINAL_REWARD] = original
        fields[SEGMENT_START] = (step == step.view(B, K, T)[..., :1].expand(B, K, T).reshape(B, L))[..., None]
        fields[TASK], fields[TARGET_TASK], fields[SEGMENT] = task, target, segment
        fields[ROLLOUT], fields[STEP] = rollout, step
        return TensorDict(fields, batch_size=[B, L], device=out_device)


# ---------------------------------------------------------------------- streams
def batch_seed(seed: int, stream: int, rank: int, index: int) -> int:
    """The generator seed of batch ``index`` of a stream (independent of worker count and order)."""
    return derive_seed(seed, stream, rank, index)


def batch_generator(seed: int, stream: int, rank: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for batch ``index`` of a stream."""
    return torch.Generator().manual_seed(batch_seed(seed, stream, rank, index))


class StreamProgress:
    """Main-process counters of a stream (absolute batch indices), kept by whoever iterates it.

    ``handed_out`` counts batches a loader gave out; ``processed`` (None unless a trainer tracks it) counts the
    batches actually trained on, since Lightning fetches one batch ahead. ``consumed`` is where to resume.
    """

    def __init__(self) -> None:
        self.start = 0  # first batch of the current pass
        self.handed_out = 0  # next batch a loader would hand out
        self.processed: int | None = None  # next batch the trainer would train on (while tracked)

    @property
    def consumed(self) -> int:
        return self.processed if self.processed is not None else self.handed_out

    def begin_pass(self) -> None:
        """A new pass starts where the consumer stopped."""
        self.start = self.handed_out = self.consumed
        if self.processed is not None:
            self.processed = self.start

    def reset(self, position: int) -> None:
        """Continue at batch ``position`` (e.g. from a checkpoint)."""
        self.start = self.handed_out = int(position)
        if self.processed is not None:
            self.processed = int(position)


class MetaExplorationStream(IterableDataset):
    """An IterableDataset of whole batches (use with ``DataLoader(batch_size=None)``).

    Batch ``g`` is ``sampler.sample(batch_generator(seed, stream, rank, g))``: every DDP rank draws a
    different stream, worker ``w`` of ``W`` makes batches ``g = start + w, start + w + W, ...`` (the
    DataLoader hands them out in order), so the stream is the same for any number of workers. One pass
    (epoch) starts at ``position`` (shared with workers; the loader advances it) and stops at the next
    multiple of ``batches_per_epoch`` (never, if None). ``progress`` holds the main-process counters a
    counting loader (``datamodules.datamodule.StreamLoader``) keeps.
    """

    def __init__(self, sampler: MetaExplorationSampler, *, seed: int, stream: int = 0, rank: int = 0,
                 batches_per_epoch: int | None = None, progress: StreamProgress | None = None):
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        self.sampler = sampler
        self.seed, self.stream, self.rank = int(seed), int(stream), int(rank)
        self.batches_per_epoch = batches_per_epoch
        self._position = torch.zeros((), dtype=torch.int64).share_memory_()
        self.progress = progress if progress is not None else StreamProgress()

    @property
    def position(self) -> int:
        """Index of the next batch a new pass starts at."""
        return int(self._position)

    @position.setter
    def position(self, value: int) -> None:
        self._position.fill_(int(value))

    def pass_end(self, start: int) -> float:
        """Where a pass starting at ``start`` stops."""
        E = self.batches_per_epoch
        return float("inf") if E is None else (start // E + 1) * E

    def batch(self, index: int) -> TensorDict:
        """Batch ``index`` of this stream (random access)."""
        return self.sampler.sample(batch_generator(self.seed, self.stream, self.rank, index))

    def __iter__(self) -> Iterator[TensorDict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.position
        end = self.pass_end(start)
        g = start + worker
        while g < end:
            yield self.batch(g)
            g += workers

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an endless stream (batches_per_epoch=None) has no length")
        return self.batches_per_epoch
