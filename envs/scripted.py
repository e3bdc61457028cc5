"""Task-specific scripted behaviour policies: policy ``i`` opens drawer ``i`` and never the other one.

They act from the env's privileged simulator state (hand and handle positions), so they work whatever the
observation mode. Gaussian action noise (``noise_std``) and the env's random hand offset make the data varied.
A *failed attempt* (``aim_offset`` = :data:`MISS_AIM`) reaches for the drawer but pulls above its handle: nothing opens.
"""

from __future__ import annotations

import numpy as np

from envs.two_drawers import MAX_DRAWERS, SawyerTwoDrawersEnv, task_names

# the aim of a failed attempt, relative to the handle (m): 8 cm above it the fingers pull over the handle and open
# nothing (measured: 40 of 40 episodes, every drawer shut; 5 cm to a side or above still opened some)
MISS_AIM = (0.0, 0.0, 0.08)


class DrawerOpener:
    """Proportional controller: rise to the approach height, line up over drawer ``task``'s handle loop,
    descend into it, then pull the drawer towards the robot. The gripper stays open (the fingers hook the bar).
    ``aim_offset`` moves the point it aims at from the handle (a failed attempt: :data:`MISS_AIM`).
    """

    def __init__(
        self,
        task: int,
        noise_std: float = 0.3,
        gain: float = 10.0,
        approach_height: float = 0.06,
        xy_tolerance: float = 0.03,
        z_tolerance: float = 0.02,
        seed: int | None = None,
        aim_offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ):
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < MAX_DRAWERS:
            raise ValueError(f"unknown task {task!r}: a drawer index in 0..{MAX_DRAWERS - 1}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.task = task
        self.noise_std = noise_std
        self.gain = gain
        self.approach_height = approach_height
        self.xy_tolerance = xy_tolerance
        self.z_tolerance = z_tolerance
        self.rng = np.random.default_rng(seed)
        self.aim_offset = np.asarray(aim_offset, dtype=float)

    def clean_action(self, env: SawyerTwoDrawersEnv) -> np.ndarray:
        """The noiseless action for the env's current simulator state."""
        if self.task >= env.num_tasks:
            names = ", ".join(f"{i} ({name})" for i, name in enumerate(task_names(env.num_tasks)))
            raise ValueError(f"unknown task {self.task!r} for this scene: tasks are {names}")
        tcp = env.tcp()
        grasp = env.handle_pos(self.task) + self.aim_offset
        if np.linalg.norm(tcp[:2] - grasp[:2]) > self.xy_tolerance:
            goal = grasp + np.array([0.0, 0.0, self.approach_height])
        elif tcp[2] > grasp[2] + self.z_tolerance:
            goal = grasp
        else:
            goal = grasp + np.array([0.0, -0.10, 0.0])
        delta = np.clip((goal - tcp) * self.gain, -1.0, 1.0)
        return np.concatenate([delta, [-1.0]])

    def __call__(self, env: SawyerTwoDrawersEnv) -> np.ndarray:
        action = self.clean_action(env)
        if self.noise_std > 0:
            action = action + self.rng.normal(0.0, self.noise_std, size=action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)
