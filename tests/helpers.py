"""Plain helpers shared by the tests (fixtures are in ``conftest.py``): the `lightning` command run as users run it,
a tiny state DataModule, a quiet CPU Trainer, sampled batches, checkpoint and TensorBoard readers, a callback
that sends SIGTERM to its own process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
# the tiny filter of the shared filter checkpoint (conftest.py's ``filter_ckpt``)
SMALL_FILTER = dict(deter_dim=16, stoch_dim=8, hidden_dim=16, mlp_hidden=16, state_embed_dim=16, reward_embed_dim=8)


def lightning_command() -> list[str]:
    """The installed console script (next to this interpreter, else on PATH), else ``python -m``."""
    beside = Path(sys.executable).parent / "lightning"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("lightning")
    if on_path is not None:
        return [on_path]
    return [sys.executable, "-m", "lightning_modules.cli"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """A subprocess environment that imports the repository's packages, one OpenMP thread, headless EGL."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("COLUMNS", None)  # the progress bar's width: rich's default (80) when not a terminal
    return env


def run_lightning(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``lightning <args>`` in the repository root, stdin closed (no TTY), output captured."""
    return subprocess.run([*lightning_command(), *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    hint = ""
    if "<lightning.pytorch.cli.LightningCLI object" in result.stderr:
        hint = ("\n(the console script does sys.exit(main()) and lightning_modules.cli.main returns the LightningCLI "
                "object: sys.exit prints it and exits 1; main must return None)")
    assert result.returncode == 0, f"exit {result.returncode}{hint}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def load_ckpt(path: Path) -> dict:
    """A checkpoint read with ``weights_only=True``: it must hold plain data only."""
    import torch

    assert path.is_file(), f"no checkpoint at {path}; have {sorted(p.name for p in path.parent.glob('*'))}"
    return torch.load(path, map_location="cpu", weights_only=True)


def scalars(run_dir: Path):
    """The TensorBoard event files of a run directory, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()


def sample_batch(dataset, batch_size: int = 3, num_segments: int = 2, seed: int = 0, obs_keys=("state",)):
    """One meta-exploration batch [B, L] of ``dataset`` drawn by the real sampler."""
    import torch

    from datamodules import MetaExplorationSampler, SamplerConfig

    cfg = SamplerConfig(batch_size=batch_size, num_segments=num_segments,
                        obs_keys=tuple(obs_keys) if obs_keys is not None else None)
    return MetaExplorationSampler(dataset.buffers, cfg).sample(torch.Generator().manual_seed(seed))


def collection_env(dataset) -> dict:
    """The data module ``env`` that re-creates a fixture dataset's collection parameters (those not at default)."""
    from envs.two_drawers import EnvConfig

    own = {"obs_mode", "image_size", "episode_length"}  # the data module's own arguments
    mine, default = dataset.env_config.to_dict(), EnvConfig().to_dict()
    return {k: v for k, v in mine.items() if k not in own and v != default[k]}


def tiny_datamodule(dataset, cls=None, **kw):
    """A MetaExplorationDataModule over a fixture dataset (every stored observation key unless ``obs_keys``)."""
    from datamodules import MetaExplorationDataModule

    env = dataset.env_config
    args = dict(root=str(dataset.root), obs_mode=env.obs_mode, image_size=env.image_size, obs_keys=None,
                env=collection_env(dataset) or None,
                episode_length=env.episode_length, rollouts_per_task=dataset.rollouts_per_task, num_segments=2,
                batch_size=2, batches_per_epoch=3, val_batches=1)
    args.update(kw)
    return (cls or MetaExplorationDataModule)(**args)


def cpu_trainer(tmp_path, **kw):
    import lightning.pytorch as pl

    args = dict(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0, default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


def assert_same_core_state(a: dict, b: dict) -> None:
    """Two checkpoints agree on step, data stream, noise seed, every weight and buffer and the optimiser state."""
    import torch

    assert a["global_step"] == b["global_step"]
    assert a["MetaExplorationDataModule"] == b["MetaExplorationDataModule"]
    assert a["noise_seed"] == b["noise_seed"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    [opt_a], [opt_b] = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    torch.testing.assert_close(opt_b["state"], opt_a["state"], rtol=0, atol=1e-6)  # Adam moments and step counts


class SigtermAtStep(Callback):
    """A Lightning callback (``--trainer.callbacks+=helpers.SigtermAtStep``) that sends SIGTERM to its own process
    after training step ``step``, as a scheduler or ``kill`` would."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
