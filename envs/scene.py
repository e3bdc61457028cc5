"""Compose the Sawyer two-drawer scene from Metaworld's own assets with ``mujoco.MjSpec``.

No Metaworld XML is copied: the Sawyer + table scene and the drawer are read from the installed
``metaworld`` package; the single drawer of ``sawyer_drawer.xml`` is detached and the drawer body is
attached twice, with the name prefixes ``left/`` and ``right/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mujoco
import numpy as np

DRAWER_PREFIXES = ("left/", "right/")
SCENE_CAMERA = "scene"


@dataclass(frozen=True)
class SceneConfig:
    """Geometry of the scene: drawer positions and the fixed camera."""

    drawer_x: tuple[float, float] = (-0.15, 0.15)
    drawer_y: float = 0.9
    camera_pos: tuple[float, float, float] = (0.0, 0.95, 1.1)
    camera_target: tuple[float, float, float] = (0.0, 0.68, 0.0)
    camera_fovy: float = 45.0


def metaworld_asset(relative: str) -> str:
    """Absolute path of a file inside Metaworld's installed ``assets`` folder."""
    import metaworld

    return os.path.join(os.path.dirname(metaworld.__file__), "assets", relative)


def _lookat_xyaxes(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    forward = target - pos
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right = right / np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.concatenate([right, up])


def build_spec(config: SceneConfig = SceneConfig()) -> mujoco.MjSpec:
    """Return the (uncompiled) spec of the Sawyer arm with two drawers side by side."""
    source = metaworld_asset(os.path.join("sawyer_xyz", "sawyer_drawer.xml"))
    spec = mujoco.MjSpec.from_file(source)
    spec.detach_body(spec.body("drawer"))
    spec.site("goal").delete()  # Metaworld's goal marker would tell the task away in the image
    for prefix, x in zip(DRAWER_PREFIXES, config.drawer_x):
        child = mujoco.MjSpec.from_file(source)  # one fresh copy per attachment
        drawer = child.body("drawer")
        drawer.pos = [x, config.drawer_y, 0.0]
        spec.worldbody.add_frame().attach_body(drawer, prefix, "")
    pos = np.asarray(config.camera_pos, dtype=float)
    camera = spec.worldbody.add_camera(name=SCENE_CAMERA, pos=pos, fovy=config.camera_fovy)
    camera.alt.type = mujoco.mjtOrientation.mjORIENTATION_XYAXES
    camera.alt.xyaxes = _lookat_xyaxes(pos, np.asarray(config.camera_target, dtype=float))
    return spec


def build_model(config: SceneConfig = SceneConfig(), fast_render: bool = True) -> mujoco.MjModel:
    """Compile the scene. ``fast_render`` drops what a 64 px frame does not need (shadows, MSAA, reflections)."""
    model = build_spec(config).compile()
    # Metaworld's mocap weld: the hand follows the mocap body (same constants as its SawyerMocapBase).
    for i in range(model.neq):
        if model.eq_type[i] == mujoco.mjtEq.mjEQ_WELD:
            model.eq_data[i] = np.array([0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 5.0])
    if fast_render:
        model.vis.quality.offsamples = 0
        model.vis.quality.shadowsize = 0
        model.light_castshadow[:] = 0
        model.mat_reflectance[:] = 0
    return model
