"""TensorDict keys and the observation-mode <-> keys mapping: declared here once, used by every layer.

The datasets (``envs.dataset``), the meta-exploration batches (``datamodules``), the filter, phase 2 and the
online evaluation all speak this vocabulary. A batch row at index ``t`` holds the observation ``o_t``
(:data:`PIXELS` and/or :data:`STATE`), the action ``a_t`` taken after it (:data:`ACTION`) and the reward received
after ``a_t`` (:data:`REWARD`, relabelled by synthetic exploration; :data:`ORIGINAL_REWARD` is the logged one).
"""

from __future__ import annotations

from typing import Sequence

PIXELS = "pixels"
STATE = "state"
ACTION = "action"
REWARD = ("next", "reward")
ORIGINAL_REWARD = ("next", "original_reward")
DONE = ("next", "done")
TERMINATED = ("next", "terminated")
TRUNCATED = ("next", "truncated")
SUCCESS = ("next", "success")
TASK = "task"                   # the task (buffer) a step came from
TARGET_TASK = "target_task"     # the meta-trajectory's target task (what the filter must infer)
SEGMENT = "segment"             # index of the segment (episode) inside a meta-trajectory
SEGMENT_START = "segment_start"
ROLLOUT = "rollout"             # source rollout inside its task buffer
STEP = "step"                   # source step inside its episode

OBS_KEYS = (PIXELS, STATE)      # every observation key, in canonical order
OBS_MODES = {"pixels": (PIXELS,), "state": (STATE,), "pixels_state": (PIXELS, STATE)}


def obs_keys_for(obs_mode: str) -> tuple[str, ...]:
    """The observation keys an env / dataset of ``obs_mode`` produces (``ValueError`` for an unknown mode)."""
    if obs_mode not in OBS_MODES:
        raise ValueError(f"unknown obs_mode {obs_mode!r}; choose one of {tuple(OBS_MODES)}")
    return OBS_MODES[obs_mode]


def obs_mode_for(obs_keys: Sequence[str]) -> str:
    """The cheapest ``obs_mode`` that produces ``obs_keys`` (``ValueError`` for keys outside :data:`OBS_KEYS`)."""
    keys = canonical_obs_keys(obs_keys)
    return next(mode for mode, produced in OBS_MODES.items() if set(keys) <= set(produced))


def canonical_obs_keys(obs_keys: Sequence[str]) -> tuple[str, ...]:
    """``obs_keys`` checked (a non-empty subset of :data:`OBS_KEYS`) and put in canonical order."""
    if isinstance(obs_keys, str):
        obs_keys = [obs_keys]
    unknown = [k for k in obs_keys if k not in OBS_KEYS]
    if unknown or not obs_keys:
        raise ValueError(f"obs_keys must be a non-empty subset of {OBS_KEYS}, got {list(obs_keys)}")
    return tuple(k for k in OBS_KEYS if k in obs_keys)
