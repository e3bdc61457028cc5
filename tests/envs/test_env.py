"""The real ``SawyerTwoDrawers-v0`` env (32 px pixels or state obs, for speed) and its TorchRL wrapper."""

from __future__ import annotations

import warnings

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torchrl.envs.utils import check_env_specs

import envs  # noqa: F401  (registers SawyerTwoDrawers-v0, selects EGL)
from envs.scene import DRAWER_PREFIXES
from envs.scripted import DrawerOpener
from envs.torchrl_env import make_torchrl_env
from envs.two_drawers import OBS_MODES, STATE_DIM, SawyerTwoDrawersEnv

SIZE = 32
INFINITE_BOUNDS = r".*Box observation space (minimum|maximum) value is.*infinity"


def run_opener(env: SawyerTwoDrawersEnv, drawer: int, *, task: int, seed: int) -> tuple[list[float], list[dict]]:
    """One full episode of task ``task`` driven by the scripted opener of drawer ``drawer``."""
    policy = DrawerOpener(drawer, seed=seed)
    env.reset(seed=seed, options={"task": task})
    rewards, infos = [], []
    truncated = False
    while not truncated:
        _, reward, terminated, truncated, info = env.step(policy(env))
        assert not terminated
        rewards.append(reward)
        infos.append(info)
    return rewards, infos


# --------------------------------------------------------------------------- gymnasium API
@pytest.mark.parametrize("obs_mode", OBS_MODES)
def test_gymnasium_check_env(obs_mode):
    env = gym.make("SawyerTwoDrawers-v0", obs_mode=obs_mode, image_size=SIZE).unwrapped
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any checker warning fails the test ...
            # ... except this one: the state vector's Box is unbounded on purpose (openings, tcp are not clipped)
            warnings.filterwarnings("ignore", message=INFINITE_BOUNDS)
            check_env(env, skip_render_check=False)
    finally:
        env.close()


@pytest.mark.parametrize("obs_mode", OBS_MODES)
def test_observation_keys_shapes_and_info(make_env, obs_mode):
    env = make_env(obs_mode)
    obs, info = env.reset(seed=0)
    expected = {"pixels_state": {"pixels", "state"}}.get(obs_mode, {obs_mode})
    assert set(obs) == expected
    if "pixels" in obs:
        assert obs["pixels"].shape == (SIZE, SIZE, 3) and obs["pixels"].dtype == np.uint8
    if "state" in obs:
        assert obs["state"].shape == (STATE_DIM,) and obs["state"].dtype == np.float32
    assert obs in env.observation_space
    for key in ("success", "task", "opening_left", "opening_right"):
        assert key in info
    obs, reward, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert obs in env.observation_space
    assert reward == 0.0 and terminated is False and truncated is False
    assert {"success", "task", "opening_left", "opening_right"} <= set(info)


