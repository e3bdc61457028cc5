"""Helpers shared by the tests: the `lightning` command, a tiny state DataModule and a quiet CPU Trainer."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def lightning_command() -> list[str]:
    """The installed console script (next to this interpreter, else on PATH), else ``python -m``."""
    beside = Path(sys.executable).parent / "lightning"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("lightning")
    if on_path is not None:
        return [on_path]
    return [sys.executable, "-m", "lightning_modules.cli"]


def tiny_datamodule(dataset, cls=None, **kw):
    from datamodules import MetaExplorationDataModule

    env = dataset.env_config
    args = dict(root=str(dataset.root), obs_mode=env.obs_mode, image_size=env.image_size, obs_keys=["state"],
                episode_length=env.episode_length, rollouts_per_task=dataset.rollouts_per_task, num_segments=2,
                batch_size=2, batches_per_epoch=3, val_batches=1)
    args.update(kw)
    return (cls or MetaExplorationDataModule)(**args)


def cpu_trainer(tmp_path, **kw):
    import lightning.pytorch as pl

    args = dict(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0, default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)
