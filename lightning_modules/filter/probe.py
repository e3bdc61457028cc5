"""Task-inference probe: how well a belief predicts the hidden target task (a linear read-out).

A multinomial logistic regression (L2-regularised, features standardised with the fit split's statistics)
is fitted by full-batch LBFGS on one half of a set of beliefs and scored on the other half. The filter is
never trained through it; it is a diagnostic: after training, beliefs before any evidence should give chance
accuracy and beliefs after a segment that reveals the task near-perfect accuracy.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

from envs.keys import SEGMENT, TARGET_TASK, TASK

PROBE_PREFIX = "val/probe_acc_"
HP_PROBE_MEMORY = "hp/probe_acc_memory"


def fit_probe(x_fit: torch.Tensor, y_fit: torch.Tensor, num_classes: int, l2: float = 1e-2,
              max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``softmax(((x - mu) / sd) @ W + b)``; returns (W, b, mu, sd). Runs in fp64 on the CPU with grad enabled."""
    x = x_fit.detach().double().cpu()
    y = y_fit.detach().long().cpu()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    z = (x - mu) / sd
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, y) + l2 * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach(), mu, sd


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-2,
                   groups: torch.Tensor | None = None) -> dict[str, float]:
    """Fit on even rows, score on odd rows. Returns ``{"acc": ...}`` plus ``{"acc_<g>": ...}`` per group value.

    ``groups`` (bool or int [N], optional) splits the held-out accuracy, e.g. by whether a segment was rewarded.
    """
    n = len(features)
    if n < 4:
        return {}
    fit, held = torch.arange(0, n, 2), torch.arange(1, n, 2)
    W, b, mu, sd = fit_probe(features[fit], labels[fit], num_classes, l2)
    z = (features[held].double().cpu() - mu) / sd
    correct = ((z @ W + b).argmax(-1) == labels[held].cpu()).double()
    out = {"acc": correct.mean().item()}
    if groups is not None:
        g = groups[held].cpu()
        for value in torch.unique(g).tolist():
            out[f"acc_{value}"] = correct[g == value].mean().item()
    return out


class ProbeCollector:
    """Accumulates beliefs at chosen sequence positions over validation batches (on the CPU).

    ``add(name, features, labels, groups)`` appends; ``compute(num_classes)`` fits one probe per name and
    clears the store (never kept in a checkpoint: plain tensors in a dict that is emptied after use).
    """

    def __init__(self):
        self._data: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = defaultdict(list)

    def add(self, name: str, features: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        self._data[name].append((features.detach().float().cpu(), labels.detach().cpu(),
                                 None if groups is None else groups.detach().cpu()))

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()

    def compute(self, num_classes: int, l2: float = 1e-2) -> dict[str, dict[str, float]]:
        results = {}
        for name, parts in self._data.items():
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            g = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
            results[name] = probe_accuracy(x, y, num_classes, l2, g)
        self.clear()
        return results


def collect_probe_positions(probe: ProbeCollector, beliefs: torch.Tensor, batch: TensorDictBase) -> None:
    """Add a validation batch's beliefs [B, L, D] at the probed positions to ``probe``.

    Positions: ``init`` (t = 0), ``seg{k}`` (the last step of segment k, grouped by whether segment k came from
    the target task) and ``seg{k+1}_step{j}`` (inside the NEXT episode after the reset, j = 1 and T/2: only what
    the filter carried over can tell the task there), grouped by the preceding segment.
    """
    target = batch[TARGET_TASK][:, 0]
    segment = batch[SEGMENT] if SEGMENT in batch.keys() else torch.zeros_like(batch[TARGET_TASK])
    seg = segment[0]
    ends = torch.nonzero(torch.cat([seg[1:] != seg[:-1], torch.ones(1, dtype=torch.bool, device=seg.device)])).squeeze(1)
    probe.add("init", beliefs[:, 0], target)
    L = beliefs.shape[1]
    start = 0
    for end in ends.tolist():
        k, length = int(seg[end]), end - start + 1
        on_target = (batch[TASK][:, end] == target).long() if TASK in batch.keys() else None
        probe.add(f"seg{k}", beliefs[:, end], target, on_target)
        for j in sorted({1, length // 2}):
            t = end + 1 + j
            if t < L and int(seg[t]) == k + 1:
                probe.add(f"seg{k + 1}_step{j}", beliefs[:, t], target, on_target)
        start = end + 1


def probe_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``val/probe_acc_*`` metric names for :meth:`ProbeCollector.compute`'s results, plus ``hp/probe_acc_memory``
    (= ``val/probe_acc_seg1_step1``: the task inside the next episode, memory only)."""
    metrics = {}
    for name, res in results.items():
        prefix = "_prev" if "_step" in name else ""
        for key, value in res.items():
            suffix = {"acc": "", "acc_1": prefix + "_target", "acc_0": prefix + "_other"}.get(key, "_" + key)
            if name == "init" and suffix:
                continue
            metrics[f"{PROBE_PREFIX}{name}{suffix}"] = value
    memory = metrics.get(f"{PROBE_PREFIX}seg1_step1")
    if memory is not None:
        metrics[HP_PROBE_MEMORY] = memory
    return metrics
