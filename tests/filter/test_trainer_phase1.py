"""Phase 1 (the filter) as users run it: ``lightning fit --config configs/filter_quickstart.yaml`` with bf16-mixed,
two DDP processes, exact checkpoint-resume, NaN guards, config-key errors, the progress bar and TensorBoard.

Every CLI run is the real console script (``lightning``, as installed next to this interpreter) on the quickstart
config with tiny overrides, over the shared pre-collected state dataset (``tiny_state_dataset``: 2 tasks x 8
rollouts x 40 steps, the config's episode length), so no run collects data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO as ROOT  # noqa: E402
from helpers import assert_ok, assert_same_core_state, load_ckpt, scalars  # noqa: E402
from helpers import cpu_trainer as _trainer  # noqa: E402
from helpers import run_lightning as lightning  # noqa: E402
from helpers import tiny_datamodule as _datamodule  # noqa: E402

QUICKSTART = ROOT / "configs" / "filter_quickstart.yaml"
SMALL = dict(deter_dim=16, stoch_dim=8, hidden_dim=16, mlp_hidden=16, state_embed_dim=16, reward_embed_dim=8)
# what the resume runs add to the quickstart config: a checkpoint every 3 steps (all kept, and last.ckpt),
# and an optimiser + LR scheduler from the CLI, so that resuming must also restore the scheduler's state
RESUME_OVERLAY = """\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 3
        save_top_k: -1
        save_last: true
        enable_version_counter: false
        filename: "{step}"
optimizer:
  class_path: torch.optim.Adam
  init_args:
    lr: 1.0e-3
    eps: 1.0e-5
lr_scheduler:
  class_path: torch.optim.lr_scheduler.ExponentialLR
  init_args:
    gamma: 0.5
"""


# ---------------------------------------------------------------------- the quickstart config, shrunk
def tiny(dataset, save_dir: Path, max_steps: int) -> list[str]:
    """Overrides of the quickstart config: the fixture dataset, 2 batches of 2 per epoch, a tiny model."""
    return [
        f"--data.init_args.root={dataset.root}", f"--data.init_args.rollouts_per_task={dataset.rollouts_per_task}",
        "--data.init_args.batch_size=2", "--data.init_args.num_segments=2", "--data.init_args.batches_per_epoch=2",
        "--data.init_args.val_batches=1",
        *(f"--model.init_args.{k}={v}" for k, v in SMALL.items()),
        f"--trainer.max_steps={max_steps}", "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]


def run_dirs(save_dir: Path) -> list[Path]:
    """The TensorBoardLogger version directories under ``save_dir`` (oldest first)."""
    return sorted((save_dir / "filter_quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def assert_trained(ckpt: dict, steps: int) -> None:
    assert ckpt["global_step"] == steps
    assert ckpt["MetaExplorationDataModule"]["position"] == steps  # the sampler stream: one batch per step
    assert bool(ckpt["state_dict"]["filter.state_stats_ready"])
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------- precision and DDP
def test_bf16_mixed(tmp_path, tiny_state_dataset):
    result = lightning("fit", "--config", str(QUICKSTART), *tiny(tiny_state_dataset, tmp_path, 4),
                       "--trainer.precision=bf16-mixed")
    assert_ok(result)
    [run] = run_dirs(tmp_path)
    assert "precision: bf16-mixed" in (run / "config.yaml").read_text()
    assert_trained(load_ckpt(run / "checkpoints" / "last.ckpt"), 4)
    assert [e.step for e in scalars(run).Scalars("train/loss")] == [0, 1, 2, 3]


def test_ddp_two_cpu_processes(tmp_path, tiny_state_dataset):
    """``--trainer.devices 2 --trainer.strategy ddp`` on CPU: Lightning launches the second process itself (gloo)."""
    result = lightning("fit", "--config", str(QUICKSTART), *tiny(tiny_state_dataset, tmp_path, 4),
                       "--trainer.devices=2", "--trainer.strategy=ddp")
    assert_ok(result)
    log = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "distributed_backend=gloo" in log
    [run] = run_dirs(tmp_path)
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert_trained(ckpt, 4)
    assert ckpt["hyper_parameters"]["obs_keys"] == ["state"]


# ---------------------------------------------------------------------- checkpoint-resume
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_state_dataset):
    """An uninterrupted 6-step run (checkpoints at steps 3 and 6) with the resume overlay."""
    tmp = tmp_path_factory.mktemp("full_run")
    overlay = tmp / "resume_overlay.yaml"
    overlay.write_text(RESUME_OVERLAY)
    save_dir = tmp / "runs"
    result = lightning("fit", "--config", str(QUICKSTART), "--config", str(overlay),
                       *tiny(tiny_state_dataset, save_dir, 6))
    assert_ok(result)
    [run] = run_dirs(save_dir)
    return dict(result=result, run=run, overlay=overlay, save_dir=save_dir)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Parameters, buffers, optimiser and scheduler states, step counters and the sampler stream agree."""
    assert_same_core_state(a, b)
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["lr_schedulers"][0]["last_epoch"] > 0


