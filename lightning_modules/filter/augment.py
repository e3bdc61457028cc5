"""Image augmentation for the filter's training sequences (DrQ-style random shifts, brightness).

Both draw **one** transformation per sequence and apply it to all of its frames: the filter sees a camera that is
displaced by a few pixels, or a scene that is lit more or less brightly, consistently over the whole meta-episode
(a per-frame shift would make the frames jitter, which no latent dynamics can predict). The filter reconstructs
what it was shown, so the objective keeps its meaning; it only learns that these changes do not matter for the
task. Random numbers come from the global RNG (the module seeds it per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(pixels: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each sequence's frames by up to ``pad`` pixels in x and y (DrQ: replicate-pad, then crop).

    Args:
        pixels: ``[B, L, C, H, W]`` images (uint8 or float).
        pad: the largest shift in pixels; 0 returns ``pixels`` unchanged.
    Returns: a new tensor of the same shape and dtype.
    """
    if pad <= 0:
        return pixels
    B, L, C, H, W = pixels.shape
    padded = F.pad(pixels.reshape(B, L * C, H, W).float(), (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, B)).tolist()
    crops = [padded[b, :, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)]
    return torch.stack(crops).reshape(B, L, C, H, W).to(pixels.dtype)


def random_brightness(pixels: torch.Tensor, amount: float) -> torch.Tensor:
    """Scale each sequence's pixel values by a factor drawn uniformly in ``1 +- amount`` (clipped to 0..255).

    Args:
        pixels: ``[B, L, C, H, W]`` uint8 images.
        amount: the largest relative change; 0 returns ``pixels`` unchanged.
    """
    if amount <= 0:
        return pixels
    B = pixels.shape[0]
    factor = 1.0 + amount * (2.0 * torch.rand(B, 1, 1, 1, 1, device=pixels.device) - 1.0)
    return (pixels.float() * factor).round().clamp(0, 255).to(pixels.dtype)
