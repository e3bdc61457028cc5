"""TorchRL view of ``SawyerTwoDrawers-v0``: ``make_torchrl_env(**env_kwargs) -> EnvBase``.

The gymnasium env is wrapped with :class:`torchrl.envs.GymWrapper`; its observation keys ("pixels" and/or
"state") become tensordict entries of the same name. Pixels stay ``uint8`` and are only permuted to
channels-first ``[3, H, W]`` (like the offline datasets); no scaling is applied. ``info["success"]`` is read
into the tensordict as ``"success"`` (a boolean, 1 element). The task is never put in the tensordict.

Choosing the task: TorchRL forwards keyword arguments of ``reset`` to ``gymnasium.Env.reset``, so
``env.reset(options={"task": 1})`` starts an episode of task 1. Without ``options`` (for example inside
``env.rollout`` or a collector's automatic resets) the task is drawn from the env's RNG, which
``env.set_seed(seed)`` seeds.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.data import Composite, Unbounded
from torchrl.envs import Compose, EnvBase, GymWrapper, PermuteTransform, RenameTransform, Transform, TransformedEnv
from torchrl.envs.gym_like import BaseInfoDictReader

from envs.keys import PIXELS, STATE
from envs.two_drawers import SawyerTwoDrawersEnv  # importing ``envs`` already selected headless EGL


class SuccessReader(BaseInfoDictReader):
    """Copy ``info["success"]`` (a Python ``bool``) into the tensordict as a ``[1]``-shaped bool tensor."""

    def __init__(self) -> None:
        self._spec = Composite(success=Unbounded(shape=(1,), dtype=torch.bool))

    def __call__(self, info_dict: dict[str, Any], tensordict: TensorDictBase) -> TensorDictBase:
        tensordict.set("success", torch.tensor([bool(info_dict.get("success", False))]))
        return tensordict

    @property
    def info_spec(self) -> Composite:
        return self._spec


def make_torchrl_env(*, channels_first: bool = True, read_success: bool = True, **env_kwargs: Any) -> EnvBase:
    """Build a TorchRL env around :class:`~envs.two_drawers.SawyerTwoDrawersEnv`.

    Args:
        channels_first: permute ``"pixels"`` from ``[H, W, 3]`` to ``[3, H, W]`` (kept ``uint8``).
        read_success: copy ``info["success"]`` into the tensordict as a ``bool`` entry ``"success"``.
        **env_kwargs: passed to ``SawyerTwoDrawersEnv`` (``config=EnvConfig(...)`` and/or any
            ``EnvConfig`` field such as ``obs_mode="state"`` or ``image_size=32``).

    Returns:
        A ``TransformedEnv`` whose ``base_env`` is the ``GymWrapper``; ``base_env._env`` is the gymnasium env.
    """
    gym_env = SawyerTwoDrawersEnv(**env_kwargs)
    base = GymWrapper(gym_env)
    if read_success:
        base.set_info_dict_reader(SuccessReader())
    keys = gym_env.observation_space.spaces
    transforms: list[Transform] = []
    if STATE in keys:  # GymWrapper always renames a dict's "state" entry to "observation": undo it
        transforms.append(RenameTransform(in_keys=["observation"], out_keys=[STATE]))
    if channels_first and PIXELS in keys:
        transforms.append(PermuteTransform((-1, -3, -2), in_keys=[PIXELS]))
    return TransformedEnv(base, Compose(*transforms))
