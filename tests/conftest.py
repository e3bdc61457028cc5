"""Shared fixtures: tiny real datasets made by the real collector (state obs, or 32 px pixels) and a tiny filter
checkpoint; plain helpers (the CLI, trainers, batches) are in ``helpers.py``."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run torch on one thread: on 2 shared cores, 2 threads were several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` cleanly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _quickstart_env_fields() -> dict:
    """The ``env`` of the state quickstart's data config (what its data covers), so that the quickstart configs
    accept the tiny state dataset: declared once, in ``configs/data/quickstart_state.yaml``."""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "configs" / "data" / "quickstart_state.yaml"
    return dict(OmegaConf.to_container(OmegaConf.load(path)).get("init_args", {}).get("env") or {})


def _make(root, obs_mode: str, rollouts: int, length: int, seed: int = 0, env_fields: dict | None = None):
    from envs.collect import collect_dataset
    from envs.two_drawers import EnvConfig

    env = EnvConfig.from_dict({**EnvConfig(obs_mode=obs_mode, image_size=32, episode_length=length).to_dict(),
                               **(env_fields or {})})
    return collect_dataset(root, env, rollouts_per_task=rollouts, seed=seed, workers=0, progress=False)


@pytest.fixture
def make_env():
    """Factory of envs (32 px unless told otherwise; EnvConfig fields as keywords) all closed after the test."""
    from envs.two_drawers import SawyerTwoDrawersEnv

    made = []

    def _make(obs_mode: str = "state", **kwargs):
        env = SawyerTwoDrawersEnv(**{"obs_mode": obs_mode, "image_size": 32, **kwargs})
        made.append(env)
        return env

    yield _make
    for env in made:
        env.close()


@pytest.fixture(scope="session")
def tiny_pixel_dataset(tmp_path_factory):
    """2 tasks x 3 rollouts x 10 steps, 32 px pixels + state (the issue's tiny dataset)."""
    return _make(tmp_path_factory.mktemp("tiny_pixels") / "ds", "pixels_state", rollouts=3, length=10)


@pytest.fixture(scope="session")
def tiny_state_dataset(tmp_path_factory):
    """2 tasks x 8 rollouts x 40 steps, state observations only (fast), under the state quickstart's conditions."""
    return _make(tmp_path_factory.mktemp("tiny_state") / "ds", "state", rollouts=8, length=40,
                 env_fields=_quickstart_env_fields())


@pytest.fixture(scope="session")
def filter_ckpt(tiny_state_dataset, tmp_path_factory):
    """A tiny state filter (``helpers.SMALL_FILTER``) trained for 2 steps by a Trainer and checkpointed by it."""
    import torch

    from helpers import SMALL_FILTER, cpu_trainer, tiny_datamodule
    from lightning_modules.filter.module import VariationalFilterModule

    path = tmp_path_factory.mktemp("phase1") / "filter.ckpt"
    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["state"], **SMALL_FILTER)
    trainer = cpu_trainer(path.parent, max_steps=2)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_state_dataset))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def phase2_ckpt(filter_ckpt, tiny_state_dataset, tmp_path_factory):
    """A tiny phase-2 checkpoint (Polyak acting actor, cosine learning rates) trained for 2 steps by a Trainer."""
    import torch

    from helpers import cpu_trainer, tiny_datamodule
    from lightning_modules.cql.module import LatentCQLModule

    path = tmp_path_factory.mktemp("phase2") / "cql.ckpt"
    torch.manual_seed(0)
    model = LatentCQLModule(str(filter_ckpt), hidden_dim=32, transition_batch_size=64, num_random=4,
                            actor_polyak=0.9, lr_schedule="cosine")
    trainer = cpu_trainer(path.parent, max_steps=2)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_state_dataset, batch_size=4, batches_per_epoch=4))
    trainer.save_checkpoint(path)
    return path
