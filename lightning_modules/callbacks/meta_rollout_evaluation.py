"""``MetaRolloutEvaluation``: the online evaluation of a phase-2 policy during training (rank 0 only).

The protocol is :mod:`lightning_modules.evaluation.protocol`, the envs run in :class:`TrialRunner`; this callback
decides when to evaluate, logs ``eval/*`` scalars, a success figure and a video, appends every evaluation to the
run's ``eval_results.json`` (atomic rewrite; a resumed run keeps the evaluations up to the step it resumed from)
and, with ``save_best``, writes ``best_eval.ckpt`` (a checkpoint chosen by online rollouts: online interaction).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from envs.two_drawers import EnvConfig
from lightning_modules.evaluation.protocol import SUCCESS_METRICS, eval_env_config, search_order
from lightning_modules.evaluation.results import (EVAL, RESULTS_FILE, earlier_evaluations, scalar_metrics,
                                                  success_figure, write_results)
from lightning_modules.evaluation.runner import EvalResult, TrialRunner

SEARCH_ORDER_ROWS = 24  # trials listed in the TensorBoard text eval/search_order


class MetaRolloutEvaluation(Callback):
    """Evaluate the policy online every ``every_n_steps`` training steps and at the end of fit (rank 0 only).

    Logs ``eval/success_ep1..E``, ``eval/success_last`` (the last episode's), ``eval/success_mean`` (monitor one with
    ``ModelCheckpoint(monitor="eval/success_mean", mode="max", every_n_train_steps=<every_n_steps>)``: the periodic
    evaluations run in ``on_train_batch_end`` before the checkpoint callback), ``eval/return_ep*``, a
    success-vs-episode figure and a video of trial 0 (TensorBoard, when the logger has ``add_figure`` /
    ``add_video``), and appends every evaluation to ``<run dir>/eval_results.json`` (atomic rewrite).

    Env parameters: the DataModule's dataset metadata (``trainer.datamodule.dataset``), else those stored with the
    model (``model.env_config``), with ``env_overrides`` applied; the obs_mode is what the filter reads.

    Under DDP only global rank 0 evaluates (no collective call; the other ranks skip). The ``eval/*`` metrics then
    exist on rank 0 only, and Lightning's ModelCheckpoint would deadlock monitoring them (its save has a barrier):
    with several devices use ``save_best=True`` instead (rank 0 writes ``<checkpoint dir>/best_eval.ckpt`` itself
    whenever ``best_metric`` improves); ``setup`` refuses a ModelCheckpoint monitoring ``eval/*`` there.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple (0: only at the end of fit).
        trials, episodes: M trials of E episodes. num_envs: envs in lockstep (default min(trials, 32)).
        seed: same trials at every evaluation (targets and env resets), so that checkpoints compare fairly.
        success_metric: "last" or "any" (see the module docstring).
        video, video_fps: log a video of trial 0. plot: log the figure.
        at_fit_end: evaluate once more at the end of fit (logged through the loggers directly).
        results_file: JSON file name inside the run directory (``trainer.log_dir``).
        env_overrides: EnvConfig fields to change (e.g. ``{"episode_length": 40}``); normally leave None.
        save_best, best_metric: rank 0 saves ``best_eval.ckpt`` when ``best_metric`` improves (DDP-safe best checkpoint).
    """

    def __init__(self, every_n_steps: int = 1000, trials: int = 20, episodes: int = 3, num_envs: int | None = None,
                 seed: int = 0, success_metric: str = "last", video: bool = True, video_fps: int = 10,
                 plot: bool = True, at_fit_end: bool = True, results_file: str = RESULTS_FILE,
                 env_overrides: dict[str, Any] | None = None, save_best: bool = False,
                 best_metric: str = f"{EVAL}success_mean"):
        if every_n_steps < 0 or trials < 1 or episodes < 1:
            raise ValueError(f"every_n_steps must be >= 0, trials and episodes >= 1; got {every_n_steps}, {trials}, {episodes}")
        if success_metric not in SUCCESS_METRICS:
            raise ValueError(f"success_metric must be one of {SUCCESS_METRICS}, got {success_metric!r}")
        known = {f"{EVAL}success_last", f"{EVAL}success_mean"} | {f"{EVAL}success_ep{k + 1}" for k in range(episodes)}
        if best_metric not in known:
            raise ValueError(f"best_metric must be one of {sorted(known)}, got {best_metric!r}")
        self.every_n_steps = every_n_steps
        self.trials, self.episodes = trials, episodes
        self.num_envs = num_envs or min(trials, 32)
        self.seed = seed
        self.success_metric = success_metric
        self.video, self.video_fps, self.plot = video, video_fps, plot
        self.at_fit_end = at_fit_end
        self.results_file = results_file
        self.env_overrides = env_overrides
        self.save_best = save_best
        self.best_metric = best_metric
        self.history: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self._runner: TrialRunner | None = None
        self._last_step: int | None = None
        self.results_path: Path | None = None
        self._start_step = 0

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            for cb in trainer.callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.monitor and str(cb.monitor).startswith(EVAL):
                    raise ValueError(f"ModelCheckpoint(monitor={cb.monitor!r}) cannot monitor evaluation metrics with "
                                     f"{trainer.world_size} processes (they exist on rank 0 only and its save waits "
                                     f"for all ranks): use MetaRolloutEvaluation(save_best=True) instead")
        # trainer.log_dir broadcasts under DDP: resolve it here, on every rank, never inside the rank-0-only evaluation
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = trainer.global_step  # > 0 when resumed from a checkpoint

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module, log_with_module=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module, log_with_module=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")

    # ------------------------------------------------------------------ evaluation
    def _env_config(self, trainer: Trainer, pl_module: LightningModule) -> EnvConfig:
        dm = getattr(trainer, "datamodule", None)
        dataset = getattr(dm, "dataset", None)
        source = getattr(dataset, "env_config", None) or getattr(pl_module, "env_config", None)
        return eval_env_config(pl_module.filter, source, self.env_overrides)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, log_with_module: bool = True) -> EvalResult | None:
        """Run the trials now (rank 0), log them and write the JSON; other ranks return None at once."""
        self._last_step = trainer.global_step
        if trainer.global_rank != 0:
            return None
        if self._runner is None:
            self._runner = TrialRunner(self._env_config(trainer, pl_module), self.num_envs)
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = self._runner.run(pl_module.filter, pl_module.act, self.trials, self.episodes, self.seed,
                                      self.success_metric, video=self.video)
        finally:
            pl_module.train(was_training)
        step = trainer.global_step
        metrics = scalar_metrics(result.summary)
        if log_with_module:
            for key, value in metrics.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1,
                              prog_bar=key == f"{EVAL}success_last")
        else:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._log_media(trainer, result, step)
        self._write_json(trainer, result, step)
        score = metrics[self.best_metric]
        if self.save_best and (self.best_score is None or score > self.best_score):
            self._save_best(trainer)
        if self.best_score is None or score > self.best_score:
            self.best_score = score
        return result

    def _log_media(self, trainer: Trainer, result: EvalResult, step: int) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if self.plot and hasattr(experiment, "add_figure"):
                import matplotlib.pyplot as plt

                fig = success_figure(result.summary, title=f"step {step}")
                experiment.add_figure("eval/success_vs_episode", fig, global_step=step, close=True)
                plt.close(fig)
            if hasattr(experiment, "add_text"):  # which drawer each trial opened, episode by episode
                orders = [search_order(t) for t in result.trials if "opened" in t][:SEARCH_ORDER_ROWS]
                experiment.add_text("eval/search_order", "    " + "\n    ".join(orders), global_step=step)
            if result.video is not None and hasattr(experiment, "add_video"):
                try:
                    experiment.add_video("eval/trial0", result.video, global_step=step, fps=self.video_fps)
                except Exception as err:  # noqa: BLE001 - e.g. moviepy missing
                    warnings.warn(f"evaluation video not logged: {err}", stacklevel=2)

    def run_dir(self, trainer: Trainer) -> Path:
        """The run directory (resolved in ``setup`` on every rank: asking the trainer later would be a collective)."""
        cached = getattr(self, "_run_dir", None)
        return cached if cached is not None else Path(trainer.log_dir or trainer.default_root_dir)

    def _write_json(self, trainer: Trainer, result: EvalResult, step: int) -> None:
        entry = {"step": int(step), "epoch": int(trainer.current_epoch), **result.to_json()}
        self.results_path = self.run_dir(trainer) / self.results_file
        if not self.history:  # a resumed run keeps the evaluations up to the step it resumed from
            self.history = earlier_evaluations(self.results_path, min(step - 1, self._start_step))
        self.history.append(entry)
        write_results(self.results_path, {"env_config": self._runner.env_config.to_dict() if self._runner else None,
                                          "evaluations": self.history})

    def _save_best(self, trainer: Trainer) -> None:
        # rank 0 only, without the barrier of trainer.save_checkpoint (no collective call under DDP)
        ckpt_dir = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback and \
            trainer.checkpoint_callback.dirpath else self.run_dir(trainer) / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        tmp = ckpt_dir / ".best_eval.ckpt.tmp"
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, tmp)
        os.replace(tmp, ckpt_dir / "best_eval.ckpt")
