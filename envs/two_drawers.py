"""``SawyerTwoDrawers-v0``: a Sawyer arm and two drawers; task 0 opens the left drawer, task 1 the right.
``SawyerDrawers-v0`` (``num_drawers`` N = 2..4): N drawers in a row, task i opens drawer i (0 = leftmost).

The task is hidden: it is never part of the observation. The reward is sparse: 1.0 at every step at which
the *target* drawer is open beyond ``open_threshold`` metres, else 0 (opening the wrong drawer pays nothing).
Control follows Metaworld: the first three action entries move the mocap body that the hand is welded to
(``action_scale`` metres per unit and per physics frame block), the fourth drives the two fingers.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from envs.keys import OBS_MODES as MODE_KEYS
from envs.keys import PIXELS, STATE
from envs.scene import SCENE_CAMERA, SceneConfig, build_model, drawer_prefixes
from envs.typed import check_types

OBS_MODES = tuple(MODE_KEYS)
NUM_TASKS = 2      # the paper's scene (EnvConfig.num_drawers defaults to it); task i = open drawer i
MAX_DRAWERS = 4
ACTION_DIM = 4
HANDLE_REACH = 0.07  # the hand's box (mocap range) extends this far beyond the outermost drawer's centre (x)


def state_dim(num_drawers: int = NUM_TASKS) -> int:
    """Size of the ``state`` observation: tcp xyz, finger gap, one opening per drawer."""
    return 4 + num_drawers


def task_names(num_drawers: int = NUM_TASKS) -> tuple[str, ...]:
    """Human names of the tasks (the drawer each one opens)."""
    return ("left drawer", "right drawer") if num_drawers == 2 else tuple(f"drawer {i}" for i in range(num_drawers))


STATE_DIM = state_dim(NUM_TASKS)  # tcp xyz, finger gap, left opening, right opening
_HAND_QUAT = np.array([1.0, 0.0, 1.0, 0.0])


HAND_OFFSET_LAWS = ("distance", "area")  # how EnvConfig.hand_offset's distance is drawn (the first is the default)
APPEARANCE = ("light_scale", "tint")  # SceneConfig fields left out of to_dict at their defaults
_MOCAP_LOW, _MOCAP_HIGH = (-0.35, 0.40, 0.05), (0.35, 0.90, 0.40)  # the paper scene's hand box


def _hand_box(drawer_x: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The hand's box (mocap range) for a row of drawers: the paper scene's, widened in x to reach the outer ones."""
    reach = round(max(abs(x) for x in drawer_x) + HANDLE_REACH, 4)
    if reach <= _MOCAP_HIGH[0]:
        return _MOCAP_LOW, _MOCAP_HIGH
    return (-reach, *_MOCAP_LOW[1:]), (reach, *_MOCAP_HIGH[1:])


