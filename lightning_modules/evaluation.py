"""Online meta-evaluation of a phase-2 policy on ``SawyerTwoDrawersEnv`` (paper Fig. 2, right).

Protocol (one *trial*): the target drawer is drawn uniformly (stratified over the trials, see :func:`draw_targets`), then ``episodes`` episodes are played in that task
with the env reset between episodes and the filter's belief carried over; the belief is reset only between trials.
The policy acts on the current belief with its deterministic action (tanh of the TanhNormal's location).

The filter is fed online exactly the layout it was trained on (``lightning_modules/variational_filter.py``):
filter step ``t`` sees ``o_t``, the previous action ``a_{t-1}`` and the reward ``r_t`` returned with ``o_t``
(zeros at the start of a trial). Across an episode boundary nothing is reset: the first observation of the next
episode arrives with the last action and the last reward of the previous episode, as at a segment boundary of a
meta-exploration batch. ``run_trials(..., record=True)`` returns each trial as a TensorDict in the dataset layout
(``action``, ``("next", "reward")``, observations, ``segment_start``, ``task``, ...) so that tests can check that the
online beliefs equal ``filter.beliefs(recorded)``.

Success of an episode (``success_metric``): ``"last"`` (default) = the target drawer is open at the episode's last
step (``info["success"]`` after the last action, i.e. it was opened and is still open); ``"any"`` = it was open at
some step. Both are recorded per trial in the JSON; ``eval/success_ep{k}`` uses the chosen one.

Speed: the trials run ``num_envs`` at a time, in lockstep in this process, with the filter and the actor batched over
the envs (MuJoCo steps are ~0.2 ms; the networks dominate).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tensordict import TensorDict

from envs.gl import select_headless_gl

select_headless_gl()

from envs.two_drawers import NUM_TASKS, EnvConfig, SawyerTwoDrawersEnv  # noqa: E402

SUCCESS_METRICS = ("last", "any")
RESULTS_FILE = "eval_results.json"


# ---------------------------------------------------------------------- env parameters
def obs_mode_for(obs_keys: Sequence[str]) -> str:
    """The cheapest env ``obs_mode`` that produces the observation keys a filter reads."""
    keys = set(obs_keys)
    if keys == {"pixels", "state"}:
        return "pixels_state"
    return "pixels" if "pixels" in keys else "state"


def eval_env_config(filter_module: Any, env_config: EnvConfig | dict[str, Any] | None,
                    overrides: dict[str, Any] | None = None) -> EnvConfig:
    """Evaluation env parameters: the dataset's (``env_config``) with the obs_mode the filter needs.

    Raises ``ValueError`` when they are unknown or when the image size differs from the filter's.
    """
    if env_config is None:
        raise ValueError("no env parameters for the evaluation: train with a MetaExplorationDataModule (its dataset "
                         "metadata is read and stored in phase-2 checkpoints) or pass env_config explicitly")
    cfg = EnvConfig.from_dict(env_config) if isinstance(env_config, dict) else env_config
    if overrides:
        cfg = EnvConfig.from_dict({**cfg.to_dict(), **overrides})
    cfg = dataclasses.replace(cfg, obs_mode=obs_mode_for(filter_module.obs_keys))
    if "pixels" in filter_module.obs_keys and cfg.image_size != int(filter_module.hparams.image_size):
        raise ValueError(f"image size: the evaluation env renders {cfg.image_size} px, the filter expects "
                         f"{filter_module.hparams.image_size} px")
    return cfg


def episode_seed(seed: int, trial: int, episode: int) -> int:
    """Env seed of one episode (independent of how trials are batched over envs)."""
    return int(np.random.SeedSequence([seed, trial, episode]).generate_state(1)[0])


def draw_targets(seed: int, trials: int, num_tasks: int = NUM_TASKS) -> np.ndarray:
    """Target task of each trial: uniform for every trial, stratified over the trials (a random permutation of
    ``trials`` balanced task labels: with 20 trials exactly 10 per drawer), which removes the target-count noise
    from the success estimate (an always-left policy scores exactly 0.5 when ``trials`` is even)."""
    rng = np.random.default_rng(seed)
    balanced = np.arange(trials) % num_tasks
    balanced[trials - trials % num_tasks:] = rng.integers(num_tasks, size=trials % num_tasks)
    return rng.permutation(balanced)


# ---------------------------------------------------------------------- results
@dataclasses.dataclass
class EvalResult:
    """What :func:`run_trials` returns. ``trials``: one JSON-ready dict per trial; ``summary``: aggregates.

    ``recorded`` (``record=True``): TensorDict [trials, episodes * T] in the dataset layout; ``beliefs``: the online
    beliefs [trials, episodes * T, D]; ``video``: uint8 [1, frames, 3, H, W] of trial 0 (``video=True``) or None.
    """

    trials: list[dict[str, Any]]
    summary: dict[str, Any]
    recorded: TensorDict | None = None
    beliefs: torch.Tensor | None = None
    video: torch.Tensor | None = None

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "trials": self.trials}


def summarize(trials: list[dict[str, Any]], episodes: int, success_metric: str) -> dict[str, Any]:
    """Success rate (and its standard error), return and wrong-drawer rate per episode index."""
    n = len(trials)

    def rate(key: str) -> list[float]:
        return [float(np.mean([t[key][e] for t in trials])) if n else float("nan") for e in range(episodes)]

    success = rate("success" if success_metric == "last" else "success_any")
    return {
        "trials": n,
        "episodes": episodes,
        "success_metric": success_metric,
        "success_per_episode": success,
        "success_stderr_per_episode": [float(np.sqrt(p * (1 - p) / max(n, 1))) for p in success],
        "success_last_step_per_episode": rate("success"),
        "success_any_step_per_episode": rate("success_any"),
        "wrong_drawer_open_per_episode": rate("wrong_drawer_open"),
        "return_per_episode": rate("return"),
        "target_counts": [sum(1 for t in trials if t["target"] == k) for k in range(NUM_TASKS)],
    }


# ---------------------------------------------------------------------- the trial runner
class TrialRunner:
    """``num_envs`` envs stepped in lockstep; reused across evaluations (building an env takes ~0.4 s)."""

    def __init__(self, env_config: EnvConfig, num_envs: int):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env_config = env_config
        self.envs = [SawyerTwoDrawersEnv(env_config) for _ in range(num_envs)]

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []

    @torch.no_grad()
    def run(self, filter_module: Any, policy: Callable[[torch.Tensor], torch.Tensor], trials: int, episodes: int = 3,
            seed: int = 0, success_metric: str = "last", record: bool = False, video: bool = False) -> EvalResult:
        """Play ``trials`` trials of ``episodes`` episodes; see the module docstring.

        Args:
            filter_module: has ``initial_state(n)``, ``step(state, obs, prev_action, reward)``, ``obs_keys`` and
                ``hparams.action_dim`` (a :class:`VariationalFilterModule`).
            policy: beliefs [n, D] -> actions [n, A] in [-1, 1].
            seed: draws the targets and seeds every episode's reset (same seed, same trials).
            record: also return the trials in the dataset layout and the online beliefs.
            video: also return the frames of trial 0 (the observed pixels, or ``env.render()`` when the filter reads
                state only; skipped with a warning when rendering fails).
        """
        if success_metric not in SUCCESS_METRICS:
            raise ValueError(f"success_metric must be one of {SUCCESS_METRICS}, got {success_metric!r}")
        if trials < 1 or episodes < 1:
            raise ValueError(f"trials and episodes must be >= 1, got {trials} and {episodes}")
        start = time.perf_counter()
        targets = draw_targets(seed, trials)
        results: list[dict[str, Any]] = []
        recorded, beliefs, frames = [], [], None
        for first in range(0, trials, len(self.envs)):
            chunk = list(range(first, min(trials, first + len(self.envs))))
            out = self._run_chunk(filter_module, policy, chunk, targets[chunk], episodes, seed, record,
                                  video and first == 0)
            results.extend(out["trials"])
            if record:
                recorded.append(out["recorded"])
                beliefs.append(out["beliefs"])
            if out.get("frames") is not None:
                frames = out["frames"]
        seconds = time.perf_counter() - start
        summary = summarize(results, episodes, success_metric)
        summary["seconds"] = seconds
        summary["episodes_per_second"] = trials * episodes / seconds
        summary["seed"] = seed
        return EvalResult(results, summary,
                          recorded=torch.cat(recorded, 0) if record else None,
                          beliefs=torch.cat(beliefs, 0) if record else None,
                          video=frames)

    def _run_chunk(self, filter_module, policy, trial_ids, targets, episodes, seed, record, video):
        envs = self.envs[: len(trial_ids)]
        n, T = len(envs), self.env_config.episode_length
        keys = tuple(filter_module.obs_keys)
        action_dim = int(filter_module.hparams.action_dim)
        state = filter_module.initial_state(n)  # a new trial: fresh belief
        prev_action = torch.zeros(n, action_dim)
        reward = torch.zeros(n, 1)
        rec: dict[str, list] = {"obs": [], "action": [], "reward": [], "belief": []}
        success = np.zeros((n, episodes), dtype=bool)
        success_any = np.zeros((n, episodes), dtype=bool)
        wrong = np.zeros((n, episodes), dtype=bool)
        returns = np.zeros((n, episodes))
        frames: list[np.ndarray] | None = [] if video else None
        for ep in range(episodes):
            # env reset between episodes; the filter state, previous action and reward carry over
            resets = [env.reset(seed=episode_seed(seed, i, ep), options={"task": int(k)})
                      for env, i, k in zip(envs, trial_ids, targets)]
            if any(info["task"] != int(k) for (_, info), k in zip(resets, targets)):
                raise RuntimeError("an evaluation env did not take the trial's target task")
            obs = [o for o, _ in resets]
            for t in range(T):
                obs_t = _stack_obs(obs, keys)
                if frames is not None:
                    frames = _add_frame(frames, envs[0], obs[0])
                belief, state = filter_module.step(state, obs_t, prev_action, reward)
                action = policy(belief).detach().float().cpu().clamp(-1.0, 1.0)
                steps = [env.step(a.numpy()) for env, a in zip(envs, action)]
                obs = [s[0] for s in steps]
                r = np.array([s[1] for s in steps], dtype=np.float32)
                ok = np.array([s[4]["success"] for s in steps])
                returns[:, ep] += r
                success_any[:, ep] |= ok
                if t == T - 1:
                    success[:, ep] = ok
                    wrong[:, ep] = [s[4]["wrong_drawer_open"] for s in steps]
                if record:
                    rec["obs"].append(obs_t)
                    rec["action"].append(action)
                    rec["reward"].append(torch.from_numpy(r)[:, None])
                    rec["belief"].append(belief.float().cpu())
                prev_action, reward = action, torch.from_numpy(r)[:, None]
        trials = [{"trial": int(i), "target": int(k), "success": success[j].tolist(),
                   "success_any": success_any[j].tolist(), "wrong_drawer_open": wrong[j].tolist(),
                   "return": returns[j].tolist()} for j, (i, k) in enumerate(zip(trial_ids, targets))]
        out: dict[str, Any] = {"trials": trials}
        if record:
            out["recorded"] = _dataset_layout(rec, keys, trial_ids, targets, episodes, T)
            out["beliefs"] = torch.stack(rec["belief"], 1)
        if frames:
            out["frames"] = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[None].contiguous()
        return out


def _stack_obs(obs: list[dict[str, np.ndarray]], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Env observations -> the filter's input: pixels uint8 [n, 3, H, W] (channels first, like the datasets),
    state float32 [n, 6]."""
    out = {}
    for key in keys:
        x = torch.from_numpy(np.stack([o[key] for o in obs]))
        out[key] = x.permute(0, 3, 1, 2).contiguous() if key == "pixels" else x.float()
    return out


