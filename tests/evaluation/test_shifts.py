"""Deployment shifts: the env's hand offset, action / observation noise in the loop, the --shift CLI option and the
robustness suite's table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from envs.scripted import DrawerOpener
from envs.two_drawers import EnvConfig, SawyerTwoDrawersEnv
from lightning_modules.evaluation.runner import TrialRunner
from lightning_modules.evaluation.shifts import NOMINAL, SHIFTS, get_shift
from lightning_modules.filter.belief_filter import BeliefFilter
from helpers import SMALL_FILTER

STATE_ENV = EnvConfig(obs_mode="state", episode_length=40)


def test_hand_offset_moves_the_start_and_keeps_the_nominal_stream():
    nominal = SawyerTwoDrawersEnv(STATE_ENV)
    shifted = SawyerTwoDrawersEnv(SHIFTS["hand_start"].env_config(STATE_ENV))
    distances = []
    for seed in range(8):
        nominal.reset(seed=seed, options={"task": 0})
        shifted.reset(seed=seed, options={"task": 0})
        distances.append(np.linalg.norm(shifted.data.mocap_pos[0][:2] - nominal.data.mocap_pos[0][:2]))
    # the same jitter plus a 4 cm horizontal offset beyond the data's (none here): 4 cm from the nominal start
    assert np.allclose(distances, 0.04, atol=2e-3), distances
    # hand_offset (0, 0) draws nothing extra: a default env reproduces the datasets' start positions
    again = SawyerTwoDrawersEnv(EnvConfig(obs_mode="state", episode_length=40, hand_offset=(0.0, 0.0)))
    again.reset(seed=3, options={"task": 0})
    nominal.reset(seed=3, options={"task": 0})
    np.testing.assert_array_equal(again.data.mocap_pos[0], nominal.data.mocap_pos[0])
    for env in (nominal, shifted, again):
        env.close()


def test_hand_offset_area_law_puts_more_starts_at_the_rim():
    """``hand_offset_law="area"``: uniform over the ring's area (median distance r_max / sqrt(2), 59% beyond 2/3 of
    r_max vs 33% with the default law), the same number of draws (the angle stream is the default law's), and left
    out of the metadata at its default."""
    config = dict(obs_mode="state", episode_length=40, hand_offset=(0.0, 0.06), hand_jitter=0.0)
    starts = {}
    for law in ("distance", "area"):
        env = SawyerTwoDrawersEnv(EnvConfig(**config, hand_offset_law=law))
        offsets = []
        for seed in range(200):
            env.reset(seed=seed, options={"task": 0})
            offsets.append(env.data.mocap_pos[0][:2] - np.asarray(env.config.hand_init[:2]))
        starts[law] = np.array(offsets)
        env.close()
    distance = {law: np.linalg.norm(xy, axis=1) for law, xy in starts.items()}
    assert distance["area"].max() <= 0.06 + 1e-6
    assert np.mean(distance["distance"] > 0.04) < 0.42 < np.mean(distance["area"] > 0.04)
    assert np.median(distance["area"]) == pytest.approx(0.06 / np.sqrt(2), abs=0.006)
    angle = {law: np.arctan2(xy[:, 1], xy[:, 0]) for law, xy in starts.items()}
    np.testing.assert_allclose(angle["area"], angle["distance"], atol=1e-6)
    assert "hand_offset_law" not in EnvConfig().to_dict()
    assert EnvConfig.from_dict(EnvConfig(hand_offset_law="area").to_dict()).hand_offset_law == "area"
    with pytest.raises(ValueError, match="hand_offset_law"):
        EnvConfig(hand_offset_law="gaussian")


def test_shift_registry_and_env_changes():
    assert NOMINAL in SHIFTS and SHIFTS[NOMINAL].env_config(STATE_ENV) == STATE_ENV
    slow = SHIFTS["slow_arm"].env_config(STATE_ENV)
    assert slow.action_scale == pytest.approx(0.75 * STATE_ENV.action_scale) and slow.obs_mode == "state"
    wide = EnvConfig(obs_mode="state", hand_offset=(0.0, 0.1), action_scale_jitter=0.3)  # data with varied starts
    assert SHIFTS["hand_start"].env_config(wide).hand_offset == pytest.approx((0.14, 0.14))  # beyond the data's
    for base in (STATE_ENV, wide):  # fixed poses, whatever the data covered
        assert SHIFTS["hand_start_10cm"].env_config(base).hand_offset == pytest.approx((0.10, 0.10))
        assert SHIFTS["hand_start_14cm"].env_config(base).hand_offset == pytest.approx((0.14, 0.14))
    assert SHIFTS["slow_arm"].env_config(wide).action_scale_jitter == 0.0
    with pytest.raises(ValueError, match="hand_offset"):
        EnvConfig(hand_offset=(0.1, 0.0))
    with pytest.raises(ValueError, match="unknown shift 'gravity'"):
        get_shift("gravity")
    with pytest.raises(ValueError, match="pixels"):
        get_shift("obs_noise", ["pixels"])


def test_image_shifts_change_the_frames_not_the_physics():
    """lighting / colours / camera: other pixels, the same state; the appearance stays out of the metadata at
    Metaworld's values (datasets made before these fields existed are described exactly as before)."""
    base = EnvConfig(obs_mode="pixels_state", image_size=32, episode_length=5)
    assert "light_scale" not in base.to_dict()["scene"] and "tint" not in base.to_dict()["scene"]
    nominal = SawyerTwoDrawersEnv(base)
    obs0, _ = nominal.reset(seed=4, options={"task": 1})
    for name in ("lighting", "colours", "camera"):
        cfg = SHIFTS[name].env_config(base)
        assert EnvConfig.from_dict(cfg.to_dict()) == cfg and cfg != base
        env = SawyerTwoDrawersEnv(cfg)
        obs, _ = env.reset(seed=4, options={"task": 1})
        np.testing.assert_array_equal(obs["state"], obs0["state"])
        diff = np.abs(obs["pixels"].astype(float) - obs0["pixels"].astype(float)).mean()
        assert 2.0 < diff < 60.0, (name, diff)  # visibly changed, not destroyed
        env.close()
    nominal.close()
    assert SHIFTS["lighting"].env_config(base).scene.light_scale == 0.6
    with pytest.raises(ValueError, match="changes the images"):
        get_shift("camera", ["state"])


def _opener_policy(runner):
    def policy(belief: torch.Tensor) -> torch.Tensor:
        envs = runner.envs[: belief.shape[0]]
        return torch.from_numpy(np.stack([DrawerOpener(env.task, noise_std=0.0).clean_action(env) for env in envs]))
    return policy


def test_action_and_obs_noise_perturb_the_loop_reproducibly():
    torch.manual_seed(0)
    filt = BeliefFilter(obs_keys=["state"], **SMALL_FILTER).eval()
    outs = {}
    for name, kw in {"clean": {}, "noisy": dict(action_noise=0.5, obs_noise=0.01)}.items():
        for repeat in range(2):
            runner = TrialRunner(STATE_ENV, num_envs=2, **kw)
            result = runner.run(filt, _opener_policy(runner), trials=2, episodes=1, seed=4, record=True)
            runner.close()
            outs[name, repeat] = result
    clean, noisy = outs["clean", 0].recorded["state"], outs["noisy", 0].recorded["state"]
    assert not torch.allclose(clean, noisy)  # noise moved the arm and the observation
    torch.testing.assert_close(outs["noisy", 1].recorded["state"], noisy)  # same seed, same noise
    # the clean scripted opener succeeds; the filter was fed the commanded (not the executed) actions
    assert all(t["success"] == [True] for t in outs["clean", 0].trials)
    with pytest.raises(ValueError, match="action_noise"):
        TrialRunner(STATE_ENV, num_envs=1, action_noise=-1.0)


def test_evaluate_shift_option_and_robustness_suite(phase2_ckpt, tmp_path):
    from lightning_modules.evaluate import main as evaluate
    from lightning_modules.robustness import main as robustness

    out = tmp_path / "shifted.json"
    assert evaluate(["--checkpoint", str(phase2_ckpt), "--trials", "2", "--episodes", "1", "--out", str(out),
                     "--shift", "hand_start"]) == 0
    data = json.loads(out.read_text())
    farthest = torch.load(phase2_ckpt, map_location="cpu", weights_only=True)["env_config"]["hand_offset"][1]
    assert data["shift"]["name"] == "hand_start"  # 4 cm beyond the data's farthest start, in every trial
    assert data["env_config"]["hand_offset"] == pytest.approx([farthest + 0.04] * 2)
    with pytest.raises(SystemExit):  # argparse: not a known shift
        evaluate(["--checkpoint", str(phase2_ckpt), "--out", str(out), "--shift", "gravity"])

    folder = tmp_path / "rob"
    assert robustness(["--checkpoints", str(phase2_ckpt), str(phase2_ckpt), "--trials", "2", "--episodes", "2",
                       "--shifts", "none", "action_noise", "--out", str(folder)]) == 0
    table = (folder / "robustness.md").read_text()
    assert "| none |" in table and "| action_noise |" in table and "episode 2" in table
    rows = json.loads((folder / "robustness.json").read_text())["rows"]
    assert [r["shift"] for r in rows] == ["none", "action_noise"]
    assert rows[0]["per_checkpoint"][0] == rows[0]["per_checkpoint"][1]  # the same checkpoint, the same trials
    assert robustness(["--checkpoints", str(tmp_path / "missing.ckpt"), "--out", str(folder)]) == 2
