"""The ``lightning`` command: ``lightning fit|validate|test|predict --config configs/<file>.yaml``.

Any ``LightningModule`` / ``LightningDataModule`` subclass can be named in the config by its import path
(``model.class_path`` / ``data.class_path``), so new phases need no changes here. What model and data must agree
on is set once, on the data module, and linked into the model where the model has that argument (the filter
module): ``obs_keys`` (default: every key of ``obs_mode``), ``image_size`` and ``num_tasks``.

Configs compose: ``--config`` may be repeated, later files override earlier ones (the ablations are overlays).
Run directories written before the ``lightning_modules/`` packages existed name old class paths; they are refused
with a message naming the new one (:data:`MOVED`). ``--ckpt_path`` must be a readable checkpoint of the phase the
config trains (checked before anything is built); a run resumed from ``<run>/checkpoints/*.ckpt`` logs into
``<run>`` again, and TensorBoard drops the events logged after the checkpoint (each step shows once). A ``fit``
stopped by SIGTERM (which Lightning ends with status 0) is an error here. Named errors are one line on stderr and
exit status 2 (:mod:`envs.errors`).
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Any

from envs.gl import select_headless_gl

select_headless_gl()  # before anything (a datamodule, an env) imports mujoco

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from envs.errors import EXIT_NAMED_ERROR, run_command  # noqa: E402
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


def task_count(num_tasks: int | None, env: dict[str, Any] | None) -> int:
    """The data module's ``num_tasks`` (None: its ``env.num_drawers``, else the paper's two drawers; checked
    against the data in ``setup``)."""
    return num_tasks if num_tasks is not None else int((env or {}).get("num_drawers", NUM_TASKS))


class ReflectiveCLI(LightningCLI):
    """LightningCLI with the data -> model links and resumed runs kept in their run folder (module docstring)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments(("data.init_args.obs_mode", "data.init_args.obs_keys"), "model.init_args.obs_keys",
                              compute_fn=delivered_obs_keys)
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments(("data.init_args.num_tasks", "data.init_args.env"), "model.init_args.num_tasks",
                              compute_fn=task_count)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt_path = cfg.get("ckpt_path") if cfg is not None else None
        run = resumed_run_dir(ckpt_path)
        logger = cfg.get("trainer.logger") if run is not None else None
        if run is None or not hasattr(logger, "init_args") or "TensorBoardLogger" not in str(logger.class_path):
            return
        if logger.init_args.get("version") is None:  # a saved config.yaml: continue in the checkpoint's run folder
            logger.init_args.save_dir, logger.init_args.name = str(run.parent.parent), run.parent.name
            logger.init_args.version = run.name

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as err:  # a SystemExit with status 0: a killed run would pass for a finished one
            step = self.trainer.global_step if getattr(self, "trainer", None) is not None else "?"
            raise InterruptedError(f"{subcommand} stopped by SIGTERM at step {step}: the run is incomplete; resume it "
                                   f"with the same command and --ckpt_path <run>/checkpoints/last.ckpt") from err

    def before_fit(self) -> None:
        ckpt_path = self.config.get(self.subcommand, {}).get("ckpt_path") if self.subcommand else None
        if not ckpt_path:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        step = _checkpoint_field(str(ckpt_path), "global_step")
        for logger in self.trainer.loggers:
            # events at steps >= the checkpoint's were logged by the run that was interrupted: drop them (a
            # SummaryWriter argument, set before the writer exists; TensorBoardLogger keeps it in _kwargs)
            if isinstance(logger, TensorBoardLogger) and isinstance(step, int) and logger._experiment is None:
                if logger._kwargs.get("purge_step") is None:  # (the CLI fills SummaryWriter's defaults: None)
                    logger._kwargs["purge_step"] = step


