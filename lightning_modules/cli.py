"""The ``lightning`` command: ``lightning fit|validate|test|predict --config configs/<file>.yaml``.

Any ``LightningModule`` / ``LightningDataModule`` subclass can be named in the config by its import path
(``model.class_path`` / ``data.class_path``), so new phases need no changes here. What model and data must agree
on is set once, on the data module, and linked into the model where the model has that argument (the filter
module): ``obs_keys`` (default: every key of ``obs_mode``), ``image_size`` and ``num_tasks``.

Configs compose: ``--config`` may be repeated, later files override earlier ones (the ablations are overlays).
Run directories written before the ``lightning_modules/`` packages existed name old class paths; they are refused
with a message naming the new one (:data:`MOVED`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from envs.gl import select_headless_gl

select_headless_gl()  # before anything (a datamodule, an env) imports mujoco

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

from envs.keys import obs_keys_for  # noqa: E402
from envs.two_drawers import NUM_TASKS  # noqa: E402

MOVED = {  # old class path -> new class path (the lightning_modules/ packages)
    "lightning_modules.variational_filter.VariationalFilterModule": "lightning_modules.filter.module.VariationalFilterModule",
    "lightning_modules.latent_cql.LatentCQLModule": "lightning_modules.cql.module.LatentCQLModule",
    "lightning_modules.evaluation.MetaRolloutEvaluation":
        "lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation",
}
# Lightning warnings that the project's design makes expected (set by the command, never on import of the library):
EXPECTED_WARNINGS = (
    # the meta-exploration streams split batches between workers by index, so their __len__ is exact
    "Your `IterableDataset` has `__len__` defined",
    # phase 2 checkpoints after the step's update under manual optimisation: what is wanted (evaluation runs after it)
    "Using ModelCheckpoint with manual optimization",
    # phase 2's frozen filter is in eval mode on purpose
    r"Found \d+ module\(s\) in eval mode",
)


def delivered_obs_keys(obs_mode: str, obs_keys: list[str] | None) -> list[str]:
    """The observation keys the data module delivers: ``obs_keys``, else every key of ``obs_mode``."""
    return list(obs_keys) if obs_keys is not None else list(obs_keys_for(obs_mode))


def task_count(num_tasks: int | None) -> int:
    """The data module's ``num_tasks`` (None: the paper's two drawers, checked against the data in ``setup``)."""
    return NUM_TASKS if num_tasks is None else num_tasks


class ReflectiveCLI(LightningCLI):
    """LightningCLI with the data -> model links (see the module docstring)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments(("data.init_args.obs_mode", "data.init_args.obs_keys"), "model.init_args.obs_keys",
                              compute_fn=delivered_obs_keys)
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments("data.init_args.num_tasks", "model.init_args.num_tasks", compute_fn=task_count)


def moved_class_paths(args: list[str]) -> list[str]:
    """One message per old class path named by a ``--config`` file or a ``--ckpt_path`` checkpoint in ``args``."""
    found = []
    for flag, path in _flag_values(args, ("--config", "--ckpt_path")):
        if flag == "--config":
            try:
                text = Path(path).read_text()
            except OSError:
                continue  # LightningCLI names a missing file itself
            olds = [old for old in MOVED if old in text]
        else:
            olds = [old for old in MOVED if old == _checkpoint_class_path(path)]
        found += [f"{path} names {old}, which moved to {MOVED[old]}: "
                  + ("edit its class_path" if flag == "--config" else
                     "a checkpoint of the old layout cannot be resumed (a phase-1 one still serves as "
                     "model.init_args.filter_checkpoint)") for old in olds]
    return found


def _flag_values(args: list[str], flags: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                out.append((flag, args[i + 1]))
            elif arg.startswith(flag + "="):
                out.append((flag, arg[len(flag) + 1:]))
    return out


def _checkpoint_class_path(path: str) -> str | None:
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return ckpt.get("hyper_parameters", {}).get("_class_path")
    except Exception:  # noqa: BLE001 - unreadable: Lightning reports it
        return None


def build_cli(args: ArgsType = None) -> LightningCLI:
    """Run the Lightning CLI and return it (for tests); ``args`` overrides ``sys.argv[1:]``."""
    return ReflectiveCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: ArgsType = None) -> None:
    """The ``lightning`` console script. Returns None: it is called as ``sys.exit(main())``, where a returned
    object would become exit status 1."""
    argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
    moved = moved_class_paths([str(a) for a in argv])
    if moved:
        print("error: " + moved[0], file=sys.stderr)
        raise SystemExit(2)
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module="lightning")
    build_cli(args)


if __name__ == "__main__":
    main()