def test_resume_continues_exactly(tmp_path, full_run, tiny_state_dataset):
    """Stopped at step 3, resumed from <run>/config.yaml + last.ckpt to step 6: the uninterrupted run's state.

    Also resuming the uninterrupted run's own step-3 checkpoint (a run killed after it) with its config.yaml.
    """
    full = full_run["run"]
    reference = load_ckpt(full / "checkpoints" / "last.ckpt")
    assert_trained(reference, 6)
    assert reference["lr_schedulers"][0]["last_epoch"] == 3  # one ExponentialLR step per 2-batch epoch

    # a run stopped halfway: same command, stopped at step 3
    save_dir = tmp_path / "runs"
    result = lightning("fit", "--config", str(QUICKSTART), "--config", str(full_run["overlay"]),
                       *tiny(tiny_state_dataset, save_dir, 3))
    assert_ok(result)
    [stopped] = run_dirs(save_dir)
    halfway = load_ckpt(stopped / "checkpoints" / "last.ckpt")
    assert_trained(halfway, 3)
    assert_same_training_state(load_ckpt(full / "checkpoints" / "step=3.ckpt"), halfway)

    # resume it with its saved config (max_steps raised to the full run's)
    result = lightning("fit", "--config", str(stopped / "config.yaml"),
                       "--ckpt_path", str(stopped / "checkpoints" / "last.ckpt"), "--trainer.max_steps=6")
    assert_ok(result)
    assert run_dirs(save_dir) == [stopped]  # it continues in its own run folder
    assert_same_training_state(reference, load_ckpt(stopped / "checkpoints" / "last.ckpt"))
    # TensorBoard: steps 0..2 from the first run, 3..5 from the resumed one, each once
    assert [e.step for e in scalars(stopped).Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]

    # a run killed after its step-3 checkpoint (its events go on to step 5), resumed with its own config.yaml
    for later in ("last.ckpt", "step=6.ckpt"):  # written after the kill in the uninterrupted run
        (full / "checkpoints" / later).unlink()
    result = lightning("fit", "--config", str(full / "config.yaml"),
                       "--ckpt_path", str(full / "checkpoints" / "step=3.ckpt"))
    assert_ok(result)
    assert run_dirs(full_run["save_dir"]) == [full]
    assert_same_training_state(reference, load_ckpt(full / "checkpoints" / "last.ckpt"))
    # the events the killed run logged after its checkpoint are dropped: each step once
    assert [e.step for e in scalars(full).Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------- NaN guard
def test_check_finite_names_every_bad_term():
    from lightning_modules.guards import check_finite

    check_finite({"a": torch.tensor(1.0), "b": torch.zeros(3)}, step=0)
    check_finite({}, step=0)
    with pytest.raises(FloatingPointError) as info:
        check_finite({"train/loss": torch.tensor(float("nan")), "losses/kl": torch.tensor(float("inf")),
                      "losses/obs_nll": torch.tensor(2.0), "v": torch.tensor([1.0, float("-inf")])}, step=12)
    assert str(info.value) == ("non-finite loss term(s) at step 12: train/loss=nan, losses/kl=inf, "
                               "v=1 of 2 non-finite")


def test_nan_reward_stops_the_run_naming_the_terms(tmp_path, tiny_state_dataset):
    """A NaN reward in the third training batch: the run stops at step 2, before the weights see it."""
    from datamodules import MetaExplorationDataModule
    from lightning_modules.filter.module import VariationalFilterModule

    class NaNRewardData(MetaExplorationDataModule):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            if self.trainer.training and self.trainer.global_step == 2:
                batch["next", "reward"][0, 5] = float("nan")
            return batch

    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["state"], **SMALL)
    trainer = _trainer(tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss term\(s\) at step 2: ") as info:
        trainer.fit(model, _datamodule(tiny_state_dataset, cls=NaNRewardData))
    message = str(info.value)
    assert "train/loss=nan" in message and "losses/reward_nll=nan" in message, message
    # the input that caused it: field, and the source task / rollout / step of that batch position
    assert "input ('next', 'reward') is non-finite at batch row 0, position 5 (task " in message, message
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_single_non_finite_term_is_named(tmp_path, tiny_state_dataset, monkeypatch):
    from lightning_modules.filter.module import VariationalFilterModule

    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["state"], **SMALL)
    compute = model.compute_losses

    def kl_blows_up(batch, sample=True, **kwargs):
        loss, info = compute(batch, sample, **kwargs)
        if model.global_step == 1:
            info["terms"]["kl"] = info["terms"]["kl"] * float("inf")
        return loss, info

    monkeypatch.setattr(model, "compute_losses", kl_blows_up)
    trainer = _trainer(tmp_path)
    with pytest.raises(FloatingPointError, match=r"^non-finite loss term\(s\) at step 1: losses/kl=inf$"):
        trainer.fit(model, _datamodule(tiny_state_dataset))