def _add_frame(frames: list[np.ndarray] | None, env: SawyerTwoDrawersEnv, obs: dict[str, np.ndarray]):
    if frames is None:
        return None
    try:
        frames.append(obs["pixels"] if "pixels" in obs else env.render())
    except Exception as err:  # noqa: BLE001 - no GL: no video
        warnings.warn(f"evaluation video skipped: rendering failed ({err})", stacklevel=2)
        return None
    return frames


def _dataset_layout(rec, keys, trial_ids, targets, episodes, T) -> TensorDict:
    n = len(trial_ids)
    L = episodes * T
    fields: dict[Any, torch.Tensor] = {key: torch.stack([o[key] for o in rec["obs"]], 1) for key in keys}
    fields["action"] = torch.stack(rec["action"], 1)
    fields[("next", "reward")] = torch.stack(rec["reward"], 1)
    fields[("next", "original_reward")] = fields[("next", "reward")].clone()
    step = torch.arange(T).repeat(episodes).expand(n, L)
    fields["segment_start"] = (step == 0)[..., None].clone()
    fields["step"] = step.clone()
    fields["segment"] = torch.arange(episodes).repeat_interleave(T).expand(n, L).clone()
    task = torch.as_tensor(np.asarray(targets), dtype=torch.int64)[:, None].expand(n, L)
    fields["task"], fields["target_task"] = task.clone(), task.clone()
    fields["rollout"] = torch.as_tensor(list(trial_ids), dtype=torch.int64)[:, None].expand(n, L).clone()
    return TensorDict(fields, batch_size=[n, L])


