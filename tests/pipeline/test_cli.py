"""The ``lightning`` command: it starts, lists the subcommands and selects headless EGL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import lightning_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """Subprocess environment that can import the repo's packages even when it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run(command: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_help():
    result = run(lightning_command(), "--help")
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_fit_help_from_python_selects_egl():
    """``main()`` from Python (no console script needed); importing the CLI defaults MUJOCO_GL to egl."""
    env = _env()
    env.pop("MUJOCO_GL", None)
    env.pop("PYOPENGL_PLATFORM", None)
    code = (
        "import os, sys\n"
        "from lightning_modules.cli import main\n"
        "assert os.environ['MUJOCO_GL'] == 'egl' and os.environ['PYOPENGL_PLATFORM'] == 'egl', os.environ\n"
        "sys.argv = ['lightning', 'fit', '--help']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--data", "--trainer", "--config"):
        assert option in result.stdout


def test_run_dir_of_the_old_layout_names_the_new_class_path(tmp_path):
    """A config.yaml written before the lightning_modules/ packages existed: one line naming the new class path."""
    old = tmp_path / "config.yaml"
    old.write_text((ROOT / "configs" / "filter_quickstart.yaml").read_text().replace(
        "lightning_modules.filter.module.VariationalFilterModule", "lightning_modules.variational_filter.VariationalFilterModule"))
    result = run(lightning_command(), "fit", "--config", str(old))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {old} names lightning_modules.variational_filter.VariationalFilterModule, which moved to "
        "lightning_modules.filter.module.VariationalFilterModule: edit its class_path")


def test_data_module_settings_are_linked_into_the_filter(tmp_path):
    """obs_keys / image_size / num_tasks are set once, on the data module; the filter module receives them."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_modules.cli import ReflectiveCLI

    cli = ReflectiveCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        run=False, args=["--config", str(ROOT / "configs" / "filter_quickstart.yaml"),
                                         "--trainer.logger", "false", "--data.init_args.obs_mode", "pixels_state",
                                         "--data.init_args.image_size", "32"])
    assert cli.model.obs_keys == ("pixels", "state") and cli.model.hparams.image_size == 32
    assert cli.model.hparams.num_tasks == 2 and cli.datamodule.obs_keys == ("pixels", "state")


def test_a_fit_stopped_by_sigterm_is_an_error(tmp_path, tiny_state_dataset, capsys):
    """Lightning ends a fit that receives SIGTERM with SystemExit(None), i.e. status 0; the command says it is
    incomplete (status 2), so the pipeline never marks a killed stage done nor evaluates its half-trained model."""
    from lightning_modules.cli import main

    args = ["fit", "--config", str(ROOT / "configs" / "filter_quickstart.yaml"),
            f"--data.init_args.root={tiny_state_dataset.root}",
            f"--data.init_args.rollouts_per_task={tiny_state_dataset.rollouts_per_task}",
            "--data.init_args.batch_size=2", "--data.init_args.num_segments=2", "--data.init_args.batches_per_epoch=2",
            "--data.init_args.val_batches=1", "--model.init_args.deter_dim=16", "--model.init_args.hidden_dim=16",
            "--trainer.max_steps=50", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks+=helpers.SigtermAtStep"]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "error: fit stopped by SIGTERM at step 2: the run is incomplete" in err and "--ckpt_path" in err
    assert list(tmp_path.glob("filter_quickstart/version_0/checkpoints/last.ckpt"))  # what was written is kept
