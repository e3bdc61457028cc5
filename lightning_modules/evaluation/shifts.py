"""Deployment shifts: changed conditions at test time that a user would expect a robot to tolerate.

Each :class:`Shift` is a change of the evaluation env's parameters (applied to the dataset's, i.e. the training
conditions) and/or a perturbation of the loop between env and policy (noise on the executed actions or on the
state observations). ``python -m lightning_modules.evaluate --shift NAME`` evaluates one;
``python -m lightning_modules.robustness`` runs them all into one table.

Shifts are relative to the data's conditions: the hand start of the data is the nominal start +- ``hand_jitter`` per
axis, moved by up to ``hand_offset[1]`` horizontally; ``hand_start`` starts it 4 cm beyond that in every trial (8 cm: ``hand_start_far``).
``hand_start_10cm`` / ``hand_start_14cm`` are fixed poses instead, whatever the data covered: the hand starts 10 / 14 cm
from the nominal start (for the quickstart's data before 2026-12-04, up to 6 cm, the same as ``hand_start`` / ``_far``).
The scripted policies' actions carry Gaussian noise of std ``noise_std`` in the data; the arm's speed varies by
``action_scale_jitter`` between the data's rollouts. The scripted openers succeed under every shift here (see
docs/RESULTS.md, "Robustness"), so a failure under a shift is the learnt policy's. ``lighting``, ``colours`` and
``camera`` change the rendered images only (checkpoints whose filter reads pixels).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from envs.keys import PIXELS
from envs.two_drawers import EnvConfig

NOMINAL = "none"


@dataclasses.dataclass(frozen=True)
class Shift:
    """One deployment shift (see the module docstring)."""

    name: str
    description: str
    env: dict[str, Any] = dataclasses.field(default_factory=dict)  # EnvConfig fields (values or callables of it)
    action_noise: float = 0.0  # std of Gaussian noise added to every executed action (then clipped to [-1, 1])
    obs_noise: float = 0.0     # std of Gaussian noise added to the state observation the filter reads
    pixels_only: bool = False

    def env_config(self, base: EnvConfig) -> EnvConfig:
        """The evaluation env's parameters under this shift."""
        changes = {k: (v(base) if callable(v) else v) for k, v in self.env.items()}
        return EnvConfig.from_dict({**base.to_dict(), **changes}) if changes else base


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift(NOMINAL, "the training conditions"),
    Shift("hand_start", "hand starts 4 cm beyond the data's farthest start (random horizontal direction)",
          env={"hand_offset": lambda base: _further(base, 0.04)}),
    Shift("hand_start_far", "hand starts 8 cm beyond the data's farthest start (random horizontal direction)",
          env={"hand_offset": lambda base: _further(base, 0.08)}),
    Shift("hand_start_10cm", "hand starts 10 cm from the nominal start (random horizontal direction), whatever the data covered",
          env={"hand_offset": (0.10, 0.10)}),
    Shift("hand_start_14cm", "hand starts 14 cm from the nominal start (random horizontal direction), whatever the data covered",
          env={"hand_offset": (0.14, 0.14)}),
    Shift("action_noise", "Gaussian noise of std 0.3 on every executed action (actuation noise)", action_noise=0.3),
    Shift("obs_noise", "Gaussian noise of std 1 cm on the state observation (sensor noise)", obs_noise=0.01),
    Shift("slow_arm", "the arm moves 25% less per action (weaker controller: action_scale x 0.75)",
          env={"action_scale": lambda base: base.action_scale * 0.75, "action_scale_jitter": 0.0}),
    Shift("fast_arm", "the arm moves 25% more per action (stronger controller: action_scale x 1.25)",
          env={"action_scale": lambda base: base.action_scale * 1.25, "action_scale_jitter": 0.0}),
    Shift("lighting", "every light at 60% of its intensity (a dimmer room)", pixels_only=True,
          env={"scene": lambda base: dataclasses.replace(base.scene, light_scale=0.6)}),
    Shift("colours", "every surface's colour tinted warmer (RGB x 1.0, 0.92, 0.85)", pixels_only=True,
          env={"scene": lambda base: dataclasses.replace(base.scene, tint=(1.0, 0.92, 0.85))}),
    Shift("camera", "the camera turned 3 degrees about the vertical axis through its target", pixels_only=True,
          env={"scene": lambda base: _camera_yaw(base, 3.0)}),
)}


def _camera_yaw(base: EnvConfig, degrees: float):
    """The scene with the camera moved on a circle about the vertical axis through its target (still aimed at it)."""
    scene = base.scene
    angle = math.radians(degrees)
    dx, dy = scene.camera_pos[0] - scene.camera_target[0], scene.camera_pos[1] - scene.camera_target[1]
    pos = (scene.camera_target[0] + dx * math.cos(angle) - dy * math.sin(angle),
           scene.camera_target[1] + dx * math.sin(angle) + dy * math.cos(angle), scene.camera_pos[2])
    return dataclasses.replace(scene, camera_pos=tuple(round(v, 6) for v in pos))


def _further(base: EnvConfig, distance: float) -> tuple[float, float]:
    """A start ``distance`` beyond the farthest horizontal offset of the data (its ``hand_offset`` range's end)."""
    far = base.hand_offset[1] + distance
    return (far, far)


def get_shift(name: str, obs_keys: tuple[str, ...] | list[str] | None = None) -> Shift:
    """The shift called ``name`` (``ValueError`` naming the known ones); checks it applies to ``obs_keys``."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; choose one of {sorted(SHIFTS)}")
    shift = SHIFTS[name]
    if obs_keys is not None:
        if shift.pixels_only and PIXELS not in obs_keys:
            raise ValueError(f"shift {name!r} changes the images: the checkpoint's filter reads {list(obs_keys)}")
        if shift.obs_noise > 0 and PIXELS in obs_keys:
            raise ValueError(f"shift {name!r} perturbs state observations: the checkpoint's filter reads pixels")
    return shift
