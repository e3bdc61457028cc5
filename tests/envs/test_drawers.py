"""The N-drawer scene (``num_drawers`` = 2..4, ``SawyerDrawers-v0``): layout, API, scripted openers, rendering."""

from __future__ import annotations

import dataclasses
import warnings

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the env ids, selects EGL)
from envs import DRAWERS_ENV_ID
from envs.dataset import DatasetMetadata
from envs.scene import DRAWER_WIDTH, SceneConfig, drawer_prefixes
from envs.scripted import DrawerOpener
from envs.two_drawers import EnvConfig, state_dim

SIZE = 32
INFINITE_BOUNDS = r".*Box observation space (minimum|maximum) value is.*infinity"
# the 3-drawer preset's start (configs/collect/drawers3_state.yaml): centred; 50 steps (the preset has 60: slack)
PRESET = dict(num_drawers=3, hand_init=(0.0, 0.6, 0.2), episode_length=50)


# --------------------------------------------------------------------------- configuration
def test_two_drawers_is_the_paper_scene():
    cfg = EnvConfig()
    assert cfg.num_drawers == 2 and cfg.scene == SceneConfig() and cfg.scene.drawer_x == (-0.15, 0.15)
    assert drawer_prefixes(2) == ("left/", "right/")


@pytest.mark.parametrize("n", [3, 4])
def test_row_layout_fits_and_is_reachable(n):
    cfg = EnvConfig(num_drawers=n)
    xs = cfg.scene.drawer_x
    assert len(xs) == n and list(xs) == sorted(xs) and abs(sum(xs)) < 1e-9  # a centred row, left to right
    assert min(np.diff(xs)) > DRAWER_WIDTH  # the cases do not overlap
    assert cfg.mocap_low[0] < min(xs) and cfg.mocap_high[0] > max(xs)  # the hand reaches every handle


def test_layout_round_trips_through_metadata():
    cfg = EnvConfig(num_drawers=4, obs_mode="state")
    again = EnvConfig.from_dict(cfg.to_dict())
    assert again == cfg
    meta = DatasetMetadata(env=cfg, rollouts_per_task=1, seed=0, noise_std=0.3, num_tasks=4)
    assert DatasetMetadata.from_dict(meta.to_dict()) == meta


@pytest.mark.parametrize("n", [1, 5, 0])
def test_drawer_count_out_of_range_raises(n):
    with pytest.raises(ValueError, match="num_drawers"):
        EnvConfig(num_drawers=n)


def test_changing_the_count_of_a_laid_out_config_lays_it_out_again():
    import dataclasses

    four = dataclasses.replace(EnvConfig(num_drawers=3), num_drawers=4)
    assert four == EnvConfig(num_drawers=4)
    two = EnvConfig.from_dict({**four.to_dict(), "num_drawers": 2})
    assert two == EnvConfig() and "num_drawers" not in two.to_dict()  # two-drawer metadata as before the field


def test_hand_box_that_misses_the_outer_drawers_raises():
    with pytest.raises(ValueError, match="does not reach the outer drawers"):
        EnvConfig(num_drawers=4, mocap_low=(-0.3, 0.4, 0.05))


def test_scene_that_disagrees_with_the_count_raises():
    with pytest.raises(ValueError, match="drawer_x has 2 positions but env.num_drawers is 3"):
        EnvConfig(num_drawers=3, scene=SceneConfig(camera_fovy=50.0))


def test_metadata_task_count_must_match_drawers():
    meta = DatasetMetadata(env=EnvConfig(num_drawers=3), rollouts_per_task=1, seed=0, noise_std=0.3, num_tasks=3)
    data = meta.to_dict()
    data["num_tasks"] = 2
    with pytest.raises(ValueError, match="num_tasks=2 but env.num_drawers=3"):
        DatasetMetadata.from_dict(data)


# --------------------------------------------------------------------------- API
@pytest.mark.parametrize("obs_mode", ["state", "pixels"])
def test_gymnasium_check_env_three_drawers(obs_mode):
    env = gym.make(DRAWERS_ENV_ID, num_drawers=3, obs_mode=obs_mode, image_size=SIZE).unwrapped
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", message=INFINITE_BOUNDS)
            check_env(env, skip_render_check=False)
    finally:
        env.close()