def resumed_run_dir(ckpt_path: str | None) -> Path | None:
    """``<run>`` for a checkpoint at ``<run>/checkpoints/<file>.ckpt`` (a logger's version folder), else None."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


PHASES = {"VariationalFilterModule": "filter", "LatentCQLModule": "cql"}  # class name -> the phase it trains


def check_ckpt_path(args: list[str]) -> None:
    """Before anything is built: ``--ckpt_path`` must be readable and written by the phase the config trains."""
    values = [v for flag, v in _flag_values(args, ("--ckpt_path",))]
    if not values or values[-1] in ("last", "best", "hpc", "registry"):
        return
    path = values[-1]
    from lightning_modules.guards import PHASE_NAMES

    found = _checkpoint_summary(path)["phase"]
    model = _config_model_class(args)
    expected = PHASES.get(model.rsplit(".", 1)[-1]) if model else None
    if expected is not None and found != expected:
        raise ValueError(f"--ckpt_path {path} was written by phase {found!r} ({PHASE_NAMES.get(found, found)}), "
                         f"the config trains phase {expected!r} ({model.rsplit('.', 1)[-1]}): resume a checkpoint of "
                         f"this phase (phase 2 reads the filter through model.init_args.filter_checkpoint)")


def check_filter_checkpoint(args: list[str]) -> None:
    """Before anything is built: phase 2's ``filter_checkpoint`` is given and holds a belief filter (a resumed run
    takes it from its checkpoint's hyper-parameters)."""
    model = _config_model_class(args)
    if model is None or PHASES.get(model.rsplit(".", 1)[-1]) != "cql" or _flag_values(args, ("--ckpt_path",)):
        return
    path = _config_value(args, "filter_checkpoint")
    if path is None:
        raise ValueError("model.init_args.filter_checkpoint is required (phase 2 reads the phase-1 filter from it): "
                         "--model.init_args.filter_checkpoint <phase-1 run>/checkpoints/last.ckpt")
    from lightning_modules.filter.belief_filter import BeliefFilter

    BeliefFilter.load(path)  # names the path when it is missing, unreadable or holds no filter


def _config_model_class(args: list[str]) -> str | None:
    """The model class path the ``--config`` files and ``--model`` flags name (the last one wins)."""
    found = None
    for flag, value in _flag_values(args, ("--config", "--model", "--model.class_path")):
        if flag == "--config":
            model = _yaml(value).get("model")
            if isinstance(model, dict) and isinstance(model.get("class_path"), str):
                found = model["class_path"]
        elif not value.endswith((".yaml", ".yml")):
            found = value
    return found


def _config_value(args: list[str], name: str) -> Any:
    """A model init argument as the ``--config`` files and ``--model.init_args.<name>`` flags set it (last wins)."""
    found = None
    for flag, value in _flag_values(args, ("--config", f"--model.init_args.{name}")):
        if flag == "--config":
            model = _yaml(value).get("model")
            init = model.get("init_args") if isinstance(model, dict) else None
            if isinstance(init, dict) and name in init:
                found = init[name]
        else:
            found = None if value in ("null", "None", "") else value
    return found


def _yaml(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=4)
def _checkpoint_summary(path: str) -> dict[str, Any]:
    """What the command needs of a ``--ckpt_path`` file (its phase, step and class path), read once."""
    from lightning_modules.guards import checkpoint_phase

    ckpt = _load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters")
    return {"phase": checkpoint_phase(ckpt), "global_step": ckpt.get("global_step"),
            "class_path": hparams.get("_class_path") if isinstance(hparams, dict) else None}


def _load_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path {path} does not exist")
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - named with the path
        raise ValueError(f"--ckpt_path {path} could not be read ({type(err).__name__}: {err}): is it a complete "
                         f"checkpoint?") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def _checkpoint_field(path: str, key: str) -> Any:
    try:
        return _checkpoint_summary(str(path))[key]
    except (OSError, ValueError):
        return None


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
    return _checkpoint_field(path, "class_path")


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
    argv = [str(a) for a in (list(args) if isinstance(args, (list, tuple)) else sys.argv[1:])]

    def run() -> None:
        moved = moved_class_paths(argv)
        if moved:
            raise ValueError(moved[0])
        if not any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
            check_ckpt_path(argv)
            check_filter_checkpoint(argv)
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module="lightning")
        build_cli(args)

    status = run_command(run)
    if status:
        raise SystemExit(status if status == EXIT_NAMED_ERROR else 1)


if __name__ == "__main__":
    main()
