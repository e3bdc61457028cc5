"""Compose the Sawyer drawer scene from Metaworld's own assets with ``mujoco.MjSpec``.

No Metaworld XML is copied: the Sawyer + table scene and the drawer are read from the installed
``metaworld`` package; the single drawer of ``sawyer_drawer.xml`` is detached and the drawer body is
attached once per drawer: twice (name prefixes ``left/`` and ``right/``) in the paper's scene, or N times in a row
(``drawer0/`` ... from left to right, :meth:`SceneConfig.for_drawers`).
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

import mujoco
import numpy as np

DRAWER_PREFIXES = ("left/", "right/")  # the paper's two drawers
SCENE_CAMERA = "scene"
DRAWER_WIDTH = 0.236  # x extent of Metaworld's drawer case (measured on the compiled scene)
ROW_SPACING = 0.25    # centre to centre in a row of 3 or more drawers (1.4 cm between two cases)


def drawer_prefixes(num_drawers: int) -> tuple[str, ...]:
    """Body-name prefixes of the drawers, left to right: ``left/``, ``right/`` for two, else ``drawer<i>/``."""
    return DRAWER_PREFIXES if num_drawers == 2 else tuple(f"drawer{i}/" for i in range(num_drawers))


@dataclass(frozen=True)
class SceneConfig:
    """Geometry of the scene: drawer positions (one x per drawer, left to right) and the fixed camera."""

    drawer_x: tuple[float, ...] = (-0.15, 0.15)
    drawer_y: float = 0.9
    camera_pos: tuple[float, float, float] = (0.0, 0.95, 1.1)
    camera_target: tuple[float, float, float] = (0.0, 0.68, 0.0)
    camera_fovy: float = 45.0
    # appearance (deployment shifts of the images; 1 = Metaworld's): every light's intensity times light_scale,
    # every material's RGB (and that of geoms without one) times tint
    light_scale: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def for_drawers(cls, num_drawers: int) -> "SceneConfig":
        """The scene with ``num_drawers`` drawers: the paper's for two, else a centred row ``ROW_SPACING`` apart,
        the camera's field of view widened to keep every drawer and its opening in the frame."""
        if num_drawers == 2:
            return cls()
        xs = tuple(round((i - (num_drawers - 1) / 2) * ROW_SPACING, 4) for i in range(num_drawers))
        half_width = max(abs(x) for x in xs) + DRAWER_WIDTH / 2
        return cls(drawer_x=xs, camera_fovy=45.0 if half_width <= 0.42 else 55.0)


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
    """Return the (uncompiled) spec of the Sawyer arm with the drawers side by side."""
    source = metaworld_asset(os.path.join("sawyer_xyz", "sawyer_drawer.xml"))
    spec = mujoco.MjSpec.from_file(source)
    spec.detach_body(spec.body("drawer"))
    spec.site("goal").delete()  # Metaworld's goal marker would tell the task away in the image
    for prefix, x in zip(drawer_prefixes(len(config.drawer_x)), config.drawer_x):
        child = mujoco.MjSpec.from_file(source)  # one fresh copy per attachment
        drawer = child.body("drawer")
        drawer.pos = [x, config.drawer_y, 0.0]
        spec.worldbody.add_frame().attach_body(drawer, prefix, "")
    pos = np.asarray(config.camera_pos, dtype=float)
    camera = spec.worldbody.add_camera(name=SCENE_CAMERA, pos=pos, fovy=config.camera_fovy)
    camera.alt.type = mujoco.mjtOrientation.mjORIENTATION_XYAXES
    camera.alt.xyaxes = _lookat_xyaxes(pos, np.asarray(config.camera_target, dtype=float))
    return spec


def build_model(config: SceneConfig = SceneConfig(), fast_render: bool = True,
                antialias: bool = False) -> mujoco.MjModel:
    """The compiled scene: the env's own copy of a model compiled once per arguments in a process.

    Compiling the scene costs ~0.4 s (two drawers) to ~0.9 s (three) on a CPU, a copy ~10 ms; an evaluation builds
    one env per lockstep trial, every periodic evaluation again. ``fast_render`` drops what a 64 px frame does not
    need (shadows, reflections, and MSAA unless ``antialias``: 4 samples, the model's default).
    """
    try:
        hash(config)
    except TypeError:  # a SceneConfig built with lists: compile it uncached
        return _compiled_model.__wrapped__(config, fast_render, antialias)
    return copy.copy(_compiled_model(config, fast_render, antialias))  # MjModel's copy is deep: envs never share arrays


@functools.lru_cache(maxsize=16)
def _compiled_model(config: SceneConfig, fast_render: bool, antialias: bool) -> mujoco.MjModel:
    model = build_spec(config).compile()
    # Metaworld's mocap weld: the hand follows the mocap body (same constants as its SawyerMocapBase).
    for i in range(model.neq):
        if model.eq_type[i] == mujoco.mjtEq.mjEQ_WELD:
            model.eq_data[i] = np.array([0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 5.0])
    if config.light_scale != 1.0:
        for field in ("light_ambient", "light_diffuse", "light_specular"):
            getattr(model, field)[:] *= config.light_scale
        for field in ("ambient", "diffuse", "specular"):
            setattr(model.vis.headlight, field, np.asarray(getattr(model.vis.headlight, field)) * config.light_scale)
    if tuple(config.tint) != (1.0, 1.0, 1.0):
        tint = np.asarray(config.tint, dtype=np.float32)
        plain = model.geom_matid < 0  # a geom with a material shows the material's colour (its own rgba, changed, would win)
        model.geom_rgba[plain, :3] = np.clip(model.geom_rgba[plain, :3] * tint, 0.0, 1.0)
        model.mat_rgba[:, :3] = np.clip(model.mat_rgba[:, :3] * tint, 0.0, 1.0)
    if fast_render:
        if not antialias:
            model.vis.quality.offsamples = 0
        model.vis.quality.shadowsize = 0
        model.light_castshadow[:] = 0
        model.mat_reflectance[:] = 0
    return model