def run_trials(model: Any, env_config: EnvConfig | dict[str, Any] | None = None, trials: int = 20, episodes: int = 3,
               num_envs: int | None = None, seed: int = 0, success_metric: str = "last", record: bool = False,
               video: bool = False, runner: TrialRunner | None = None) -> EvalResult:
    """Evaluate a :class:`~lightning_modules.latent_cql.LatentCQLModule` (uses ``model.filter`` and ``model.act``).

    ``env_config`` defaults to the one stored with the model (the dataset's). ``num_envs`` defaults to ``min(trials,
    32)``; pass a ``runner`` to reuse envs.
    """
    if runner is None:
        cfg = eval_env_config(model.filter, env_config if env_config is not None else model.env_config)
        runner = TrialRunner(cfg, num_envs or min(trials, 32))
        close = True
    else:
        close = False
    try:
        return runner.run(model.filter, model.act, trials, episodes, seed, success_metric, record, video)
    finally:
        if close:
            runner.close()


# ---------------------------------------------------------------------- outputs
def _earlier_evaluations(path: Path, step: int) -> list[dict[str, Any]]:
    """The evaluations at steps <= ``step`` in an existing results file (none when it is missing or unreadable)."""
    try:
        previous = json.loads(Path(path).read_text()).get("evaluations", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in previous if isinstance(e, dict) and isinstance(e.get("step"), int) and e["step"] <= step]


