"""Learning curves over seeds: success per episode against phase-2 updates, from the periodic online evaluations.

Every phase-2 run of the main job (``<root>/<method>/seed_<k>/phase2/``) keeps its periodic evaluations in
``eval_results.json``. :func:`collect_learning_curves` groups them by method; :func:`learning_curve_figure` draws
mean and 95% interval over seeds per episode index; :func:`write_tensorboard_curves` writes the same as TensorBoard
scalars under ``<root>/learning_curves/<method>/`` (tags ``learning_curve/episode_<k>``: mean, ci_low, ci_high).
These are diagnostics of training: the reported result is the final checkpoint on fresh trials.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from lightning_modules.evaluation.results import METHOD_LABELS, RESULTS_FILE

PHASE2_DIR = "phase2"
TB_DIR = "learning_curves"


@dataclass
class LearningCurve:
    """One method: ``steps`` [S] shared by its seeds, ``per_seed`` success [seeds, S, episodes]."""

    method: str
    seeds: list[str]
    steps: np.ndarray
    per_seed: np.ndarray

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.method, self.method)

    @property
    def mean(self) -> np.ndarray:
        return self.per_seed.mean(axis=0)

    @property
    def ci95(self) -> np.ndarray:
        """Student-t half-width over seeds (zero with one seed: no interval across seeds)."""
        n = self.per_seed.shape[0]
        if n < 2:
            return np.zeros_like(self.mean)
        return float(stats.t.ppf(0.975, n - 1)) * self.per_seed.std(axis=0, ddof=1) / math.sqrt(n)


def collect_learning_curves(root: str | Path) -> list[LearningCurve]:
    """Every ``<root>/<method>/<seed>/phase2/eval_results.json``; steps common to all seeds of a method."""
    root = Path(root)
    groups: dict[str, list[tuple[str, dict[int, list[float]]]]] = {}
    for path in sorted(root.glob(f"*/*/{PHASE2_DIR}/{RESULTS_FILE}")):
        evaluations = json.loads(path.read_text()).get("evaluations") or []
        by_step = {int(e["step"]): e["summary"]["success_per_episode"] for e in evaluations}
        if by_step:
            groups.setdefault(path.parent.parent.parent.name, []).append((path.parent.parent.name, by_step))
    curves = []
    for method in [m for m in METHOD_LABELS if m in groups] + sorted(set(groups) - set(METHOD_LABELS)):
        runs = groups[method]
        steps = sorted(set.intersection(*(set(r) for _, r in runs)))
        if not steps:
            continue
        episodes = min(len(r[s]) for _, r in runs for s in steps)
        per_seed = np.array([[r[s][:episodes] for s in steps] for _, r in runs], dtype=float)
        curves.append(LearningCurve(method, [seed for seed, _ in runs], np.array(steps), per_seed))
    return curves


def learning_curve_figure(curves: list[LearningCurve]):
    """One panel per episode index: success vs updates, mean and 95% band over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    episodes = max(c.per_seed.shape[2] for c in curves)
    fig, axes = plt.subplots(1, episodes, figsize=(3.6 * episodes, 3.2), sharey=True, squeeze=False)
    for k, ax in enumerate(axes[0]):
        for c in curves:
            if k >= c.per_seed.shape[2]:
                continue
            mean, half = c.mean[:, k], c.ci95[:, k]
            ax.plot(c.steps, mean, marker=".", label=f"{c.label} ({len(c.seeds)} seeds)")
            ax.fill_between(c.steps, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), alpha=0.2)
        ax.set_title(f"episode {k + 1}")
        ax.set_xlabel("phase-2 updates")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success (periodic online evaluation)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def write_tensorboard_curves(curves: list[LearningCurve], root: str | Path) -> Path:
    """TensorBoard scalars ``learning_curve/episode_<k>`` (mean, ci_low, ci_high) per method under
    ``<root>/learning_curves/<method>/``; the folder is rewritten whole (no duplicated steps on a rerun)."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    folder = Path(root) / TB_DIR
    shutil.rmtree(folder, ignore_errors=True)
    for c in curves:
        writer = SummaryWriter(str(folder / c.method))
        for i, step in enumerate(c.steps):
            for k in range(c.per_seed.shape[2]):
                m, h = float(c.mean[i, k]), float(c.ci95[i, k])
                writer.add_scalar(f"learning_curve/episode_{k + 1}/mean", m, int(step))
                writer.add_scalar(f"learning_curve/episode_{k + 1}/ci_low", max(m - h, 0.0), int(step))
                writer.add_scalar(f"learning_curve/episode_{k + 1}/ci_high", min(m + h, 1.0), int(step))
        writer.close()
    return folder
