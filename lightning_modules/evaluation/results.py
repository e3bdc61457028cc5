"""Evaluation outputs: the results JSON, the ``eval/*`` scalars and figures, and the paper's Figure 2 over runs.

A run directory holds ``eval_results.json`` (written by
:class:`~lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation` or ``python -m
lightning_modules.evaluate``): ``{"env_config", "evaluations": [{"step", "summary": {"success_per_episode", ...},
"trials": [...]}, ...]}``. The main pipeline lays runs out as ``<root>/<method>/seed_<k>/``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from envs.atomic import write_json_atomic

RESULTS_FILE = "eval_results.json"
EVAL = "eval/"  # the namespace of the online-evaluation scalars
METHOD_LABELS = {"ours": "Ours", "no_expl": "No Expl", "no_cql": "No CQL"}


# ---------------------------------------------------------------------- one run
def earlier_evaluations(path: Path, step: int) -> list[dict[str, Any]]:
    """The evaluations at steps <= ``step`` in an existing results file (none when it is missing or unreadable)."""
    try:
        previous = json.loads(Path(path).read_text()).get("evaluations", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in previous if isinstance(e, dict) and isinstance(e.get("step"), int) and e["step"] <= step]


def write_results(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write a results JSON atomically (:func:`envs.atomic.write_json_atomic`)."""
    return write_json_atomic(path, data)


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
    out = {f"{EVAL}success_ep{k + 1}": float(v) for k, v in enumerate(rates)}
    out.update({f"{EVAL}return_ep{k + 1}": float(v) for k, v in enumerate(summary["return_per_episode"])})
    out[f"{EVAL}success_last"] = float(rates[-1])
    out[f"{EVAL}success_mean"] = float(np.mean(rates))  # the config's checkpoint monitor (fewer ties than success_last)
    out[f"{EVAL}wrong_drawer_last"] = float(summary["wrong_drawer_open_per_episode"][-1])
    if "revisit_failed_rate" in summary:
        out[f"{EVAL}revisit_failed"] = float(summary["revisit_failed_rate"])
    out[f"{EVAL}episodes_per_s"] = float(summary["episodes_per_second"])
    return out


# ---------------------------------------------------------------------- Figure 2 over runs
@dataclass
class MethodCurve:
    """Success per episode index of one method: the mean over seeds and a 95% confidence half-width."""

    label: str
    seeds: list[str]
    per_seed: np.ndarray  # [seeds, episodes]
    trials: int           # trials per seed (smallest)
    num_tasks: int = 2    # drawers of the scene (from the evaluations' target counts)

    @property
    def mean(self) -> np.ndarray:
        return self.per_seed.mean(axis=0)

    @property
    def ci95(self) -> np.ndarray:
        """Across seeds (Student-t interval, n - 1 degrees of freedom) when there are several; else the normal
        approximation of the binomial interval over the trials of the one seed."""
        n = self.per_seed.shape[0]
        if n > 1:
            t = float(stats.t.ppf(0.975, n - 1))
            return t * self.per_seed.std(axis=0, ddof=1) / math.sqrt(n)
        p = self.per_seed[0]
        return float(stats.norm.ppf(0.975)) * np.sqrt(p * (1 - p) / max(self.trials, 1))


def load_evaluation(path: str | Path, which: str = "last") -> dict:
    """One evaluation entry of a results JSON: the ``last`` one or the ``best`` by mean success after episode 1."""
    data = json.loads(Path(path).read_text())
    evaluations = data.get("evaluations") or []
    if not evaluations:
        raise ValueError(f"{path} holds no evaluations")
    if which == "last":
        return evaluations[-1]
    if which == "best":
        return max(evaluations, key=lambda e: np.mean(e["summary"]["success_per_episode"][1:] or [0.0]))
    raise ValueError(f"which must be 'last' or 'best', got {which!r}")


def collect_curves(root: str | Path, which: str = "last") -> list[MethodCurve]:
    """Every ``<root>/<method>/<seed>/eval_results.json``, grouped by method (known methods first)."""
    root = Path(root)
    groups: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(root.glob(f"*/*/{RESULTS_FILE}")):
        method, seed = path.parent.parent.name, path.parent.name
        groups.setdefault(method, []).append((seed, load_evaluation(path, which)))
    if not groups:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}/<method>/<seed>/")
    order = [m for m in METHOD_LABELS if m in groups] + sorted(m for m in groups if m not in METHOD_LABELS)
    curves = []
    for method in order:
        entries = groups[method]
        episodes = min(len(e["summary"]["success_per_episode"]) for _, e in entries)
        per_seed = np.array([e["summary"]["success_per_episode"][:episodes] for _, e in entries], dtype=float)
        trials = min(int(e["summary"]["trials"]) for _, e in entries)
        num_tasks = max(len(e["summary"].get("target_counts") or [0, 0]) for _, e in entries)
        curves.append(MethodCurve(METHOD_LABELS.get(method, method), [s for s, _ in entries], per_seed, trials,
                                  num_tasks))
    return curves


def figure2(curves: list[MethodCurve], title: str | None = None, num_tasks: int = 2):
    """Matplotlib figure: success rate against episode index (1 = no exploration yet), 95% CI bands, and the
    optimal explorer's line (a new drawer each episode: success in episode k = min(k / N, 1))."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for curve in curves:
        x = np.arange(1, curve.mean.shape[0] + 1)
        ax.plot(x, curve.mean, marker="o", label=f"{curve.label} ({len(curve.seeds)} seed{'s' * (len(curve.seeds) > 1)})")
        ax.fill_between(x, np.clip(curve.mean - curve.ci95, 0, 1), np.clip(curve.mean + curve.ci95, 0, 1), alpha=0.2)
    episodes = max(c.mean.shape[0] for c in curves)
    k = np.arange(1, episodes + 1)
    ax.plot(k, np.minimum(k / num_tasks, 1.0), "k:", label="optimal explorer")
    ax.set_xlabel("episode of the trial (episodes before it = exploration rollouts)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(np.arange(1, max(c.mean.shape[0] for c in curves) + 1))
    ax.set_title(title or f"{num_tasks} drawers: success vs exploration episodes")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def results_table(curves: list[MethodCurve]) -> str:
    """Markdown table: success per episode (mean +- 95% CI) for each method."""
    episodes = max(c.mean.shape[0] for c in curves)
    lines = ["| method | seeds | trials/seed | " + " | ".join(f"episode {e + 1}" for e in range(episodes)) + " |",
             "|---|---:|---:|" + "---:|" * episodes]
    for c in curves:
        cells = [f"{m:.2f} ± {h:.2f}" for m, h in zip(c.mean, c.ci95)]
        lines.append(f"| {c.label} | {len(c.seeds)} | {c.trials} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
