"""The variational filter's images in TensorBoard: reconstructions and open-loop predictions beside the frames."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.utils import make_grid

from envs.keys import ACTION, PIXELS


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


class FilterImageLogger(Callback):
    """Log the filter's reconstructions (``val/reconstruction``) and open-loop predictions (``val/open_loop``).

    Every ``every_n_val`` validation runs (not the sanity check), on the first validation batch, when the
    filter reads pixels and the logger can ``add_image`` (TensorBoard). Row 1: the frames, row 2: the model's.
    Open loop: filter the first quarter of the sequence, then imagine with the prior under the logged actions.
    """

    def __init__(self, every_n_val: int = 5, frames: int = 10):
        if every_n_val < 1 or frames < 1:
            raise ValueError(f"every_n_val and frames must be >= 1, got {every_n_val} and {frames}")
        self.every_n_val, self.frames = every_n_val, frames
        self._val_runs = 0

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if (batch_idx != 0 or trainer.sanity_checking or self._val_runs % self.every_n_val
                or PIXELS not in pl_module.filter.obs_keys):
            return
        experiment = getattr(pl_module.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        with torch.no_grad():
            _, info = pl_module.compute_losses(batch, sample=False)
        self.log_images(experiment, pl_module.filter.rssm, batch, info, trainer.global_step)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_runs += 1

    @torch.no_grad()
    def log_images(self, experiment: Any, rssm: Any, batch: Any, info: dict[str, Any], step: int) -> None:
        """Write both grids of the first sequence of ``batch`` (``info``: ``compute_losses``'s intermediates)."""
        pixels = batch[PIXELS]
        L = batch.batch_size[1]
        steps = pick_steps(L, self.frames).to(pixels.device)
        recon = to_uint8(info["dec"][PIXELS][0, steps])
        experiment.add_image("val/reconstruction", comparison_grid([pixels[0, steps], recon]), step)
        context = max(1, L // 4)
        horizon = min(self.frames, L - context)
        if horizon < 1:
            return
        out = info["out"]
        state = {"deter": out["deter"][:1, context - 1].float(), "stoch": out["post_mean"][:1, context - 1].float()}
        actions = batch[ACTION][:1, context - 1: context - 1 + horizon].float()
        imagined = rssm.imagine(state, actions)
        pred = rssm.decode(rssm.features(imagined["stoch"], imagined["deter"]))[PIXELS][0]
        truth = pixels[0, context: context + horizon]
        experiment.add_image("val/open_loop", comparison_grid([truth, to_uint8(pred)]), step)
