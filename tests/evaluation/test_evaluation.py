"""Online evaluation: protocol (belief carried across episodes, reset across trials), alignment with the offline
layout, targets, the Lightning callback (logs, JSON, best checkpoint) and the standalone CLI."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning.pytorch as pl
from envs.scripted import DrawerOpener
from envs.two_drawers import EnvConfig
from envs.keys import obs_mode_for
from lightning_modules.callbacks.meta_rollout_evaluation import MetaRolloutEvaluation
from lightning_modules.evaluation.protocol import eval_env_config
from lightning_modules.evaluation.runner import TrialRunner, run_trials
from lightning_modules.filter.belief_filter import BeliefFilter

SMALL_FILTER = dict(deter_dim=32, stoch_dim=8, hidden_dim=32, mlp_hidden=32, state_embed_dim=32, reward_embed_dim=8)
STATE_ENV = EnvConfig(obs_mode="state", episode_length=40)


@pytest.fixture(scope="module")
def state_filter():
    torch.manual_seed(0)
    model = BeliefFilter(obs_keys=["state"], **SMALL_FILTER)
    # non-trivial state statistics, as after training
    model.rssm.state_mean.copy_(torch.tensor([0.0, 0.6, 0.15, 0.05, 0.02, 0.02]))
    model.rssm.state_std.copy_(torch.tensor([0.1, 0.1, 0.05, 0.02, 0.04, 0.04]))
    return model.eval()


@pytest.fixture(scope="module")
def runner():
    r = TrialRunner(STATE_ENV, num_envs=3)
    yield r
    r.close()


def scripted_policy(runner: TrialRunner):
    """Opens each env's target drawer (privileged), whatever the belief: makes rewards happen at episode ends."""
    def policy(belief: torch.Tensor) -> torch.Tensor:
        envs = runner.envs[: belief.shape[0]]
        return torch.from_numpy(np.stack([DrawerOpener(env.task, noise_std=0.0).clean_action(env) for env in envs]))
    return policy


# ---------------------------------------------------------------------- protocol
def test_online_beliefs_match_recorded_trial(state_filter, runner):
    episodes, T = 2, STATE_ENV.episode_length
    result = runner.run(state_filter, scripted_policy(runner), trials=3, episodes=episodes, seed=3, record=True)
    rec = result.recorded
    assert rec.batch_size == torch.Size([3, episodes * T])
    # the scripted opener succeeds, so the last reward of episode 1 is 1: the boundary is exercised
    assert (rec["next", "reward"][:, T - 1] == 1).all()
    assert all(t["success"] == [True] * episodes for t in result.trials)
    offline = state_filter.beliefs(rec)
    torch.testing.assert_close(result.beliefs, offline, atol=1e-5, rtol=1e-5)
    # the belief is carried across the episode boundary: a filter restarted at episode 2 disagrees with it
    second = rec[:, T:]
    assert not torch.allclose(state_filter.beliefs(second)[:, 0], result.beliefs[:, T], atol=1e-3)
    # and the check is sensitive to the reward alignment at the boundary (the layout bug it guards against)
    wrong = rec.clone()
    wrong["next", "reward"][:, T - 1] = 0.0
    moved = state_filter.beliefs(wrong)
    torch.testing.assert_close(moved[:, :T], offline[:, :T])
    assert not torch.allclose(moved[:, T], offline[:, T], atol=1e-4)
    # dataset layout fields
    assert rec["segment_start"][:, [0, T]].all() and rec["segment_start"].sum() == 3 * episodes
    assert (rec["segment"][:, T:] == 1).all() and (rec["task"] == rec["target_task"]).all()


def test_belief_reset_between_trials(state_filter, runner):
    """Trials are independent: one env playing them in sequence (the filter state re-initialised per trial) gives
    exactly what three envs in lockstep give."""
    policy = lambda b: torch.tanh(b[:, :4] * 3.0)  # noqa: E731 - a belief-dependent deterministic policy
    together = runner.run(state_filter, policy, trials=3, episodes=2, seed=5, record=True)
    single = TrialRunner(STATE_ENV, num_envs=1)
    try:
        one_by_one = single.run(state_filter, policy, trials=3, episodes=2, seed=5, record=True)
    finally:
        single.close()
    torch.testing.assert_close(one_by_one.beliefs, together.beliefs, atol=1e-5, rtol=1e-5)
    assert one_by_one.trials == together.trials
    torch.testing.assert_close(one_by_one.recorded["state"], together.recorded["state"])