def test_episode_truncates_at_episode_length(make_env):
    env = make_env(episode_length=5)
    env.reset(seed=0)
    flags = [env.step(np.zeros(4))[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]


# --------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("task", [0, 1])
def test_reset_option_fixes_task(make_env, task):
    env = make_env()
    for seed in range(4):
        _, info = env.reset(seed=seed, options={"task": task})
        assert env.task == task and info["task"] == task


def test_task_drawn_from_env_rng(make_env):
    env = make_env()
    tasks = []
    for seed in range(16):
        _, info = env.reset(seed=seed)
        tasks.append(info["task"])
        assert env.reset(seed=seed)[1]["task"] == info["task"]  # reproducible for a seed
    assert set(tasks) == {0, 1}
    unseeded = {env.reset()[1]["task"] for _ in range(20)}  # the RNG keeps going between resets
    assert unseeded == {0, 1}


def test_task_is_not_in_the_observation(make_env):
    env = make_env("pixels_state")
    for seed in range(3):
        obs0, _ = env.reset(seed=seed, options={"task": 0})
        obs1, _ = env.reset(seed=seed, options={"task": 1})
        assert set(obs0) == {"pixels", "state"}
        np.testing.assert_array_equal(obs0["pixels"], obs1["pixels"])
        np.testing.assert_array_equal(obs0["state"], obs1["state"])


def test_hand_start_jitter(make_env):
    env = make_env()
    env.reset(seed=0)
    tcp_a = env.tcp().copy()
    env.reset(seed=1)
    tcp_b = env.tcp().copy()
    env.reset(seed=0)
    tcp_c = env.tcp().copy()
    assert np.linalg.norm(tcp_a - tcp_b) > 1e-3
    np.testing.assert_allclose(tcp_a, tcp_c)


# --------------------------------------------------------------------------- reward and scripted policies
@pytest.mark.parametrize("task", [0, 1])
def test_scripted_opener_succeeds_and_leaves_other_drawer_closed(make_env, task):
    env = make_env()
    other = ("opening_left", "opening_right")[1 - task]
    successes = 0
    for episode in range(10):
        rewards, infos = run_opener(env, task, task=task, seed=1000 * task + episode)
        successes += infos[-1]["success"]
        assert rewards == [1.0 if i["success"] else 0.0 for i in infos]
        assert not any(i["wrong_drawer_open"] for i in infos)
        assert max(i[other] for i in infos) < 0.01
    assert successes >= 9, f"scripted opener of drawer {task} succeeded {successes}/10"


@pytest.mark.parametrize("task", [0, 1])
def test_opening_wrong_drawer_pays_nothing(make_env, task):
    env = make_env()
    rewards, infos = run_opener(env, 1 - task, task=task, seed=7 + task)
    wrong = ("opening_left", "opening_right")[1 - task]
    assert infos[-1][wrong] > env.config.open_threshold  # the wrong drawer really is open
    assert infos[-1]["wrong_drawer_open"]
    assert rewards == [0.0] * len(rewards)
    assert not any(i["success"] for i in infos)


def test_pixels_change_when_a_drawer_opens(make_env):
    env = make_env("pixels")
    obs, _ = env.reset(seed=0)
    closed = obs["pixels"].astype(np.int16)
    frames = []
    for prefix in DRAWER_PREFIXES:
        env.reset(seed=0)
        env.data.qpos[env.model.joint(f"{prefix}goal_slidey").qposadr[0]] = -0.15  # pull the drawer out
        mujoco.mj_forward(env.model, env.data)
        assert env.openings().max() > env.config.open_threshold
        frames.append(env.render().astype(np.int16))
    for frame in frames:
        assert frame.shape == (SIZE, SIZE, 3)
        assert np.abs(frame - closed).mean() > 0.5
    assert np.abs(frames[0] - frames[1]).mean() > 0.5  # left and right openings look different


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("task", [2, -1, "left", 0.5, True])
def test_unknown_task_raises(make_env, task):
    env = make_env()
    with pytest.raises(ValueError, match="task"):
        env.reset(options={"task": task})


def test_unknown_reset_option_raises(make_env):
    with pytest.raises(ValueError, match="option"):
        make_env().reset(options={"goal": 1})


def test_unknown_obs_mode_raises():
    with pytest.raises(ValueError, match="obs_mode"):
        SawyerTwoDrawersEnv(obs_mode="depth")


def test_unknown_env_parameter_raises():
    with pytest.raises(ValueError, match="colour"):
        SawyerTwoDrawersEnv(colour="red")


@pytest.mark.parametrize(
    ("action", "match"),
    [(np.zeros(3), "shape"), (np.zeros((1, 4)), "shape"), (np.array([0.0, np.nan, 0.0, 0.0]), "finite"),
     (np.array([np.inf, 0.0, 0.0, 0.0]), "finite")],
)
def test_bad_action_raises(make_env, action, match):
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)


def test_step_past_episode_end_raises(make_env):
    env = make_env(episode_length=3)
    env.reset(seed=0)
    for _ in range(3):
        env.step(np.zeros(4))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(4))
    env.reset(seed=0)  # a reset starts a new episode
    env.step(np.zeros(4))


# --------------------------------------------------------------------------- TorchRL wrapper
@pytest.mark.parametrize("obs_mode", OBS_MODES)
def test_torchrl_check_env_specs(obs_mode):
    env = make_torchrl_env(obs_mode=obs_mode, image_size=SIZE)
    try:
        env.set_seed(0)
        check_env_specs(env)
        td = env.reset()
        if "pixels" in obs_mode:
            assert td["pixels"].shape == (3, SIZE, SIZE) and td["pixels"].dtype == torch.uint8
            frame = torch.from_numpy(env.base_env._env.render()).permute(2, 0, 1)
            assert torch.equal(td["pixels"], frame)
        if "state" in obs_mode:
            assert td["state"].shape == (STATE_DIM,)
            assert "observation" not in td.keys()
        assert "task" not in td.keys()
        assert td["success"].dtype == torch.bool
    finally:
        env.close()


@pytest.mark.parametrize("task", [0, 1])
def test_torchrl_reset_task_option_and_rollout(task):
    env = make_torchrl_env(obs_mode="state", episode_length=10)
    try:
        env.set_seed(0)
        env.reset(options={"task": task})
        assert env.base_env._env.task == task
        rollout = env.rollout(25, break_when_any_done=False)  # auto-resets draw random tasks
        assert rollout.shape == (25,)
        assert rollout["next", "truncated"].squeeze(-1).nonzero().flatten().tolist() == [9, 19]
        assert rollout["next", "reward"].shape == (25, 1)
        env.set_seed(1)
        tasks = []
        for _ in range(16):  # without options, every reset draws the task from the seeded env RNG
            env.reset()
            tasks.append(env.base_env._env.task)
        assert set(tasks) == {0, 1}
        env.set_seed(1)
        assert [(env.reset(), env.base_env._env.task)[1] for _ in range(16)] == tasks  # reproducible
    finally:
        env.close()


def test_step_before_reset_is_refused():
    env = SawyerTwoDrawersEnv(obs_mode="state")
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(4, dtype=np.float32))
