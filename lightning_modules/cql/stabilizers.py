"""Phase 2's stabilisers: a Polyak-averaged acting policy and the learning-rate schedule.

Offline actor-critic training on a sparse 0/1 reward flickers: a policy that opens the right drawer at one
evaluation can miss it 1000 updates later, so the final checkpoint is a lottery unless something settles it.
Both tools here act on *which parameters are deployed*, not on the loss:

* :class:`PolyakActor` keeps an exponential moving average of the actor's parameters (``decay`` per update, as the
  target critics do with ``tau``); the evaluation acts with it. Averaging over the last ~``1 / (1 - decay)``
  updates cancels the update-to-update noise of the actor instead of sampling it at the checkpoint's step.
* :func:`lr_factor` decays the learning rates (cosine from 1 to ``final`` over ``total`` updates), so the last
  updates are small and the final parameters stop moving.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

LR_SCHEDULES = ("constant", "cosine")


class PolyakActor(nn.Module):
    """The acting copy of the actor: ``acting <- decay * acting + (1 - decay) * actor`` after every update.

    Args:
        actor: a freshly built actor of the same architecture (its parameters are overwritten and frozen).
        params: the trained actor's parameters (``CQLLoss.actor_network_params``) to start from.
        decay: Polyak factor in [0, 1); 0.995 averages over ~200 updates.
    """

    def __init__(self, actor: nn.Module, params: TensorDictBase, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"actor_polyak must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.actor = actor.requires_grad_(False)
        self.copy_(params)

    def _params(self) -> TensorDictBase:
        return TensorDict.from_module(self.actor)

    @torch.no_grad()
    def copy_(self, params: TensorDictBase) -> None:
        """Set the acting parameters to ``params`` (same structure as the actor's)."""
        self._params().data.update_(params.detach().data)

    @torch.no_grad()
    def update(self, params: TensorDictBase) -> None:
        """One Polyak step towards the trained actor's current ``params``."""
        self._params().data.lerp_(params.detach().data, 1.0 - self.decay)

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        return self.actor(td)


def lr_factor(schedule: str, step: int, total: int, final: float) -> float:
    """Learning-rate multiplier at update ``step`` of ``total``: 1 (``constant``) or a cosine from 1 to ``final``
    reached at ``total`` and held after it (``cosine``)."""
    if schedule == "constant" or total <= 0:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    progress = min(max(step, 0) / total, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
