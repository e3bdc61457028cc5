"""A PNG grid of dataset frames: one row per rollout (both tasks), columns spaced along the episode."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from envs.dataset import OfflineDataset
from envs.keys import PIXELS


def preview_grid(dataset: OfflineDataset, rollouts_per_task: int = 2, columns: int = 8) -> np.ndarray:
    """uint8 [rows*H, columns*W, 3]: ``rollouts_per_task`` rows per task, frames evenly spaced in time."""
    if PIXELS not in dataset.obs_keys:
        raise ValueError(f"dataset {dataset.root} has no pixels (obs_mode={dataset.env_config.obs_mode!r})")
    t = dataset.episode_length
    steps = np.linspace(0, t - 1, min(columns, t)).round().astype(int)
    rows = []
    for buffer in dataset.buffers:
        for index in range(min(rollouts_per_task, buffer.shape[0])):
            frames = buffer[PIXELS][index, steps].numpy().transpose(0, 2, 3, 1)  # [C, H, W, 3]
            rows.append(np.concatenate(list(frames), axis=1))
    return np.concatenate(rows, axis=0)


def write_preview(dataset: OfflineDataset, path: str | os.PathLike, scale: int = 2) -> Path:
    """Write the preview grid (upscaled, rows labelled by task) to ``path`` atomically; returns the path."""
    grid = preview_grid(dataset)
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    row_h = dataset.env_config.image_size * scale
    rows_per_task = grid.shape[0] // dataset.env_config.image_size // dataset.num_tasks
    for row in range(grid.shape[0] // dataset.env_config.image_size):
        draw.text((3, row * row_h + 2), f"task {row // rows_per_task}", fill=(255, 255, 0))
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    image.save(tmp)
    os.replace(tmp, path)
    return path