def test_targets_vary_and_envs_follow_them(state_filter, runner):
    result = runner.run(state_filter, scripted_policy(runner), trials=9, episodes=1, seed=0)
    targets = [t["target"] for t in result.trials]
    assert set(targets) == {0, 1}
    assert result.summary["target_counts"] == [targets.count(0), targets.count(1)]
    # the opener of the drawed target succeeds in each trial: the env really ran that task
    assert result.summary["success_per_episode"] == [1.0]
    assert result.summary["wrong_drawer_open_per_episode"] == [0.0]
    # same seed, same trials
    again = runner.run(state_filter, scripted_policy(runner), trials=9, episodes=1, seed=0)
    assert [t["target"] for t in again.trials] == targets


def test_success_metrics_and_video(state_filter, runner):
    result = runner.run(state_filter, lambda b: torch.zeros(b.shape[0], 4), trials=2, episodes=2, seed=1,
                        success_metric="any", video=True)
    assert result.summary["success_metric"] == "any"
    assert result.summary["success_per_episode"] == [0.0, 0.0]
    video = result.video
    if video is not None:  # rendered from the env (state-only filter); None only when GL is unavailable
        assert video.dtype == torch.uint8 and video.shape == (1, 2 * STATE_ENV.episode_length, 3, 64, 64)
    with pytest.raises(ValueError, match="success_metric"):
        runner.run(state_filter, lambda b: b, trials=1, episodes=1, success_metric="first")


def test_eval_env_config(state_filter):
    assert obs_mode_for(["state"]) == "state" and obs_mode_for(["pixels", "state"]) == "pixels_state"
    cfg = eval_env_config(state_filter, EnvConfig(obs_mode="pixels_state", image_size=32, episode_length=10).to_dict())
    assert cfg.obs_mode == "state" and cfg.episode_length == 10
    pixel_filter = BeliefFilter(obs_keys=["pixels"], image_size=32, **SMALL_FILTER, cnn_depth=8)
    with pytest.raises(ValueError, match="image size"):
        eval_env_config(pixel_filter, EnvConfig(obs_mode="pixels", image_size=64))
    with pytest.raises(ValueError, match="no env parameters"):
        eval_env_config(state_filter, None)


def test_pixel_filter_online_matches_offline():
    """Pixels go to the filter channels-first uint8, as in the datasets."""
    torch.manual_seed(0)
    model = BeliefFilter(obs_keys=["pixels"], image_size=32, **SMALL_FILTER, cnn_depth=8).eval()
    cfg = EnvConfig(obs_mode="pixels", image_size=32, episode_length=6)
    r = TrialRunner(cfg, num_envs=2)
    try:
        result = r.run(model, lambda b: torch.tanh(b[:, :4]), trials=2, episodes=2, seed=0, record=True, video=True)
    finally:
        r.close()
    assert result.recorded["pixels"].shape == (2, 12, 3, 32, 32) and result.recorded["pixels"].dtype == torch.uint8
    torch.testing.assert_close(result.beliefs, model.beliefs(result.recorded), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.video[0], result.recorded["pixels"][0])


# ---------------------------------------------------------------------- callback and CLI
def _datamodule(dataset):
    from datamodules import MetaExplorationDataModule

    env = dataset.env_config
    return MetaExplorationDataModule(root=str(dataset.root), obs_mode=env.obs_mode, image_size=env.image_size,
                                     episode_length=env.episode_length, rollouts_per_task=dataset.rollouts_per_task,
                                     num_segments=2, batch_size=4, batches_per_epoch=4, val_batches=1)


