"""Offline datasets: generation, re-opening, resume after a kill, extension, and clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.collect import collect_dataset, is_failed_attempt, load_config, main, rollout_seed
from envs.dataset import DatasetError, open_dataset, progress_path
from envs.two_drawers import EnvConfig

REPO = Path(__file__).resolve().parents[2]


def _assert_same(a, b) -> None:
    for buf_a, buf_b in zip(a.buffers, b.buffers):
        for key, value in buf_a.items(include_nested=True, leaves_only=True):
            assert torch.equal(value, buf_b[key]), key


def test_tiny_pixel_dataset_roundtrip(tiny_pixel_dataset):
    ds = open_dataset(tiny_pixel_dataset.root)  # re-open from disk
    assert ds.num_tasks == 2 and ds.rollouts_per_task == 3 and ds.episode_length == 10
    meta = json.loads((ds.root / "metadata.json").read_text())
    assert meta["format_version"] == 1 and meta["env"]["image_size"] == 32
    for task, buf in enumerate(ds.buffers):
        assert buf.batch_size == torch.Size([3, 10])
        assert buf["pixels"].dtype == torch.uint8 and buf["pixels"].shape == (3, 10, 3, 32, 32)
        assert buf["state"].dtype == torch.float32 and buf["state"].shape == (3, 10, 6)
        assert buf["action"].shape == (3, 10, 4) and buf["action"].abs().max() <= 1.0
        assert (buf["task"] == task).all()
        assert torch.equal(buf["next", "reward"] > 0, buf["next", "success"])
        assert buf["next", "truncated"][:, -1].all() and not buf["next", "truncated"][:, :-1].any()
        assert buf["pixels"].float().std() > 10  # real images, not blank
        # rollouts differ (noise and random hand start)
        assert not torch.equal(buf["state"][0], buf["state"][1])


def test_state_dataset_scripted_success(tiny_state_dataset):
    for task, buf in enumerate(tiny_state_dataset.buffers):
        assert buf["next", "success"][:, -1].float().mean() >= 0.85
        other_opening = buf["state"][..., 4 + (1 - task)]
        assert other_opening.max() < 0.01  # the other drawer is never opened


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    env = EnvConfig(obs_mode="pixels", image_size=32, episode_length=20)
    root = tmp_path / "killed"
    cmd = [sys.executable, "-m", "envs.collect", f"root={root}", "rollouts_per_task=12", "workers=1",
           "preview=false", "env.obs_mode=pixels", "env.image_size=32", "env.episode_length=20"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    progress = progress_path(root, 12)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and (root / "metadata.json").exists():
            done = int(np.load(progress).sum())
            if done >= 3:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 24, f"kill landed at {done} finished rollouts"
    with pytest.raises(DatasetError, match="incomplete"):
        open_dataset(root)
    resumed = collect_dataset(root, env, rollouts_per_task=12, workers=1, progress=False)
    fresh = collect_dataset(tmp_path / "fresh", env, rollouts_per_task=12, workers=0, progress=False)
    _assert_same(resumed, fresh)


def test_extend_keeps_rollouts_and_refuses_other_params(tmp_path):
    env = EnvConfig(obs_mode="state", episode_length=15)
    small = collect_dataset(tmp_path / "ds", env, rollouts_per_task=2, progress=False)
    first = small.buffers[0]["state"].clone()
    big = collect_dataset(tmp_path / "ds", env, rollouts_per_task=4, progress=False)
    assert big.rollouts_per_task == 4 and torch.equal(big.buffers[0]["state"][:2], first)
    _assert_same(big, collect_dataset(tmp_path / "fresh", env, rollouts_per_task=4, progress=False))
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["checksums_n4.npy", "metadata.json", "progress_n4.npy",
                                                             "task_0_n4", "task_1_n4"]

    before = (tmp_path / "ds" / "metadata.json").read_text()
    with pytest.raises(DatasetError, match="other parameters"):
        collect_dataset(tmp_path / "ds", EnvConfig(obs_mode="state", episode_length=20), rollouts_per_task=6, progress=False)
    with pytest.raises(DatasetError, match="other parameters"):
        collect_dataset(tmp_path / "ds", env, rollouts_per_task=6, seed=1, progress=False)
    with pytest.raises(DatasetError, match="other parameters"):
        collect_dataset(tmp_path / "ds", env, rollouts_per_task=6, fail_fraction=0.5, progress=False)
    assert (tmp_path / "ds" / "metadata.json").read_text() == before
    _assert_same(open_dataset(tmp_path / "ds"), big)


def test_failed_attempts_open_nothing_and_leave_the_other_rollouts_unchanged(tmp_path):
    """``fail_fraction``: the drawn share of rollouts pull above the handle (no reward, every drawer shut, real
    physics); every other rollout is the one collected without the option; the metadata keeps the share."""
    env = EnvConfig(obs_mode="state", episode_length=40)
    plain = collect_dataset(tmp_path / "plain", env, rollouts_per_task=8, progress=False)
    mixed = collect_dataset(tmp_path / "mixed", env, rollouts_per_task=8, fail_fraction=0.5, progress=False)
    assert mixed.metadata.fail_fraction == 0.5 and plain.metadata.fail_fraction == 0.0
    assert "fail_fraction" not in json.loads((tmp_path / "plain" / "metadata.json").read_text())  # as before the option
    failed = 0
    for task in range(2):
        for index in range(8):
            is_failed = is_failed_attempt(rollout_seed(0, task, index), 0.5)
            got, ref = mixed.buffers[task][index], plain.buffers[task][index]
            if is_failed:
                failed += 1
                assert got["next", "reward"].sum() == 0 and not got["next", "success"].any()
                openings = got["state"][:, -2:]  # the drawers' openings end the state vector
                assert openings.abs().max() < 0.01, openings.abs().max()
            else:
                assert torch.equal(got["action"], ref["action"]) and torch.equal(got["state"], ref["state"])
    assert 3 <= failed <= 13  # a share of about one half of the 16 rollouts
    assert not any(is_failed_attempt(rollout_seed(0, 0, i), 0.0) for i in range(100))
    with pytest.raises(ValueError, match="fail_fraction"):
        collect_dataset(tmp_path / "bad", env, rollouts_per_task=1, fail_fraction=1.5, progress=False)


def test_corrupt_and_missing_datasets_are_named(tmp_path, tiny_state_dataset):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="metadata.json is missing"):
        open_dataset(tmp_path / "empty")

    env = EnvConfig(obs_mode="state", episode_length=5)
    root = tmp_path / "ds"
    collect_dataset(root, env, rollouts_per_task=1, progress=False)
    meta = root / "metadata.json"
    good = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(DatasetError, match="corrupt dataset metadata"):
        open_dataset(root)
    meta.write_text(good.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(DatasetError, match="format_version 99"):
        open_dataset(root)
    meta.write_text(good)
    (root / "task_1_n1" / "state.memmap").unlink()
    with pytest.raises(DatasetError, match="task_1_n1"):
        open_dataset(root)


def test_collect_cli_errors_name_the_problem(tmp_path, capsys):
    assert main([f"root={tmp_path / 'a'}", "rollout_per_task=3"]) == 2
    assert "rollout_per_task" in capsys.readouterr().err
    assert main([f"root={tmp_path / 'b'}", "env.obs_mode=depth"]) == 2
    assert "obs_mode" in capsys.readouterr().err
    assert main([f"root={tmp_path / 'c'}", "env.colour=red"]) == 2
    assert "colour" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "b").exists() or not (tmp_path / "b" / "metadata.json").exists()


def test_shipped_collection_configs_parse():
    for path in sorted((REPO / "configs" / "collect").glob("*.yaml")):
        config = load_config(str(path), [])
        EnvConfig.from_dict(config.env)


def test_tiled_lockstep_collection_matches_per_env_rendering(tmp_path):
    env = EnvConfig(obs_mode="pixels_state", image_size=32, episode_length=12)
    single = collect_dataset(tmp_path / "single", env, rollouts_per_task=4, progress=False)
    tiled = collect_dataset(tmp_path / "tiled", env, rollouts_per_task=4, envs_per_worker=3, progress=False)
    for a, b in zip(single.buffers, tiled.buffers):
        for key in ("state", "action", ("next", "reward"), ("next", "success"), "task"):
            assert torch.equal(a[key], b[key]), key
        diff = (a["pixels"].int() - b["pixels"].int()).abs()
        assert diff.float().mean() <= 0.5 and (diff > 0).float().mean() <= 0.01