@dataclass(frozen=True)
class EnvConfig:
    """Every parameter that changes what the env produces (stored with datasets to refuse mismatches)."""

    obs_mode: str = "pixels"
    num_drawers: int = NUM_TASKS  # N drawers in a row (2 = the paper's scene); the scene is laid out for N
    image_size: int = 64
    episode_length: int = 40
    action_repeat: int = 2
    frame_skip: int = 5
    action_scale: float = 0.01
    open_threshold: float = 0.08
    hand_init: tuple[float, float, float] = (-0.05, 0.6, 0.2)
    hand_jitter: float = 0.03
    # every reset also moves the hand's start by a distance drawn uniformly in [hand_offset[0], hand_offset[1]] in a
    # random horizontal direction, and scales the arm's motion by a factor drawn in 1 +- action_scale_jitter
    # (wider start distributions and varied dynamics in the data, or deployment shifts; 0 = off, nothing drawn)
    hand_offset: tuple[float, float] = (0.0, 0.0)
    # how that distance is drawn: "distance" = uniform in [min, max] (starts crowd near the centre), "area" = uniform
    # over the ring's area (as many starts per cm^2 at the rim as at the centre: the far starts get their share)
    hand_offset_law: str = "distance"
    action_scale_jitter: float = 0.0
    mocap_low: tuple[float, float, float] = _MOCAP_LOW
    mocap_high: tuple[float, float, float] = _MOCAP_HIGH
    fast_render: bool = True
    # 4x multisample anti-aliasing of rendered frames (edges blend): twice the cost per frame on llvmpipe and no
    # measurable gain in how precisely a pixel filter places the hand (docs/RESULTS.md); off in every preset
    antialias: bool = False
    scene: SceneConfig = field(default_factory=SceneConfig)

    def __post_init__(self) -> None:
        check_types(self, "env.")
        check_types(self.scene, "env.scene.")
        if not 0.0 <= self.hand_offset[0] <= self.hand_offset[1] or len(self.hand_offset) != 2:
            raise ValueError(f"env.hand_offset must be [min, max] distances with 0 <= min <= max, got {self.hand_offset}")
        if self.hand_offset_law not in HAND_OFFSET_LAWS:
            raise ValueError(f"env.hand_offset_law must be one of {HAND_OFFSET_LAWS}, got {self.hand_offset_law!r}")
        if not 0.0 <= self.action_scale_jitter < 1.0:
            raise ValueError(f"env.action_scale_jitter must be in [0, 1), got {self.action_scale_jitter}")
        if self.obs_mode not in OBS_MODES:
            raise ValueError(f"unknown obs_mode {self.obs_mode!r}; choose one of {OBS_MODES}")
        if not 2 <= self.num_drawers <= MAX_DRAWERS:
            raise ValueError(f"env.num_drawers must be in 2..{MAX_DRAWERS}, got {self.num_drawers}")
        self._lay_out_drawers()

    def _lay_out_drawers(self) -> None:
        """A scene and a hand box that are some drawer count's automatic layout (the defaults are the two-drawer
        one) follow ``num_drawers``: a row the hand reaches. Set otherwise, they must agree with it."""
        automatic = [(SceneConfig.for_drawers(k), *_hand_box(SceneConfig.for_drawers(k).drawer_x))
                     for k in range(2, MAX_DRAWERS + 1)]
        if any(self.scene == scene for scene, _, _ in automatic):
            object.__setattr__(self, "scene", SceneConfig.for_drawers(self.num_drawers))
        elif len(self.scene.drawer_x) != self.num_drawers:
            raise ValueError(f"env.scene.drawer_x has {len(self.scene.drawer_x)} positions but env.num_drawers "
                             f"is {self.num_drawers}")
        if any((self.mocap_low, self.mocap_high) == (low, high) for _, low, high in automatic):
            low, high = _hand_box(self.scene.drawer_x)
            object.__setattr__(self, "mocap_low", low)
            object.__setattr__(self, "mocap_high", high)
        reach = max(abs(x) for x in self.scene.drawer_x) + HANDLE_REACH
        if self.mocap_low[0] > -reach or self.mocap_high[0] < reach:
            raise ValueError(f"env.mocap_low/mocap_high: the hand's x range [{self.mocap_low[0]}, {self.mocap_high[0]}] "
                             f"does not reach the outer drawers (needs +-{reach:.3f})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict. ``num_drawers`` is left out at 2 (the paper's scene): the metadata of two-drawer
        datasets and checkpoints stays what it was before the field existed (older code reads it)."""
        data = asdict(self)
        if data["num_drawers"] == NUM_TASKS:
            del data["num_drawers"]
        for name, default in (("hand_offset_law", HAND_OFFSET_LAWS[0]), ("antialias", False)):
            if data[name] == default:  # likewise (fields added after datasets were made)
                del data[name]
        for name in APPEARANCE:  # likewise the scene's appearance at Metaworld's (only deployment shifts change it)
            if data["scene"][name] == asdict(SceneConfig())[name]:
                del data["scene"][name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EnvConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        data = dict(data)
        scene = data.pop("scene", {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown env parameter(s) {unknown}; known: {sorted(known)}")
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        scene_cfg = scene if isinstance(scene, SceneConfig) else SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in scene.items()})
        return cls(**{**data, **tuples}, scene=scene_cfg)


class SawyerTwoDrawersEnv(gym.Env):
    """Gymnasium env of the paper's two-drawer scene (see module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, config: EnvConfig | None = None, render_mode: str | None = "rgb_array",
                 render_observations: bool = True, **overrides: Any):
        """``render_observations=False`` leaves ``pixels`` out of the returned observations (a batch renderer
        such as :class:`envs.tiled_render.TiledRenderer` draws them instead); ``overrides`` set EnvConfig fields."""
        config = EnvConfig.from_dict({**(config or EnvConfig()).to_dict(), **overrides})
        if config.obs_mode not in OBS_MODES:
            raise ValueError(f"unknown obs_mode {config.obs_mode!r}; choose one of {OBS_MODES}")
        if config.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {config.image_size}")
        if config.episode_length < 1 or config.action_repeat < 1 or config.frame_skip < 1:
            raise ValueError("episode_length, action_repeat and frame_skip must be >= 1")
        self.config = config
        self.render_mode = render_mode
        self.model = build_model(config.scene, fast_render=config.fast_render, antialias=config.antialias)
        self.data = mujoco.MjData(self.model)
        prefixes = drawer_prefixes(config.num_drawers)
        self._slides = [self.model.joint(f"{p}goal_slidey").qposadr[0] for p in prefixes]
        self._drawer_links = [self.model.body(f"{p}drawer_link").id for p in prefixes]
        self._left_tip = self.model.site("leftEndEffector").id
        self._right_tip = self.model.site("rightEndEffector").id
        self._mocap_low = np.asarray(config.mocap_low)
        self._mocap_high = np.asarray(config.mocap_high)
        self._renderer: mujoco.Renderer | None = None
        self._render_observations = render_observations
        self._task = 0
        self._steps = config.episode_length  # no episode before the first reset()
        self._action_scale = config.action_scale  # this episode's (action_scale_jitter)

        size = config.image_size
        spaces: dict[str, gym.Space] = {}
        if PIXELS in MODE_KEYS[config.obs_mode]:
            spaces[PIXELS] = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        if STATE in MODE_KEYS[config.obs_mode]:
            spaces[STATE] = gym.spaces.Box(-np.inf, np.inf, (state_dim(config.num_drawers),), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    # ------------------------------------------------------------------ queries
    @property
    def task(self) -> int:
        """The current target drawer (0 = left, 1 = right; drawer i of N from the left). Hidden from the agent."""
        return self._task

    @property
    def num_tasks(self) -> int:
        """Number of tasks = drawers."""
        return self.config.num_drawers

    def tcp(self) -> np.ndarray:
        """Position of the point between the fingertips."""
        return (self.data.site_xpos[self._left_tip] + self.data.site_xpos[self._right_tip]) / 2.0

    def openings(self) -> np.ndarray:
        """How far each drawer is pulled out, in metres (0 = closed, ~0.16 = fully open)."""
        return -self.data.qpos[self._slides].copy()

    def handle_pos(self, drawer: int) -> np.ndarray:
        """Where the fingertip centre goes to pull drawer ``drawer``: the open fingers straddle the handle bar."""
        return self.data.xpos[self._drawer_links[drawer]] + np.array([0.0, -0.165, -0.02])

    def state_vector(self) -> np.ndarray:
        """The ``state`` observation: tcp position, finger gap, every drawer's opening."""
        gap = np.linalg.norm(self.data.site_xpos[self._left_tip] - self.data.site_xpos[self._right_tip])
        return np.concatenate([self.tcp(), [gap], self.openings()]).astype(np.float32)

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        unknown = sorted(set(options) - {"task"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; the only option is 'task'")
        task = options.get("task")
        if task is None:
            task = int(self.np_random.integers(self.num_tasks))
        elif isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < self.num_tasks:
            names = ", ".join(f"{i} ({name})" for i, name in enumerate(task_names(self.num_tasks)))
            raise ValueError(f"unknown task {task!r}: tasks are {names}")
        self._task = int(task)
        self._steps = 0

        mujoco.mj_resetData(self.model, self.data)
        jitter = self.np_random.uniform(-1.0, 1.0, 3) * self.config.hand_jitter
        low, high = self.config.hand_offset
        if high > 0:  # drawn only when used: the random streams of datasets made without it are unchanged
            if self.config.hand_offset_law == "area":  # one draw either way: the streams stay aligned
                distance = np.sqrt(self.np_random.uniform(low ** 2, high ** 2))
            else:
                distance = self.np_random.uniform(low, high)
            angle = self.np_random.uniform(0.0, 2.0 * np.pi)
            jitter[:2] += distance * np.array([np.cos(angle), np.sin(angle)])
        self._action_scale = self.config.action_scale
        if self.config.action_scale_jitter > 0:
            self._action_scale *= self.np_random.uniform(1.0 - self.config.action_scale_jitter,
                                                         1.0 + self.config.action_scale_jitter)
        hand = np.clip(np.asarray(self.config.hand_init) + jitter, self._mocap_low, self._mocap_high)
        for _ in range(50):  # settle the arm under the mocap weld, as Metaworld's _reset_hand does
            self.data.mocap_pos[0] = hand
            self.data.mocap_quat[0] = _HAND_QUAT
            self.data.ctrl[:] = [-1.0, 1.0]
            mujoco.mj_step(self.model, self.data, nstep=self.config.frame_skip)
        return self._observation(), self._info()

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        if self._steps >= self.config.episode_length:
            raise RuntimeError("no episode in progress (not reset yet, or truncated): call reset() before step()")
        action = np.clip(action, -1.0, 1.0)
        for _ in range(self.config.action_repeat):
            target = self.data.mocap_pos[0] + action[:3] * self._action_scale
            self.data.mocap_pos[0] = np.clip(target, self._mocap_low, self._mocap_high)
            self.data.mocap_quat[0] = _HAND_QUAT
            self.data.ctrl[:] = [action[3], -action[3]]
            mujoco.mj_step(self.model, self.data, nstep=self.config.frame_skip)
        self._steps += 1
        info = self._info()
        reward = 1.0 if info["success"] else 0.0
        truncated = self._steps >= self.config.episode_length
        return self._observation(), reward, False, truncated, info

    def render(self) -> np.ndarray:
        """RGB frame (H, W, 3) uint8 from the fixed scene camera."""
        if self._renderer is None:
            size = self.config.image_size
            self._renderer = mujoco.Renderer(self.model, size, size)
            # free the GL context before interpreter shutdown tears EGL down (avoids errors at exit)
            self._renderer_finalizer = weakref.finalize(self, self._renderer.close)
        self._renderer.update_scene(self.data, camera=SCENE_CAMERA)
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer_finalizer()
            self._renderer = None

    # ------------------------------------------------------------------ helpers
    def _observation(self) -> dict[str, np.ndarray]:
        obs = {}
        if PIXELS in self.observation_space.spaces and self._render_observations:
            obs[PIXELS] = self.render()
        if STATE in self.observation_space.spaces:
            obs[STATE] = self.state_vector()
        return obs

    def _info(self) -> dict[str, Any]:
        openings = self.openings()
        is_open = openings > self.config.open_threshold
        info = {
            "success": bool(is_open[self._task]),
            "task": self._task,
            "wrong_drawer_open": bool(np.delete(is_open, self._task).any()),
            # the drawer that is open (the most open one when several are), -1 when none is
            "opened": int(np.argmax(openings)) if is_open.any() else -1,
        }
        if self.num_tasks == 2:
            info.update(opening_left=float(openings[0]), opening_right=float(openings[1]))
        else:
            info.update({f"opening_{i}": float(o) for i, o in enumerate(openings)})
        return info
