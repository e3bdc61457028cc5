"""The trial runner: ``num_envs`` envs stepped in lockstep with the belief filter and the policy batched over them.

The filter is fed online exactly the layout it was trained on (:mod:`lightning_modules.filter.rssm`): filter step
``t`` sees ``o_t``, the previous action ``a_{t-1}`` and the reward ``r_t`` returned with ``o_t`` (zeros at the start
of a trial). Across an episode boundary nothing is reset: the first observation of the next episode arrives with
the last action and the last reward of the previous episode, as at a segment boundary of a meta-exploration batch.
``run(..., record=True)`` returns each trial as a TensorDict in the dataset layout (``action``, ``("next",
"reward")``, observations, ``segment_start``, ``task``, ...) so that tests can check that the online beliefs equal
``filter.beliefs(recorded)``. The protocol (targets, seeds, success) is :mod:`lightning_modules.evaluation.protocol`.

Speed: MuJoCo steps are ~0.2 ms; the networks, batched over the envs, dominate (state observations).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tensordict import TensorDict

from envs.gl import select_headless_gl

select_headless_gl()

from envs.keys import (ACTION, ORIGINAL_REWARD, PIXELS, REWARD, ROLLOUT, SEGMENT, SEGMENT_START,  # noqa: E402
                       STATE, STEP, TARGET_TASK, TASK)
from envs.seeding import derive_seed  # noqa: E402
from envs.two_drawers import EnvConfig, SawyerTwoDrawersEnv  # noqa: E402
from lightning_modules.evaluation.protocol import (SUCCESS_METRICS, draw_targets, episode_seed,  # noqa: E402
                                                   eval_env_config, summarize)

SHIFT_STREAM = 7  # the random stream of a trial's deployment noise (independent of the env's reset seed)


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


class TrialRunner:
    """``num_envs`` envs stepped in lockstep; reused across evaluations (building an env takes ~0.4 s)."""

    def __init__(self, env_config: EnvConfig, num_envs: int, action_noise: float = 0.0, obs_noise: float = 0.0):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if action_noise < 0 or obs_noise < 0:
            raise ValueError(f"action_noise and obs_noise must be >= 0, got {action_noise}, {obs_noise}")
        self.env_config = env_config
        # deployment perturbations (lightning_modules.evaluation.shifts): noise on executed actions / state obs
        self.action_noise, self.obs_noise = float(action_noise), float(obs_noise)
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
            filter_module: a :class:`~lightning_modules.filter.belief_filter.BeliefFilter` (``initial_state(n)``,
                ``step(state, obs, prev_action, reward)``, ``obs_keys``, ``action_dim``).
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
        targets = draw_targets(seed, trials, self.env_config.num_drawers)
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
        summary = summarize(results, episodes, success_metric, self.env_config.num_drawers)
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
        action_dim = int(filter_module.action_dim)
        state = filter_module.initial_state(n)  # a new trial: fresh belief
        prev_action = torch.zeros(n, action_dim)
        reward = torch.zeros(n, 1)
        rec: dict[str, list] = {"obs": [], "action": [], "reward": [], "belief": []}
        success = np.zeros((n, episodes), dtype=bool)
        success_any = np.zeros((n, episodes), dtype=bool)
        wrong = np.zeros((n, episodes), dtype=bool)
        opened = np.full((n, episodes), -1, dtype=int)  # the drawer open at the end of each episode (-1: none)
        returns = np.zeros((n, episodes))
        frames: list[np.ndarray] | None = [] if video else None
        for ep in range(episodes):
            # env reset between episodes; the filter state, previous action and reward carry over
            resets = [env.reset(seed=episode_seed(seed, i, ep), options={"task": int(k)})
                      for env, i, k in zip(envs, trial_ids, targets)]
            if any(info["task"] != int(k) for (_, info), k in zip(resets, targets)):
                raise RuntimeError("an evaluation env did not take the trial's target task")
            obs = [o for o, _ in resets]
            noise = ([np.random.default_rng(derive_seed(seed, i, ep, SHIFT_STREAM)) for i in trial_ids]
                     if self.action_noise > 0 or self.obs_noise > 0 else [])
            for t in range(T):
                obs_t = _stack_obs(obs, keys)
                if self.obs_noise > 0 and STATE in obs_t:
                    obs_t[STATE] = obs_t[STATE] + torch.from_numpy(np.stack(
                        [g.normal(0.0, self.obs_noise, obs_t[STATE].shape[1:]) for g in noise])).float()
                if frames is not None:
                    frames = _add_frame(frames, envs[0], obs[0])
                belief, state = filter_module.step(state, obs_t, prev_action, reward)
                action = policy(belief).detach().float().cpu().clamp(-1.0, 1.0)
                executed = action.numpy()
                if self.action_noise > 0:
                    executed = np.clip(executed + np.stack([g.normal(0.0, self.action_noise, executed.shape[1:])
                                                            for g in noise]), -1.0, 1.0)
                steps = [env.step(a) for env, a in zip(envs, executed)]
                obs = [s[0] for s in steps]
                r = np.array([s[1] for s in steps], dtype=np.float32)
                ok = np.array([s[4]["success"] for s in steps])
                returns[:, ep] += r
                success_any[:, ep] |= ok
                if t == T - 1:
                    success[:, ep] = ok
                    wrong[:, ep] = [s[4]["wrong_drawer_open"] for s in steps]
                    opened[:, ep] = [s[4]["opened"] for s in steps]
                if record:
                    rec["obs"].append(obs_t)
                    rec["action"].append(action)
                    rec["reward"].append(torch.from_numpy(r)[:, None])
                    rec["belief"].append(belief.float().cpu())
                prev_action, reward = action, torch.from_numpy(r)[:, None]
        trials = [{"trial": int(i), "target": int(k), "success": success[j].tolist(),
                   "success_any": success_any[j].tolist(), "wrong_drawer_open": wrong[j].tolist(),
                   "opened": opened[j].tolist(), "return": returns[j].tolist()} for j, (i, k) in enumerate(zip(trial_ids, targets))]
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
        out[key] = x.permute(0, 3, 1, 2).contiguous() if key == PIXELS else x.float()
    return out


def _add_frame(frames: list[np.ndarray] | None, env: SawyerTwoDrawersEnv, obs: dict[str, np.ndarray]):
    if frames is None:
        return None
    try:
        frames.append(obs[PIXELS] if PIXELS in obs else env.render())
    except Exception as err:  # noqa: BLE001 - no GL: no video
        warnings.warn(f"evaluation video skipped: rendering failed ({err})", stacklevel=2)
        return None
    return frames


def _dataset_layout(rec, keys, trial_ids, targets, episodes, T) -> TensorDict:
    n = len(trial_ids)
    L = episodes * T
    fields: dict[Any, torch.Tensor] = {key: torch.stack([o[key] for o in rec["obs"]], 1) for key in keys}
    fields[ACTION] = torch.stack(rec["action"], 1)
    fields[REWARD] = torch.stack(rec["reward"], 1)
    fields[ORIGINAL_REWARD] = fields[REWARD].clone()
    step = torch.arange(T).repeat(episodes).expand(n, L)
    fields[SEGMENT_START] = (step == 0)[..., None].clone()
    fields[STEP] = step.clone()
    fields[SEGMENT] = torch.arange(episodes).repeat_interleave(T).expand(n, L).clone()
    task = torch.as_tensor(np.asarray(targets), dtype=torch.int64)[:, None].expand(n, L)
    fields[TASK], fields[TARGET_TASK] = task.clone(), task.clone()
    fields[ROLLOUT] = torch.as_tensor(list(trial_ids), dtype=torch.int64)[:, None].expand(n, L).clone()
    return TensorDict(fields, batch_size=[n, L])


def run_trials(model: Any, env_config: EnvConfig | dict[str, Any] | None = None, trials: int = 20, episodes: int = 3,
               num_envs: int | None = None, seed: int = 0, success_metric: str = "last", record: bool = False,
               video: bool = False, runner: TrialRunner | None = None, shift: Any = None) -> EvalResult:
    """Evaluate a :class:`~lightning_modules.cql.module.LatentCQLModule` (uses ``model.filter`` and ``model.act``).

    ``env_config`` defaults to the one stored with the model (the dataset's). ``num_envs`` defaults to ``min(trials,
    32)``; pass a ``runner`` to reuse envs. ``shift``: a :class:`~lightning_modules.evaluation.shifts.Shift` applied
    to those env parameters and to the loop (action / observation noise).
    """
    if runner is not None and shift is not None:
        raise ValueError("run_trials: pass a shift or a runner, not both (a runner's envs and noise are fixed)")
    if runner is None:
        cfg = eval_env_config(model.filter, env_config if env_config is not None else model.env_config)
        noise = {}
        if shift is not None:
            cfg = shift.env_config(cfg)
            noise = dict(action_noise=shift.action_noise, obs_noise=shift.obs_noise)
        runner = TrialRunner(cfg, num_envs or min(trials, 32), **noise)
        close = True
    else:
        close = False
    try:
        return runner.run(model.filter, model.act, trials, episodes, seed, success_metric, record, video)
    finally:
        if close:
            runner.close()
