"""Sawyer two-drawer environment, scripted behaviour policies and offline dataset tools (no learning here)."""

from envs.gl import select_headless_gl

select_headless_gl()

import gymnasium as gym  # noqa: E402

from envs.two_drawers import ACTION_DIM, NUM_TASKS, OBS_MODES, STATE_DIM, EnvConfig, SawyerTwoDrawersEnv  # noqa: E402

ENV_ID = "SawyerTwoDrawers-v0"
if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.two_drawers:SawyerTwoDrawersEnv")

__all__ = ["ACTION_DIM", "ENV_ID", "NUM_TASKS", "OBS_MODES", "STATE_DIM", "EnvConfig", "SawyerTwoDrawersEnv"]