@pytest.fixture(scope="module")
def trained_run(tiny_state_dataset, tmp_path_factory):
    """A 4-step phase-2 fit with the evaluation every 2 steps, TensorBoard and a best-by-eval checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_modules.cql.module import LatentCQLModule

    tmp = tmp_path_factory.mktemp("cql_run")
    torch.manual_seed(0)
    filt = BeliefFilter(obs_keys=["state"], **SMALL_FILTER)  # a phase-1 checkpoint: the filter's spec and weights
    torch.save({"belief_filter": filt.spec(), "state_dict": {f"filter.{k}": v for k, v in filt.state_dict().items()}},
               tmp / "filter.ckpt")
    model = LatentCQLModule(str(tmp / "filter.ckpt"), hidden_dim=32, transition_batch_size=64, num_random=4)
    evaluation = MetaRolloutEvaluation(every_n_steps=2, trials=3, episodes=2, seed=0, video=True, save_best=True)
    ckpt = ModelCheckpoint(monitor="eval/success_last", mode="max", every_n_train_steps=2, save_top_k=1,
                           save_last=True, filename="best-{step}")
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp), name="cql"),
                         callbacks=[evaluation, ckpt], enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp))
    trainer.fit(model, datamodule=_datamodule(tiny_state_dataset))
    return types.SimpleNamespace(trainer=trainer, evaluation=evaluation, ckpt=ckpt, model=model, tmp=tmp)


def test_callback_logs_and_writes_json(trained_run):
    trainer, evaluation = trained_run.trainer, trained_run.evaluation
    path = Path(trainer.log_dir) / "eval_results.json"
    assert evaluation.results_path == path and path.is_file()
    data = json.loads(path.read_text())
    assert [e["step"] for e in data["evaluations"]] == [2, 3]  # every 2 steps, and at the end of fit
    entry = data["evaluations"][0]
    assert len(entry["trials"]) == 3 and entry["summary"]["episodes"] == 2
    assert set(entry["trials"][0]) >= {"target", "success", "success_any", "return", "wrong_drawer_open"}
    assert data["env_config"]["obs_mode"] == "state" and data["env_config"]["episode_length"] == 40
    assert not list(path.parent.glob("*.tmp"))
    for key in ("eval/success_ep1", "eval/success_ep2", "eval/success_last"):
        assert key in trainer.callback_metrics
    # best checkpoint by the evaluation metric (monitorable), and last.ckpt
    assert trained_run.ckpt.best_model_path.endswith("best-step=2.ckpt") and Path(trained_run.ckpt.best_model_path).is_file()
    assert Path(trained_run.ckpt.last_model_path).is_file()
    # the DDP-safe best checkpoint written by the callback itself (rank 0, no barrier)
    best = Path(trained_run.ckpt.dirpath) / "best_eval.ckpt"
    from lightning_modules.cql.module import LatentCQLModule

    assert best.is_file() and LatentCQLModule.load_phase2(best).env_config["obs_mode"] == "state"
    with pytest.raises(ValueError, match="best_metric"):
        MetaRolloutEvaluation(best_metric="eval/success_ep4", episodes=3)
    # figure and video went to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "eval/success_vs_episode" in tags["images"]
    assert "eval/success_ep1" in tags["scalars"]
    assert "eval/trial0" in tags["images"]  # add_video writes a GIF image summary


def test_resumed_run_keeps_earlier_evaluations(trained_run, tiny_state_dataset):
    """Resuming from the step-2 checkpoint into the same run directory: eval_results.json keeps the step-2 entry,
    drops the step-3 one of the abandoned continuation and appends the new evaluations."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_modules.cql.module import LatentCQLModule

    run_dir = Path(trained_run.trainer.log_dir)
    resume_from = Path(trained_run.ckpt.dirpath) / "best-step=2.ckpt"
    evaluation = MetaRolloutEvaluation(every_n_steps=2, trials=2, episodes=1, seed=0, video=False, plot=False)
    logger = TensorBoardLogger(str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=logger, callbacks=[evaluation],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    model = LatentCQLModule(str(trained_run.tmp / "filter.ckpt"), hidden_dim=32, transition_batch_size=64, num_random=4)
    trainer.fit(model, datamodule=_datamodule(tiny_state_dataset), ckpt_path=str(resume_from))
    data = json.loads((run_dir / "eval_results.json").read_text())
    assert [e["step"] for e in data["evaluations"]] == [2, 4]
    assert len(data["evaluations"][0]["trials"]) == 3 and len(data["evaluations"][1]["trials"]) == 2


def test_evaluate_cli(trained_run, tmp_path):
    from lightning_modules.evaluate import main

    out = tmp_path / "results.json"
    assert main(["--checkpoint", trained_run.ckpt.last_model_path, "--trials", "2", "--episodes", "2",
                 "--out", str(out), "--num-envs", "2"]) == 0
    data = json.loads(out.read_text())
    (entry,) = data["evaluations"]
    saved_step = torch.load(trained_run.ckpt.last_model_path, map_location="cpu", weights_only=False)["global_step"]
    assert entry["step"] == saved_step and len(entry["trials"]) == 2 and len(entry["summary"]["success_per_episode"]) == 2
    assert data["env_config"]["obs_mode"] == "state"


def test_run_trials_uses_stored_env_config(trained_run):
    from lightning_modules.cql.module import LatentCQLModule

    model = LatentCQLModule.load_phase2(trained_run.ckpt.last_model_path)
    result = run_trials(model, trials=2, episodes=1, record=True)
    torch.testing.assert_close(result.beliefs, model.filter.beliefs(result.recorded), atol=1e-5, rtol=1e-5)
    actions = model.act(result.beliefs.reshape(-1, result.beliefs.shape[-1])).reshape(2, -1, 4)
    torch.testing.assert_close(result.recorded["action"], actions)  # deterministic actions of the current belief


def test_other_ranks_skip_and_ddp_monitor_refused():
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = MetaRolloutEvaluation(every_n_steps=1, trials=1, episodes=1)
    fake = types.SimpleNamespace(global_rank=1, global_step=5, world_size=2,
                                 callbacks=[ModelCheckpoint(monitor="eval/success_last")])
    assert cb.evaluate(fake, pl_module=None) is None and cb._runner is None
    with pytest.raises(ValueError, match="save_best"):
        cb.setup(fake, None, "fit")