@pytest.mark.parametrize("n", [3, 4])
def test_state_has_one_opening_per_drawer_and_tasks_cover_every_drawer(make_env, n):
    env = make_env(num_drawers=n)
    obs, info = env.reset(seed=0, options={"task": n - 1})
    assert obs["state"].shape == (state_dim(n),) == (4 + n,)
    assert info["task"] == n - 1 and info["opened"] == -1 and not info["success"]
    assert {f"opening_{i}" for i in range(n)} <= set(info)
    drawn = {env.reset(seed=s)[1]["task"] for s in range(60)}
    assert drawn == set(range(n))
    with pytest.raises(ValueError, match=f"tasks are 0 \\(drawer 0\\).*{n - 1} \\(drawer {n - 1}\\)"):
        env.reset(options={"task": n})


def test_opener_of_a_drawer_the_scene_lacks_raises(make_env):
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="unknown task 2 for this scene"):
        DrawerOpener(2)(env)


# --------------------------------------------------------------------------- scripted openers
@pytest.mark.parametrize("task", [0, 1, 2])
def test_scripted_openers_three_drawers(make_env, task):
    """Each opener opens its drawer (>= 9 of 10 at the default noise) and moves the others < 1 cm; the reward
    and ``opened`` say which one is open."""
    env = make_env(**PRESET)
    successes = 0
    for episode in range(10):
        policy = DrawerOpener(task, seed=episode)
        env.reset(seed=100 * task + episode, options={"task": task})
        others = []
        for _ in range(env.config.episode_length):
            _, reward, _, _, info = env.step(policy(env))
            assert reward == float(info["success"])
            others.append(np.delete(env.openings(), task).max())
        successes += info["success"]
        assert max(others) < 0.01 and not info["wrong_drawer_open"]
        assert info["opened"] == (task if info["success"] else info["opened"])
    assert successes >= 9, f"opener of drawer {task} of 3 succeeded {successes}/10"


def test_opening_another_drawer_pays_nothing_and_is_reported(make_env):
    env = make_env(**PRESET)
    policy = DrawerOpener(2, seed=0)
    env.reset(seed=3, options={"task": 0})
    rewards = []
    for _ in range(env.config.episode_length):
        _, reward, _, _, info = env.step(policy(env))
        rewards.append(reward)
    assert info["opened"] == 2 and info["wrong_drawer_open"] and sum(rewards) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("task", [0, 3])
def test_scripted_openers_reach_the_outer_drawers_of_four(make_env, task):
    env = make_env(num_drawers=4, hand_init=(0.0, 0.6, 0.2), episode_length=60)
    successes = 0
    for episode in range(5):
        policy = DrawerOpener(task, seed=episode)
        env.reset(seed=episode, options={"task": task})
        for _ in range(env.config.episode_length):
            _, _, _, _, info = env.step(policy(env))
        successes += info["success"]
    assert successes >= 4


# --------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("n", [3, 4])
def test_every_drawer_opening_is_visible(make_env, n):
    env = make_env("pixels", num_drawers=n)
    obs, _ = env.reset(seed=0)
    closed = obs["pixels"].astype(np.int16)
    frames = []
    for prefix in drawer_prefixes(n):
        env.reset(seed=0)
        env.data.qpos[env.model.joint(f"{prefix}goal_slidey").qposadr[0]] = -0.15
        mujoco.mj_forward(env.model, env.data)
        frames.append(env.render().astype(np.int16))
    for frame in frames:
        assert np.abs(frame - closed).mean() > 0.3  # the opening shows at 32 px
    for i in range(n):
        for j in range(i + 1, n):
            assert np.abs(frames[i] - frames[j]).mean() > 0.3  # and which drawer it is


def test_the_scene_compiles_once_and_every_env_gets_its_own_model():
    from envs.scene import _compiled_model, build_model

    cfg = SceneConfig.for_drawers(3)
    first = build_model(cfg)
    hits = _compiled_model.cache_info().hits
    second = build_model(cfg)
    assert _compiled_model.cache_info().hits == hits + 1  # the second env copies the compiled scene
    assert first is not second and first.nbody == second.nbody
    np.testing.assert_array_equal(first.body_pos, second.body_pos)
    first.geom_rgba[0, 0] = 0.123  # an env changing its model leaves the others' alone
    assert second.geom_rgba[0, 0] != pytest.approx(0.123)
    tinted = build_model(dataclasses.replace(cfg, tint=(1.0, 0.5, 0.5)))
    assert not np.allclose(tinted.mat_rgba, second.mat_rgba)  # another config is another compiled scene
