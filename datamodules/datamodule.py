"""``MetaExplorationDataModule``: the LightningDataModule serving synthetic-exploration batches.

``prepare_data`` collects the offline dataset when it is missing or unfinished (``envs.collect``), ``setup``
opens it, refuses an incompatible one with a ``ValueError`` naming every mismatch, and builds the sampler;
``train_dataloader`` / ``val_dataloader`` deliver whole TensorDict batches [B, L] (``batch_size=None``).
The position in the training stream is checkpointed by ``state_dict`` as plain ints, so a resumed run
continues the same stream; each DDP rank draws its own stream (seeded by its global rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from tensordict import TensorDict
from torch.utils.data import DataLoader

from datamodules.meta_exploration import (MODES, SEARCH_ORDERS, MetaExplorationSampler, MetaExplorationStream, SamplerConfig,
                                          StreamProgress)
from envs.dataset import METADATA_FILE, OfflineDataset, open_dataset, open_progress, read_metadata
from envs.dataset import obs_keys as stored_obs_keys
from envs.two_drawers import ACTION_DIM, EnvConfig

TRAIN_STREAM, VAL_STREAM = 0, 1
# (Lightning warns about any IterableDataset with __len__ under several workers; these streams split the batches
# between workers by index (see MetaExplorationStream), so the length is exact: the `lightning` command silences it.)
STATE_VERSION = 1


def keep_batch(batch: TensorDict) -> TensorDict:
    """``collate_fn`` of the loaders: batches arrive whole (torch's default_convert would take a TensorDict apart)."""
    return batch


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`MetaExplorationStream` that counts the batches it hands out.

    Each pass starts the stream where the previous one stopped (or where a checkpoint left it): the count
    is written to the stream's shared start index before the workers begin the pass. ``state_dict`` makes it a
    resumable loader for Lightning (the same plain state as the DataModule's).
    """

    dataset: MetaExplorationStream

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.dataset.seed, "position": int(self.dataset.progress.consumed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = _check_state(state_dict)
        self.dataset.seed = state["seed"]
        self.dataset.progress.reset(state["position"])

    def __iter__(self) -> Iterator[TensorDict]:
        stream = self.dataset
        progress = stream.progress
        progress.begin_pass()
        stream.position = progress.start
        for batch in super().__iter__():
            progress.handed_out += 1
            yield batch


class _TrainProgressTracker(Callback):
    """Counts the batches the trainer actually trains on (the DataLoader runs one batch ahead)."""

    def __init__(self, progress: StreamProgress):
        self.progress = progress

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.progress.processed is not None:
            self.progress.processed += 1


def _check_state(state: dict[str, Any]) -> dict[str, int]:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not {"seed", "position"} <= set(state):
        raise ValueError(f"not a MetaExplorationDataModule state (version {STATE_VERSION}): {state!r}")
    return {"seed": int(state["seed"]), "position": int(state["position"])}


def check_dataset(dataset: OfflineDataset, *, num_tasks: int | None, action_dim: int, obs_keys: tuple[str, ...],
                  image_size: int, episode_length: int, env_fields: dict[str, Any] | None = None) -> None:
    """Raise ``ValueError`` listing every way ``dataset`` differs from what the DataModule was configured for
    (``env_fields``: the ``EnvConfig`` values the data module's ``env`` asks for)."""
    env = dataset.metadata.env
    problems = []
    for key, value in (env_fields or {}).items():
        if getattr(env, key) != value:
            problems.append(f"it was collected with env.{key}={getattr(env, key)!r}, configured {value!r}")
    if num_tasks is not None and dataset.num_tasks != num_tasks:
        problems.append(f"it has {dataset.num_tasks} tasks, configured num_tasks={num_tasks}")
    if len(dataset.buffers) != dataset.num_tasks:
        problems.append(f"it has {len(dataset.buffers)} task buffers for {dataset.num_tasks} tasks")
    have = dataset.obs_keys
    missing = [k for k in obs_keys if k not in have]
    if missing:
        problems.append(f"it stores observation keys {list(have)}, configured to deliver {list(obs_keys)}")
    if "pixels" in obs_keys and "pixels" in have and env.image_size != image_size:
        problems.append(f"its images are {env.image_size} px, configured image_size={image_size}")
    if env.episode_length != episode_length:
        problems.append(f"its episodes have {env.episode_length} steps, configured episode_length={episode_length}")
    for task, buf in enumerate(dataset.buffers):
        if "action" in buf.keys() and buf["action"].shape[-1] != action_dim:
            problems.append(f"task {task} actions have size {buf['action'].shape[-1]}, configured action_dim={action_dim}")
            break
        if "pixels" in obs_keys and "pixels" in buf.keys() and tuple(buf["pixels"].shape[-3:]) != (3, image_size, image_size):
            problems.append(f"task {task} pixels have shape {tuple(buf['pixels'].shape[-3:])}, expected (3, {image_size}, {image_size})")
            break
    if problems:
        raise ValueError(f"incompatible dataset at {dataset.root}: " + "; ".join(problems))


class MetaExplorationDataModule(pl.LightningDataModule):
    """Synthetic-exploration batches (paper section 3.5) from the per-task offline buffers at ``root``.

    Collection (used by ``prepare_data`` when the dataset is missing or unfinished, and checked against an
    existing one): ``obs_mode``, ``image_size``, ``episode_length``, ``rollouts_per_task``,
    ``collection_seed``, ``noise_std``, ``fail_fraction``, ``collection_workers`` and ``env`` (any other ``EnvConfig`` field, e.g.
    ``hand_offset``, ``action_scale_jitter``: the conditions the data covers). Only the first ``rollouts_per_task``
    rollouts of a larger dataset are used.

    Sampling: ``mode`` ("synthetic" or "no_expl"), ``search_fraction`` (synthetic: the fraction of meta-rollouts
    whose first min(K, N) segments are distinct tasks) and ``search_order`` (their order: "random" or "cyclic"; see
    :class:`SamplerConfig`), ``num_segments`` K,
    ``segment_length`` T (None = whole episodes), ``batch_size`` B, ``obs_keys`` (a subset of the stored observations; None = those of
    ``obs_mode``), ``num_tasks`` N (None = ``env.num_drawers``, one task per drawer; checked against the dataset), ``seed``.
    ``batches_per_epoch`` sets the epoch length (None = endless); validation uses ``val_batches`` fixed
    batches drawn with ``val_seed``.

    Loading: ``num_workers`` DataLoader processes; ``in_memory`` copies the buffers into RAM (else they stay
    memory-mapped); ``device`` (e.g. "cuda": this rank's GPU under a trainer; implies ``in_memory``, needs
    ``num_workers=0``) keeps them on that device and gathers batches there; ``pin_memory`` pins CPU batches when
    CUDA is available. ``verify``: ``prepare_data`` checks the dataset's file sizes, rollout checksums and finite
    values every time (``envs.integrity``; ~0.1 s for the state quickstart, see docs/RELIABILITY.md).
    """

    def __init__(
        self,
        root: str = "data/two_drawers",
        obs_mode: str = "pixels",
        image_size: int = 64,
        episode_length: int = 40,
        rollouts_per_task: int = 1000,
        collection_seed: int = 0,
        noise_std: float = 0.3,
        fail_fraction: float = 0.0,
        collection_workers: int = 0,
        env: dict[str, Any] | None = None,
        mode: str = "synthetic",
        search_fraction: float = 0.0,
        search_order: str = "random",
        num_segments: int = 2,
        segment_length: int | None = None,
        batch_size: int = 16,
        obs_keys: list[str] | None = None,
        num_tasks: int | None = None,
        action_dim: int = ACTION_DIM,
        seed: int = 0,
        batches_per_epoch: int | None = 1000,
        val_batches: int = 4,
        val_seed: int = 1234,
        num_workers: int = 0,
        in_memory: bool = False,
        device: str | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        verify: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        reserved = sorted(set(env or {}) & {"obs_mode", "image_size", "episode_length"})
        if reserved:
            raise ValueError(f"data env: set {reserved} as the data module's own arguments, not in env")
        self.env = EnvConfig.from_dict({**EnvConfig(obs_mode=obs_mode, image_size=image_size,
                                                    episode_length=episode_length).to_dict(), **(env or {})})
        if num_tasks is not None and num_tasks != self.env.num_drawers:
            raise ValueError(f"num_tasks={num_tasks} but env.num_drawers={self.env.num_drawers}: one task per drawer")
        self.num_tasks = self.env.num_drawers  # one task per drawer (num_tasks: None = the env's)
        # resolved in the hparams too: the filter module's num_tasks (linked by the CLI) must be equal
        self.hparams["num_tasks"] = self._hparams_initial["num_tasks"] = self.num_tasks
        self.obs_keys = tuple(obs_keys) if obs_keys is not None else stored_obs_keys(self.env)
        beyond = [k for k in self.obs_keys if k not in stored_obs_keys(self.env)]
        if beyond:
            raise ValueError(f"obs_keys {list(self.obs_keys)}: obs_mode {obs_mode!r} stores only "
                             f"{list(stored_obs_keys(self.env))}")
        # the keys delivered, as a plain list: a model's hparam of the same name (linked by the CLI) must be equal
        self.hparams["obs_keys"] = list(self.obs_keys)
        self._hparams_initial["obs_keys"] = list(self.obs_keys)
        self.sampler_config = SamplerConfig(batch_size=batch_size, num_segments=num_segments,
                                            segment_length=segment_length, mode=mode, obs_keys=self.obs_keys,
                                            search_fraction=search_fraction, search_order=search_order)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if not 0.0 <= search_fraction <= 1.0:
            raise ValueError(f"search_fraction must be in [0, 1], got {search_fraction}")
        if search_order not in SEARCH_ORDERS:
            raise ValueError(f"unknown search_order {search_order!r}; choose one of {SEARCH_ORDERS}")
        if device is not None and num_workers > 0:
            raise ValueError(f"device={device!r} gathers batches in the main process: set num_workers=0 (got {num_workers})")
        if num_workers < 0 or val_batches < 1:
            raise ValueError(f"num_workers must be >= 0 and val_batches >= 1, got {num_workers} and {val_batches}")
        self.seed = seed
        self.dataset: OfflineDataset | None = None
        self.sampler: MetaExplorationSampler | None = None
        self.progress = StreamProgress()

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Collect the dataset if ``root`` has none, an unfinished one, or fewer rollouts than configured; then
        (``verify``) check its file sizes, checksums and values (a damaged one raises a ``DatasetError`` naming it)."""
        complete = False
        if (self.root / METADATA_FILE).exists():
            meta = read_metadata(self.root)  # a corrupt one raises DatasetError (a ValueError) naming the file
            complete = open_progress(self.root, meta).all() and meta.rollouts_per_task >= self.hparams.rollouts_per_task
        if not complete:
            from envs.collect import collect_dataset  # MuJoCo/EGL only when collecting

            collect_dataset(self.root, self.env, rollouts_per_task=self.hparams.rollouts_per_task,
                            seed=self.hparams.collection_seed, noise_std=self.hparams.noise_std,
                            workers=self.hparams.collection_workers, progress=False,
                            fail_fraction=self.hparams.fail_fraction)
        if self.hparams.verify:
            open_dataset(self.root).verify()

    def setup(self, stage: str | None = None) -> None:
        """Open and check the dataset, build the sampler (once) and, when fitting, attach the progress tracker."""
        if self.sampler is None:
            dataset = open_dataset(self.root)
            check_dataset(dataset, num_tasks=self.num_tasks, action_dim=self.hparams.action_dim,
                          obs_keys=self.obs_keys, image_size=self.hparams.image_size,
                          episode_length=self.hparams.episode_length,
                          env_fields={k: getattr(self.env, k) for k in (self.hparams.env or {})})
            n = self.hparams.rollouts_per_task
            if dataset.rollouts_per_task < n:
                raise ValueError(f"dataset at {self.root} has {dataset.rollouts_per_task} rollouts per task, configured "
                                 f"rollouts_per_task={n}: run prepare_data() to extend it")
            buffers = [buf[:n] for buf in dataset.buffers]
            self.dataset = dataset
            self.sampler = MetaExplorationSampler(buffers, self.sampler_config, in_memory=self.hparams.in_memory,
                                                  device=self.storage_device())
        trainer = self._trainer_or_none()
        if trainer is not None and not any(isinstance(c, _TrainProgressTracker) for c in trainer.callbacks):
            trainer.callbacks.append(_TrainProgressTracker(self.progress))
            if self.progress.processed is None:
                self.progress.processed = self.progress.handed_out

    def _trainer_or_none(self) -> pl.Trainer | None:
        return getattr(self, "trainer", None)

    def storage_device(self) -> torch.device | None:
        """Where the buffers live when ``device`` is set; "cuda" without an index means this rank's trainer device."""
        if self.hparams.device is None:
            return None
        device = torch.device(self.hparams.device)
        trainer = self._trainer_or_none()
        if trainer is not None and device.index is None and trainer.strategy.root_device.type == device.type:
            return trainer.strategy.root_device
        return device

    def rank(self) -> int:
        """Global rank of this process: from the trainer, else torch.distributed, else 0."""
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0

    def _require_setup(self) -> MetaExplorationSampler:
        if self.sampler is None:
            self.setup("fit")
        assert self.sampler is not None
        return self.sampler

    def train_stream(self) -> MetaExplorationStream:
        """The training stream of this rank (seed, rank), starting where the stream was left."""
        return MetaExplorationStream(self._require_setup(), seed=self.seed, stream=TRAIN_STREAM, rank=self.rank(),
                                     batches_per_epoch=self.hparams.batches_per_epoch, progress=self.progress)

    def val_stream(self) -> MetaExplorationStream:
        """The validation stream of this rank: the same ``val_batches`` batches every pass."""
        return MetaExplorationStream(self._require_setup(), seed=self.hparams.val_seed, stream=VAL_STREAM,
                                     rank=self.rank(), batches_per_epoch=self.hparams.val_batches)

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.hparams.num_workers
        pin = bool(self.hparams.pin_memory and self.hparams.device is None and torch.cuda.is_available())
        return dict(batch_size=None, collate_fn=keep_batch, num_workers=workers, pin_memory=pin,
                    persistent_workers=bool(self.hparams.persistent_workers and workers > 0))

    def train_dataloader(self) -> StreamLoader:
        return StreamLoader(self.train_stream(), **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_stream(), **self._loader_kwargs())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain ints: the seed and the index of the next training batch of the stream."""
        return {"version": STATE_VERSION, "seed": int(self.seed), "position": int(self.progress.consumed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream of a checkpoint (its seed wins over the configured one)."""
        self.seed = _check_state(state_dict)["seed"]
        self.progress.reset(int(state_dict["position"]))