def write_results(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def success_figure(summary: dict[str, Any], title: str = "success vs episode"):
    """Matplotlib figure of the success rate per episode index (with standard errors)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rates = summary["success_per_episode"]
    x = np.arange(1, len(rates) + 1)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.errorbar(x, rates, yerr=summary["success_stderr_per_episode"], marker="o", capsize=3)
    ax.set_xticks(x)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("episode in trial")
    ax.set_ylabel(f"success rate ({summary['success_metric']} step)")
    ax.set_title(f"{title} ({summary['trials']} trials)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def scalar_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The ``eval/*`` scalars: success and return per episode index, ``success_last`` (the last episode's
    success rate: the monitorable one), ``success_mean`` and evaluation speed."""
    rates = summary["success_per_episode"]
    out = {f"eval/success_ep{k + 1}": float(v) for k, v in enumerate(rates)}
    out.update({f"eval/return_ep{k + 1}": float(v) for k, v in enumerate(summary["return_per_episode"])})
    out["eval/success_last"] = float(rates[-1])
    out["eval/success_mean"] = float(np.mean(rates))  # the config's checkpoint monitor (fewer ties than success_last)
    out["eval/wrong_drawer_last"] = float(summary["wrong_drawer_open_per_episode"][-1])
    out["eval/episodes_per_s"] = float(summary["episodes_per_second"])
    return out


# ---------------------------------------------------------------------- the callback
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
                 best_metric: str = "eval/success_mean"):
        if every_n_steps < 0 or trials < 1 or episodes < 1:
            raise ValueError(f"every_n_steps must be >= 0, trials and episodes >= 1; got {every_n_steps}, {trials}, {episodes}")
        if success_metric not in SUCCESS_METRICS:
            raise ValueError(f"success_metric must be one of {SUCCESS_METRICS}, got {success_metric!r}")
        known = {"eval/success_last", "eval/success_mean"} | {f"eval/success_ep{k + 1}" for k in range(episodes)}
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
                if isinstance(cb, ModelCheckpoint) and cb.monitor and str(cb.monitor).startswith("eval/"):
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
                              prog_bar=key == "eval/success_last")
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
            self.history = _earlier_evaluations(self.results_path, min(step - 1, self._start_step))
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
