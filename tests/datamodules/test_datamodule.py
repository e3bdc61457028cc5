"""MetaExplorationDataModule under Lightning: generation, errors, fast_dev_run, exact resume, DDP ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import ModelCheckpoint
from tensordict import TensorDict

from datamodules import MetaExplorationDataModule
from envs.dataset import DatasetError, progress_path
from helpers import collection_env

T = 10


def make_dm(dataset, **kw) -> MetaExplorationDataModule:
    """A DataModule over an existing fixture dataset (its own collection parameters)."""
    env = dataset.metadata.env
    args = dict(root=str(dataset.root), obs_mode=env.obs_mode, image_size=env.image_size, episode_length=env.episode_length,
                rollouts_per_task=dataset.rollouts_per_task, batch_size=4, num_segments=2, segment_length=T,
                batches_per_epoch=4, val_batches=2, env=collection_env(dataset) or None)
    return MetaExplorationDataModule(**{**args, **kw})


def signature(batch: TensorDict) -> torch.Tensor:
    """[B, K, 4]: (task, rollout, first step, target) of every segment of a batch."""
    B = batch.batch_size[0]
    starts = batch["segment_start"][..., 0]
    cols = [batch[k][starts].view(B, -1) for k in ("task", "rollout", "step", "target_task")]
    return torch.stack(cols, -1).cpu()


class Recorder(pl.LightningModule):
    """Trains a linear probe on the state observations and records what every training step received."""

    def __init__(self, out_dir: str | None = None):
        super().__init__()
        self.probe = torch.nn.Linear(6, 1)
        self.out_dir = out_dir
        self.seen: list[torch.Tensor] = []
        self.val_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, TensorDict) and batch.device == self.device and batch.batch_dims == 2
        self.seen.append(signature(batch))
        pred = self.probe(batch["state"])
        loss = torch.nn.functional.mse_loss(pred, batch["next", "reward"])
        self.log("loss", loss, batch_size=batch.batch_size[0])
        return loss

    def validation_step(self, batch, batch_idx):
        assert isinstance(batch, TensorDict)
        self.val_seen.append(signature(batch))

    def on_train_end(self):
        if self.out_dir is not None:
            torch.save({"train": self.seen, "val": self.val_seen}, Path(self.out_dir) / f"rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**args, **kw})


def test_prepare_data_generates_missing_dataset(tmp_path):
    dm = MetaExplorationDataModule(root=str(tmp_path / "ds"), obs_mode="state", image_size=32, episode_length=12,
                                   rollouts_per_task=2, collection_seed=3, batch_size=3, num_segments=2, segment_length=6)
    with pytest.raises(ValueError, match="no dataset"):
        dm.setup("fit")  # nothing there yet
    dm.prepare_data()
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["rollouts_per_task"] == 2 and meta["seed"] == 3 and meta["env"]["obs_mode"] == "state"
    stamp = (tmp_path / "ds" / "metadata.json").stat().st_mtime_ns
    dm.prepare_data()  # complete: left alone
    assert (tmp_path / "ds" / "metadata.json").stat().st_mtime_ns == stamp
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.batch_size == (3, 12) and set(batch.keys()) >= {"state", "action", "next", "segment_start", "task"}


def test_prepare_data_finishes_incomplete_dataset(tiny_state_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_state_dataset.root, root)
    flags = np.load(progress_path(root, 8))
    flags[1, 5] = False  # as if the collector had been killed before finishing this rollout
    np.save(progress_path(root, 8), flags)
    dm = make_dm(tiny_state_dataset, root=str(root))
    with pytest.raises(ValueError, match="incomplete"):
        dm.setup("fit")
    dm.prepare_data()
    dm.setup("fit")
    assert np.load(progress_path(root, 8)).all()


def test_dataset_errors(tiny_state_dataset, tiny_pixel_dataset, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(tiny_state_dataset.root, root)
    (root / "metadata.json").write_text("{not json")
    for step in ("prepare_data", "setup"):
        with pytest.raises(DatasetError, match="corrupt"):
            getattr(make_dm(tiny_state_dataset, root=str(root)), step)()
    incompatible = {
        "image_size": (tiny_pixel_dataset, dict(image_size=64), "32 px"),
        "obs keys": (tiny_state_dataset, dict(obs_mode="pixels"), "observation keys"),
        "num tasks": (tiny_state_dataset, dict(num_tasks=3, env={"num_drawers": 3}), "2 tasks"),
        "tasks vs drawers": (tiny_state_dataset, dict(num_tasks=3), "num_tasks=3 but env.num_drawers=2"),
        "action size": (tiny_state_dataset, dict(action_dim=7), "action"),
        "episode length": (tiny_state_dataset, dict(episode_length=50), "40 steps"),
        "segment length": (tiny_state_dataset, dict(segment_length=41), "segment_length"),
        "too few rollouts": (tiny_state_dataset, dict(rollouts_per_task=9), "8 rollouts per task"),
    }
    for name, (ds, kw, match) in incompatible.items():
        with pytest.raises(ValueError, match=match):
            make_dm(ds, **kw).setup("fit")
    with pytest.raises(ValueError, match="num_workers"):
        make_dm(tiny_state_dataset, device="cuda", num_workers=2)
    with pytest.raises(ValueError, match="mode"):
        make_dm(tiny_state_dataset, mode="expl")
    with pytest.raises(ValueError, match="search_fraction must be in"):
        make_dm(tiny_state_dataset, search_fraction=-0.1)  # at construction, before any data is read
    with pytest.raises(ValueError, match="unknown search_order 'sorted'"):
        make_dm(tiny_state_dataset, search_order="sorted")


def test_obs_subset_and_storage_options(tiny_pixel_dataset):
    """Deliver a subset of the stored observations; memmap, in-memory and device-copy batches are identical."""
    batches = []
    for kw in (dict(), dict(in_memory=True), dict(device="cpu")):
        dm = make_dm(tiny_pixel_dataset, obs_keys=["pixels"], segment_length=5, **kw)
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
    assert "pixels" in batches[0].keys() and "state" not in batches[0].keys()
    assert batches[0]["pixels"].shape == (4, 10, 3, 32, 32)
    assert all((b == batches[0]).all() for b in batches[1:])
    moved = move_data_to_device(batches[0], torch.device("cpu"))  # what Lightning's batch transfer does
    assert isinstance(moved, TensorDict) and moved.batch_size == (4, 10)
    dm = make_dm(tiny_pixel_dataset, rollouts_per_task=2, batch_size=64)  # the first 2 of 3 rollouts per task
    dm.setup("fit")
    rollouts = next(iter(dm.train_dataloader()))["rollout"]
    assert rollouts.max() == 1 and rollouts.min() == 0


def test_fast_dev_run_with_tensordict_batches(tiny_state_dataset):
    dm = make_dm(tiny_state_dataset)
    model = Recorder()
    trainer(fast_dev_run=True).fit(model, datamodule=dm)
    assert len(model.seen) == 1 and len(model.val_seen) == 1


def test_state_dict_resume_continues_stream(tiny_state_dataset, tmp_path):
    """A run resumed mid-epoch from a checkpoint sees exactly the batches the uninterrupted run saw."""
    ckpt_dir = tmp_path / "ckpt"
    full = Recorder()
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(max_steps=7, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoints]).fit(
        full, datamodule=make_dm(tiny_state_dataset, num_workers=2))
    assert len(full.seen) == 7
    ckpt = ckpt_dir / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=True)["MetaExplorationDataModule"]  # plain data: loads without pickle
    assert state == {"version": 1, "seed": 0, "position": 3}

    resumed = Recorder()
    trainer(max_steps=7, limit_val_batches=0).fit(resumed, datamodule=make_dm(tiny_state_dataset), ckpt_path=str(ckpt))
    assert len(resumed.seen) == 4  # steps 4..7, crossing the epoch boundary at 4 batches
    for a, b in zip(full.seen[3:], resumed.seen):
        assert torch.equal(a, b)
    # a fresh run with the same seed repeats the stream; another seed does not
    again = Recorder()
    trainer(max_steps=3, limit_val_batches=0).fit(again, datamodule=make_dm(tiny_state_dataset))
    assert all(torch.equal(a, b) for a, b in zip(full.seen, again.seen))
    other = Recorder()
    trainer(max_steps=3, limit_val_batches=0).fit(other, datamodule=make_dm(tiny_state_dataset, seed=1))
    assert not any(torch.equal(a, b) for a, b in zip(full.seen, other.seen))


def test_ddp_ranks_draw_different_samples(tiny_state_dataset, tmp_path):
    """Two CPU processes (gloo, ddp_spawn): each rank draws its own stream, training and validation."""
    dm = make_dm(tiny_state_dataset, batches_per_epoch=3, val_batches=2)
    trainer(devices=2, strategy="ddp_spawn", max_epochs=1).fit(Recorder(out_dir=str(tmp_path)), datamodule=dm)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for part in ("train", "val"):
        assert len(runs[0][part]) == len(runs[1][part]) > 0
        rollouts = [{tuple(s.flatten().tolist()) for batch in run[part] for s in batch} for run in runs]
        assert len(rollouts[0]) == 4 * len(runs[0][part])  # distinct meta-rollouts within a rank
        assert not rollouts[0] & rollouts[1]  # and none shared between ranks
    # rank 0 of a DDP run draws the stream a single process draws
    single = Recorder()
    trainer(max_epochs=1, limit_val_batches=0).fit(single, datamodule=make_dm(tiny_state_dataset, batches_per_epoch=3))
    assert all(torch.equal(a, b) for a, b in zip(single.seen, runs[0]["train"]))
