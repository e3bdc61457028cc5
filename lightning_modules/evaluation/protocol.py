"""The evaluation protocol (paper Fig. 2, right): trials, their targets and seeds, and what is measured.

One *trial*: the target drawer is drawn uniformly (stratified over the trials, :func:`draw_targets`), then
``episodes`` episodes are played in that task with the env reset between episodes and the filter's belief carried
over; the belief is reset only between trials. The policy acts on the current belief with its deterministic action
(tanh of the TanhNormal's location).

Success of an episode (``success_metric``): ``"last"`` (default) = the target drawer is open at the episode's last
step (``info["success"]`` after the last action, i.e. it was opened and is still open); ``"any"`` = it was open at
some step. Both are recorded per trial; ``eval/success_ep{k}`` uses the chosen one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from envs.keys import PIXELS, obs_mode_for
from envs.seeding import derive_seed
from envs.two_drawers import NUM_TASKS, EnvConfig
from lightning_modules.filter.belief_filter import BeliefFilter

SUCCESS_METRICS = ("last", "any")


def eval_env_config(filter_module: BeliefFilter, env_config: EnvConfig | dict[str, Any] | None,
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
    if int(filter_module.num_tasks) != cfg.num_drawers:
        raise ValueError(f"task count: the evaluation scene has {cfg.num_drawers} drawers, the filter was trained on "
                         f"{filter_module.num_tasks} tasks")
    if PIXELS in filter_module.obs_keys and cfg.image_size != int(filter_module.image_size):
        raise ValueError(f"image size: the evaluation env renders {cfg.image_size} px, the filter expects "
                         f"{filter_module.image_size} px")
    return cfg


def default_episodes(num_tasks: int) -> int:
    """Episodes per trial when not given: enough for a systematic explorer to find the drawer (N), plus one."""
    return int(num_tasks) + 1


def episode_seed(seed: int, trial: int, episode: int) -> int:
    """Env seed of one episode (independent of how trials are batched over envs)."""
    return derive_seed(seed, trial, episode, bits=32)


def draw_targets(seed: int, trials: int, num_tasks: int = NUM_TASKS) -> np.ndarray:
    """Target task of each trial: uniform for every trial, stratified over the trials (a random permutation of
    ``trials`` balanced task labels: with 20 trials exactly 10 per drawer), which removes the target-count noise
    from the success estimate (an always-left policy scores exactly 0.5 when ``trials`` is even)."""
    rng = np.random.default_rng(seed)
    balanced = np.arange(trials) % num_tasks
    balanced[trials - trials % num_tasks:] = rng.integers(num_tasks, size=trials % num_tasks)
    return rng.permutation(balanced)


def revisits_failed_drawer(trial: dict[str, Any]) -> bool:
    """The trial opened, in some episode, a drawer that an earlier episode had already opened without reward (a
    systematic explorer never does: it tries a new drawer after each failure)."""
    failed: set[int] = set()
    for opened, success in zip(trial["opened"], trial["success"]):
        if opened in failed:
            return True
        if opened >= 0 and not success:
            failed.add(opened)
    return False


def search_order(trial: dict[str, Any]) -> str:
    """The drawers a trial opened, episode by episode ("-" = none), e.g. ``target 2: 0 1 2 2``."""
    return f"target {trial['target']}: " + " ".join("-" if o < 0 else str(o) for o in trial["opened"])


def summarize(trials: list[dict[str, Any]], episodes: int, success_metric: str,
              num_tasks: int = NUM_TASKS) -> dict[str, Any]:
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
        "target_counts": [sum(1 for t in trials if t["target"] == k) for k in range(num_tasks)],
        # trials that re-opened a drawer already found empty (the No Expl failure; 0 for a systematic explorer)
        "revisit_failed_rate": (float(np.mean([revisits_failed_drawer(t) for t in trials]))
                                if n and all("opened" in t for t in trials) else float("nan")),
    }
