"""Phase 2 (CQL on beliefs) as users run it: ``lightning fit --config configs/cql_quickstart.yaml`` with bf16-mixed,
two DDP processes (evaluation on rank 0 only), exact checkpoint-resume (RNG, belief cache, normaliser), NaN guards,
config errors (missing filter checkpoint, wrong keys) and TensorBoard namespaces.

Every CLI run is the real console script on the quickstart config with tiny overrides, over the shared
pre-collected state dataset (``tiny_state_dataset``) and a tiny filter checkpoint trained here in-process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO as ROOT  # noqa: E402
from helpers import assert_ok, assert_same_core_state, load_ckpt, scalars  # noqa: E402
from helpers import cpu_trainer as _trainer  # noqa: E402
from helpers import run_lightning as lightning  # noqa: E402
from helpers import tiny_datamodule as _datamodule  # noqa: E402

QUICKSTART = ROOT / "configs" / "cql_quickstart.yaml"
# a belief cache of 2 batches refreshed every 2 updates: the resume at step 3 falls between two refreshes
SMALL_CQL = dict(hidden_dim=16, num_random=2, transition_batch_size=16, belief_cache_batches=2, refresh_every=2)

EVAL_OVERLAY = """\
trainer:
  callbacks:
    - class_path: lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation
      init_args: {every_n_steps: 2, trials: 2, episodes: 1, seed: 0, video: false, plot: false}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: eval/success_mean, mode: max, every_n_train_steps: 2, save_top_k: 1, save_last: true,
                  filename: "best-{step}"}
"""
# DDP: ModelCheckpoint cannot monitor eval/* (rank 0 only); the callback saves best_eval.ckpt itself
DDP_OVERLAY = """\
trainer:
  callbacks:
    - class_path: lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation
      init_args: {every_n_steps: 2, trials: 2, episodes: 1, seed: 0, video: false, plot: false, save_best: true}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: null, every_n_train_steps: 2, save_top_k: 1, save_last: true, filename: "{step}"}
"""
# The learning-rate schedule spans lr_decay_steps (default: max_steps): fixed here, so that the run stopped at step 3
# by max_steps=3 follows the same schedule as the uninterrupted 6-step one.
RESUME_OVERLAY = """\
model:
  init_args: {lr_decay_steps: 6}
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: null, every_n_train_steps: 3, save_top_k: -1, save_last: true, filename: "{step}",
                  enable_version_counter: false}