# ---------------------------------------------------------------------- config errors
def test_wrong_key_on_the_command_line_is_named():
    result = lightning("fit", "--config", str(QUICKSTART), "--model.init_args.no_such_key", "1", timeout=120)
    assert result.returncode != 0
    assert "no_such_key" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("typo", [("    beta: 1000.0 ", "    bta: 1000.0 ", "bta"),
                                  ("\n  max_steps:", "\n  max_step:", "max_step")],
                         ids=["model", "trainer"])
def test_typo_in_a_yaml_config_is_named(tmp_path, typo):
    right, wrong, key = typo
    text = QUICKSTART.read_text()
    assert text.count(right) == 1
    config = tmp_path / "typo.yaml"
    config.write_text(text.replace(right, wrong))
    shutil.copytree(QUICKSTART.parent / "data", tmp_path / "data")  # the data block it names, relative to it
    result = lightning("fit", "--config", str(config), timeout=120)
    assert result.returncode != 0
    assert f"'{key}'" in result.stderr or f".{key}'" in result.stderr, result.stderr[-3000:]


# ---------------------------------------------------------------------- progress bar and TensorBoard
def test_progress_bar_shows_key_metrics_without_a_tty(full_run):
    """Lightning's RichProgressBar (the default with rich installed) renders to a pipe and shows the metrics."""
    out = full_run["result"].stdout
    assert "━" in out, out[-2000:]  # rich's bar
    for key in ("train/loss", "train/elbo", "val/loss"):
        assert f"{key}:" in out, (key, out[-2000:])


def test_tensorboard_hparams_and_namespaced_scalars(full_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = scalars(full_run["run"])
    tags = set(events.Tags()["scalars"])
    for namespace in ("train/", "val/", "losses/"):
        assert any(t.startswith(namespace) for t in tags), (namespace, sorted(tags))
    assert {"train/loss", "train/elbo", "losses/kl", "losses/obs_nll", "val/loss", "val/elbo", "hp/val_loss"} <= tags
    assert "hp_metric" not in tags  # default_hp_metric: false
    content = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"hp/val_loss", "hp/probe_acc_memory"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = dict(start.hparams)
    for name in ("lr", "beta", "deter_dim", "batch_size", "num_segments", "mode"):  # model and data
        assert name in hparams, (name, sorted(hparams))
    assert hparams["deter_dim"].number_value == SMALL["deter_dim"]
    # the HParams metric has real values after the first validation (a NaN placeholder at step 0)
    values = [e.value for e in events.Scalars("hp/val_loss") if e.step > 0]
    assert values and all(torch.isfinite(torch.tensor(values)))
