"""Sawyer two-drawer environment, scripted behaviour policies and offline dataset tools (no learning here)."""

from envs.gl import select_headless_gl

select_headless_gl()

import gymnasium as gym  # noqa: E402

from envs.two_drawers import (  # noqa: E402
    ACTION_DIM,
    NUM_TASKS,
    OBS_MODES,
    STATE_DIM,
    EnvConfig,
    SawyerTwoDrawersEnv,
    state_dim,
    task_names,
)

ENV_ID = "SawyerTwoDrawers-v0"  # the paper's scene
DRAWERS_ENV_ID = "SawyerDrawers-v0"  # the same env with num_drawers=N (gym.make(DRAWERS_ENV_ID, num_drawers=3))
for _id in (ENV_ID, DRAWERS_ENV_ID):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="envs.two_drawers:SawyerTwoDrawersEnv")

__all__ = ["ACTION_DIM", "DRAWERS_ENV_ID", "ENV_ID", "NUM_TASKS", "OBS_MODES", "STATE_DIM", "EnvConfig",
           "SawyerTwoDrawersEnv", "state_dim", "task_names"]