"""


# ---------------------------------------------------------------------- the quickstart config, shrunk
def tiny(dataset, filter_path: Path, save_dir: Path, max_steps: int) -> list[str]:
    """Overrides of the quickstart config: the fixture dataset and filter, 2 batches of 2 per epoch, tiny nets."""
    return [
        f"--data.init_args.root={dataset.root}", f"--data.init_args.rollouts_per_task={dataset.rollouts_per_task}",
        f"--data.init_args.episode_length={dataset.env_config.episode_length}",
        "--data.init_args.batch_size=2", "--data.init_args.num_segments=2", "--data.init_args.batches_per_epoch=2",
        "--data.init_args.val_batches=1", "--trainer.check_val_every_n_epoch=1",
        f"--model.init_args.filter_checkpoint={filter_path}",
        *(f"--model.init_args.{k}={v}" for k, v in SMALL_CQL.items()),
        f"--trainer.max_steps={max_steps}", "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]


def run_dirs(save_dir: Path) -> list[Path]:
    return sorted((save_dir / "cql_quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def overlay(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def assert_trained(ckpt: dict, steps: int) -> None:
    assert ckpt["global_step"] == steps
    assert ckpt["MetaExplorationDataModule"]["position"] == steps  # one data batch per update
    assert bool(ckpt["state_dict"]["normalizer.ready"])
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------- precision, TensorBoard
@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_state_dataset, filter_ckpt):
    """A 4-step bf16-mixed run with the evaluation every 2 steps (also read for the TensorBoard checks)."""
    tmp = tmp_path_factory.mktemp("bf16")
    result = lightning("fit", "--config", str(QUICKSTART), "--config", str(overlay(tmp, "eval.yaml", EVAL_OVERLAY)),
                       *tiny(tiny_state_dataset, filter_ckpt, tmp / "runs", 4), "--trainer.precision=bf16-mixed")
    assert_ok(result)
    [run] = run_dirs(tmp / "runs")
    return run


def test_bf16_mixed(bf16_run):
    assert "precision: bf16-mixed" in (bf16_run / "config.yaml").read_text()
    ckpt = load_ckpt(bf16_run / "checkpoints" / "last.ckpt")
    assert_trained(ckpt, 4)
    assert ckpt["belief_cache"]["filled"] == 4  # 2 batches of 2 meta-trajectories
    assert list((bf16_run / "checkpoints").glob("best-step=*.ckpt"))
    assert [e.step for e in scalars(bf16_run).Scalars("losses/loss_qvalue")] == [0, 1, 2, 3]


def test_tensorboard_namespaces(bf16_run):
    tags = set(scalars(bf16_run).Tags()["scalars"])
    for namespace in ("train/", "losses/", "eval/", "val/"):
        assert any(t.startswith(namespace) for t in tags), (namespace, sorted(tags))
    assert {"train/loss", "train/q_data", "train/alpha", "losses/loss_qvalue", "losses/loss_cql", "losses/loss_actor",
            "losses/loss_alpha", "val/loss_qvalue", "eval/success_mean", "eval/success_ep1"} <= tags, sorted(tags)
    evaluations = json.loads((bf16_run / "eval_results.json").read_text())["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4]


# ---------------------------------------------------------------------- DDP
def test_ddp_two_cpu_processes(tmp_path, tiny_state_dataset, filter_ckpt):
    """Two gloo processes; the evaluation runs on rank 0 only (one JSON entry per evaluation, no hang)."""
    try:
        result = lightning("fit", "--config", str(QUICKSTART), "--config", str(overlay(tmp_path, "ddp.yaml", DDP_OVERLAY)),
                           *tiny(tiny_state_dataset, filter_ckpt, tmp_path / "runs", 4),
                           "--trainer.devices=2", "--trainer.strategy=ddp", timeout=150)
    except subprocess.TimeoutExpired as err:
        pytest.fail("the 2-process DDP run hung (a collective call made by one rank only, e.g. trainer.log_dir, which "
                    "broadcasts under DDP, called by the rank-0-only evaluation):\n"
                    + (err.stderr or b"")[-3000:].decode(errors="replace"))
    assert_ok(result)
    log = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "distributed_backend=gloo" in log
    [run] = run_dirs(tmp_path / "runs")
    assert_trained(load_ckpt(run / "checkpoints" / "last.ckpt"), 4)
    assert (run / "checkpoints" / "best_eval.ckpt").is_file()
    evaluations = json.loads((run / "eval_results.json").read_text())["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4]  # rank 0 alone wrote them


# ---------------------------------------------------------------------- checkpoint-resume
def assert_same_training_state(a: dict, b: dict) -> None:
    """Actor, critics, targets, normaliser, optimiser state, belief cache, RNG seed and the data stream agree."""
    assert_same_core_state(a, b)
    torch.testing.assert_close(b["belief_cache"], a["belief_cache"], rtol=0, atol=1e-6)


def test_resume_continues_exactly(tmp_path, tiny_state_dataset, filter_ckpt):
    """Stopped at step 3 (between two cache refreshes), resumed from <run>/config.yaml + last.ckpt to step 6:
    the uninterrupted 6-step run's state."""
    resume = overlay(tmp_path, "resume.yaml", RESUME_OVERLAY)
    full_dir, save_dir = tmp_path / "full", tmp_path / "runs"
    result = lightning("fit", "--config", str(QUICKSTART), "--config", str(resume),
                       *tiny(tiny_state_dataset, filter_ckpt, full_dir, 6))
    assert_ok(result)
    [full] = run_dirs(full_dir)
    reference = load_ckpt(full / "checkpoints" / "last.ckpt")
    assert_trained(reference, 6)
    actor = [k for k in reference["state_dict"] if k.startswith("loss_module.actor_network_params.")]
    target = [k for k in reference["state_dict"] if k.startswith("loss_module.target_qvalue_network_params.")]
    assert actor and target  # the parameters compared below include the actor and the target critics

    result = lightning("fit", "--config", str(QUICKSTART), "--config", str(resume),
                       *tiny(tiny_state_dataset, filter_ckpt, save_dir, 3))
    assert_ok(result)
    [stopped] = run_dirs(save_dir)
    halfway = load_ckpt(stopped / "checkpoints" / "last.ckpt")
    assert_trained(halfway, 3)
    assert_same_training_state(load_ckpt(full / "checkpoints" / "step=3.ckpt"), halfway)

    result = lightning("fit", "--config", str(stopped / "config.yaml"),
                       "--ckpt_path", str(stopped / "checkpoints" / "last.ckpt"), "--trainer.max_steps=6")
    assert_ok(result)
    assert run_dirs(save_dir) == [stopped]  # it continues in its own run folder
    assert_same_training_state(reference, load_ckpt(stopped / "checkpoints" / "last.ckpt"))
    assert [e.step for e in scalars(stopped).Scalars("losses/loss_qvalue")] == [0, 1, 2, 3, 4, 5]  # each step once


