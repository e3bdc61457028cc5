"""Image grids for the variational filter's TensorBoard logs (reconstructions and open-loop predictions)."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images (float, [-0.5, 0.5]) -> uint8 [0, 255]."""
    return ((images.float() + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def comparison_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows of frames [N, 3, H, W] (uint8, same N) into one [3, H', W'] uint8 grid, one row each."""
    n = rows[0].shape[0]
    frames = torch.cat([r.cpu() for r in rows], 0)
    return make_grid(frames, nrow=n, padding=1, pad_value=255)


def pick_steps(length: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced time indices in [0, length)."""
    count = max(1, min(count, length))
    return torch.linspace(0, length - 1, count).round().long()
