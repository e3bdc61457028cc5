"""The argument checks of :class:`~lightning_modules.cql.module.LatentCQLModule` (every problem named at once)."""

from __future__ import annotations

from typing import Any, Mapping

from lightning_modules.cql.stabilizers import LR_SCHEDULES
from lightning_modules.cql.transitions import BC_FILTERS


def check_hparams(hp: Mapping[str, Any]) -> None:
    """``ValueError`` naming every out-of-range phase-2 hyper-parameter (before any network is built)."""
    gamma, n_step, tau, cql_weight = hp["gamma"], hp["n_step"], hp["tau"], hp["cql_weight"]
    transition_batch_size, belief_cache_batches = hp["transition_batch_size"], hp["belief_cache_batches"]
    refresh_every, lr_schedule, lr_final = hp["refresh_every"], hp["lr_schedule"], hp["lr_final"]
    lr_decay_steps, actor_polyak, bc_weight = hp["lr_decay_steps"], hp["actor_polyak"], hp["bc_weight"]
    problems = []
    if not 0.0 <= gamma <= 1.0:
        problems.append(f"gamma must be in [0, 1], got {gamma}")
    if n_step < 1:
        problems.append(f"n_step must be >= 1, got {n_step}")
    if not 0.0 < tau <= 1.0:
        problems.append(f"tau must be in (0, 1], got {tau}")
    if cql_weight < 0:
        problems.append(f"cql_weight must be >= 0, got {cql_weight}")
    if transition_batch_size is not None and transition_batch_size < 1:
        problems.append(f"transition_batch_size must be >= 1 or None, got {transition_batch_size}")
    if belief_cache_batches < 0 or refresh_every < 1:
        problems.append(f"belief_cache_batches must be >= 0 and refresh_every >= 1, got {belief_cache_batches}, {refresh_every}")
    if lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if not 0.0 <= lr_final <= 1.0 or (lr_decay_steps is not None and lr_decay_steps < 1):
        problems.append(f"lr_final must be in [0, 1] and lr_decay_steps >= 1 or None, got {lr_final}, {lr_decay_steps}")
    if not 0.0 <= actor_polyak < 1.0:
        problems.append(f"actor_polyak must be in [0, 1), got {actor_polyak}")
    if bc_weight < 0:
        problems.append(f"bc_weight must be >= 0, got {bc_weight}")
    if hp["bc_filter"] not in BC_FILTERS:
        problems.append(f"bc_filter must be one of {BC_FILTERS}, got {hp['bc_filter']!r}")
    if belief_cache_batches > 0 and transition_batch_size is None:
        problems.append("a belief cache needs transition_batch_size (transitions sampled per update)")
    if problems:
        raise ValueError("LatentCQLModule: " + "; ".join(problems))