# ---------------------------------------------------------------------- NaN guard
def _model(filter_ckpt, **kw):
    from lightning_modules.cql.module import LatentCQLModule

    torch.manual_seed(0)
    return LatentCQLModule(str(filter_ckpt), **{**SMALL_CQL, **kw})


def test_nan_reward_stops_the_run_naming_the_term(tmp_path, tiny_state_dataset, filter_ckpt):
    """A NaN reward in the third batch (every transition used, no cache): the run stops at step 2 before backward."""
    from datamodules import MetaExplorationDataModule

    class NaNRewardData(MetaExplorationDataModule):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            if self.trainer.training and self.trainer.global_step == 2:
                batch["next", "reward"][0, 5] = float("nan")
            return batch

    model = _model(filter_ckpt, belief_cache_batches=0, transition_batch_size=None)
    trainer = _trainer(tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss term\(s\) at step 2: ") as info:
        trainer.fit(model, datamodule=_datamodule(tiny_state_dataset, cls=NaNRewardData))
    message = str(info.value)
    assert "train/loss=nan" in message and "losses/loss_qvalue=nan" in message, message
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("term", ["loss_actor", "loss_alpha"])
def test_single_non_finite_term_is_named(tmp_path, tiny_state_dataset, filter_ckpt, monkeypatch, term):
    model = _model(filter_ckpt)
    compute = model.compute_losses

    def blows_up(transitions):
        out = compute(transitions)
        if model.global_step == 1:
            out[term] = out[term] * float("nan")
        return out

    monkeypatch.setattr(model, "compute_losses", blows_up)
    with pytest.raises(FloatingPointError, match=rf"^non-finite loss term\(s\) at step 1: losses/{term}=nan$"):
        _trainer(tmp_path).fit(model, datamodule=_datamodule(tiny_state_dataset))


# ---------------------------------------------------------------------- config errors
def test_missing_filter_checkpoint_fails_first(tmp_path, tiny_state_dataset):
    missing = tmp_path / "no_phase1" / "last.ckpt"
    save_dir = tmp_path / "runs"
    result = lightning("fit", "--config", str(QUICKSTART), *tiny(tiny_state_dataset, missing, save_dir, 2), timeout=120)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "filter_checkpoint" in result.stderr, result.stderr[-3000:]
    assert not save_dir.exists()  # no run directory, no training


def test_wrong_keys_are_named(tmp_path, filter_ckpt):
    with_filter = ["--model.init_args.filter_checkpoint", str(filter_ckpt)]  # required: given, to isolate the typo
    result = lightning("fit", "--config", str(QUICKSTART), *with_filter, "--model.init_args.no_such_key", "1",
                       timeout=120)
    assert result.returncode != 0
    assert "no_such_key" in result.stderr, result.stderr[-3000:]
    text = QUICKSTART.read_text()
    right = "    refresh_every: 4"
    assert text.count(right) == 1
    config = tmp_path / "typo.yaml"
    config.write_text(text.replace(right, "    refresh_evry: 4"))
    shutil.copytree(QUICKSTART.parent / "data", tmp_path / "data")  # the data block it names, relative to it
    result = lightning("fit", "--config", str(config), *with_filter, timeout=120)
    assert result.returncode != 0
    assert "refresh_evry" in result.stderr, result.stderr[-3000:]
