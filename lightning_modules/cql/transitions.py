"""Phase 2's data: transitions cut from belief sequences (pure functions) and the belief cache.

A data batch [B, L] becomes beliefs ``b_0..b_{L-1}`` (the frozen filter); transitions are

    (b_t, a_t, r_{t+1} = ("next", "reward")[t] (relabelled), b_{t+1}),   t = 0 .. L-2,

with ``done = terminated = False`` everywhere: a segment boundary inside a meta-trajectory is not terminal (the
belief carries over, the value of what was learnt in one episode flows into the next), and the last step of a
sequence, which has no successor, is dropped. ``n_step = n`` bootstraps n logged steps on (discounted reward sum).

:func:`bc_segment_mask` marks the steps whose action the behaviour-cloning term imitates with ``bc_filter``
``identified`` (rewarded segments whose target the earlier segments identify) or ``search`` (also the segments
that try the drawer a systematic search tries next).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict

from envs.keys import ACTION, DONE, ORIGINAL_REWARD, REWARD, SEGMENT, TARGET_TASK, TASK, TERMINATED
from lightning_modules.cql.networks import BELIEF

BC_MASK = "bc_mask"  # 1 where the behaviour-cloning term imitates the transition's action (bc_filter)
CACHE_FIELDS = ("belief", "action", "reward", BC_MASK)
BC_FILTERS = ("all", "identified", "search")


def bc_segment_mask(batch: TensorDict, num_tasks: int, rule: str = "identified") -> torch.Tensor:
    """[B, L, 1] float: 1 on the steps of the segments whose actions the behaviour-cloning term imitates.

    A segment counts only if its rollout opened its own drawer (the logged reward, ``ORIGINAL_REWARD``; a failed
    attempt opens nothing). Walking the segments in order, what the belief can know is the target once a segment
    was rewarded, else which drawers were opened without reward (not the target). ``identified``: the rewarded
    segments whose target the segments before identify (an earlier rewarded segment, or ``num_tasks - 1`` other
    drawers opened); elsewhere the data's drawer is a guess. ``search``: also the segments whose drawer is the one a
    systematic search tries next (the lowest-index drawer not yet opened without reward) — so the actor imitates
    one search, never a tie between equally likely drawers. Uses only the data's own labels (the task of each
    segment, the drawn target, the rewards), never online interaction."""
    if rule not in ("identified", "search"):
        raise ValueError(f"bc_segment_mask: rule must be 'identified' or 'search', got {rule!r}")
    task, target, segment = batch[TASK].long(), batch[TARGET_TASK].long(), batch[SEGMENT].long()
    reward = batch[REWARD].reshape(task.shape).float()
    logged = batch.get(ORIGINAL_REWARD, None)
    opened = torch.ones_like(reward) if logged is None else logged.reshape(task.shape).float()
    B, K, dev = task.shape[0], int(segment.max()) + 1, task.device
    seg = segment.clamp(min=0)
    rewarded = torch.zeros(B, K, device=dev).scatter_reduce(1, seg, reward, "amax") > 0
    did_open = torch.zeros(B, K, device=dev).scatter_reduce(1, seg, opened, "amax") > 0
    seg_task = torch.zeros(B, K, dtype=torch.long, device=dev).scatter_reduce(1, seg, task, "amax")
    failed = torch.zeros(B, num_tasks, dtype=torch.bool, device=dev)  # opened without reward: not the target
    found = torch.full((B,), -1, dtype=torch.long, device=dev)       # the rewarded drawer, -1 until one is
    keep = torch.zeros(B, K, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    for k in range(K):  # K is small (the segments of a meta-trajectory)
        if rule == "identified":
            known = (found >= 0) | (failed.sum(-1) >= num_tasks - 1)
            keep[:, k] = known & rewarded[:, k]
        else:  # search: the found drawer, else the lowest-index drawer not yet failed
            next_try = torch.where(found >= 0, found, (~failed).float().argmax(-1))
            keep[:, k] = (seg_task[:, k] == next_try) & did_open[:, k]
        found = torch.where((found < 0) & rewarded[:, k], seg_task[:, k], found)
        miss = did_open[:, k] & ~rewarded[:, k]
        failed[rows[miss], seg_task[miss, k]] = True
    return keep.gather(1, seg).float().unsqueeze(-1)


def flat_transitions(beliefs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                     index: torch.Tensor | None = None, n_step: int = 1, gamma: float = 1.0,
                     bc_mask: torch.Tensor | None = None) -> TensorDict:
    """Transitions from sequences [B, L, ...] as a flat TensorDict (beliefs raw, not standardised).

    ``n_step = 1``: (b_t, a_t, r_{t+1}, b_{t+1}) for t < L-1. ``n_step = n``: (b_t, a_t, R, b_{t+n}) with the
    discounted sum ``R = sum_{k<n} gamma^k r_{t+1+k}`` of the logged rewards, for t < L-n (the TD target then
    discounts by ``gamma ** n``). ``index`` (optional) selects flat transitions (``row * (L - n) + t``).
    done / terminated are False everywhere (segment boundaries are not terminal).
    """
    B, L = beliefs.shape[:2]
    if n_step < 1 or L <= n_step:
        raise ValueError(f"sequences need more than n_step={n_step} steps to make a transition, got L={L}")
    span = L - n_step
    if index is None:
        index = torch.arange(B * span, device=beliefs.device)
    row, t = index // span, index % span
    b, nb, a = beliefs[row, t], beliefs[row, t + n_step], actions[row, t]
    steps = torch.arange(n_step, device=beliefs.device)
    discounts = torch.full((n_step,), float(gamma), device=beliefs.device) ** steps
    window = rewards[row[:, None], t[:, None] + steps].reshape(len(index), n_step).float()
    r = (window * discounts).sum(-1, keepdim=True)
    false = torch.zeros(b.shape[0], 1, dtype=torch.bool, device=b.device)
    out = TensorDict({BELIEF: b, ACTION: a.float(), REWARD: r.float(), DONE: false, TERMINATED: false.clone(),
                      ("next", BELIEF): nb}, batch_size=[b.shape[0]], device=b.device)
    if bc_mask is not None:
        out[BC_MASK] = bc_mask[row, t].float()
    return out


def random_index(rows: int, length: int, n_step: int, count: int, device: torch.device | str) -> torch.Tensor:
    """``count`` flat transition indices drawn uniformly (global RNG) from ``rows`` sequences of ``length`` steps."""
    return torch.randint(rows * (length - n_step), (count,), device=device)


class BeliefCache:
    """A ring buffer of the beliefs, actions and rewards of the last ``batches`` data batches.

    Its state (:meth:`state_dict`: plain CPU tensors and ints) goes into phase-2 checkpoints, so a resumed run
    samples from the same cache; a restored state waits (``pending``) until :meth:`materialize` puts it on the
    module's device at the first training step.
    """

    def __init__(self, batches: int):
        self.batches = batches
        self.data: dict[str, torch.Tensor] | None = None
        self.filled = 0
        self.next = 0
        self.pending: dict[str, Any] | None = None

    @property
    def capacity(self) -> int | None:
        return None if self.data is None else self.data["belief"].shape[0]

    def is_full(self) -> bool:
        return self.data is not None and self.filled >= self.capacity

    def clear(self) -> None:
        """Forget the buffer (kept: a pending restored state)."""
        self.data, self.filled, self.next = None, 0, 0

    def insert(self, beliefs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
               bc_mask: torch.Tensor | None = None) -> None:
        """Add sequences [B, L, ...] (over the oldest ones once full); ``bc_mask`` [B, L, 1] defaults to ones."""
        B, L = beliefs.shape[:2]
        capacity = self.batches * B
        if self.data is None or self.capacity != capacity or self.data["belief"].shape[1:] != beliefs.shape[1:]:
            self.data = {"belief": beliefs.new_zeros(capacity, L, beliefs.shape[-1]),
                         "action": beliefs.new_zeros(capacity, L, actions.shape[-1]),
                         "reward": beliefs.new_zeros(capacity, L, 1), BC_MASK: beliefs.new_ones(capacity, L, 1)}
            self.filled = self.next = 0
        rows = (torch.arange(B, device=beliefs.device) + self.next) % capacity
        self.data["belief"][rows] = beliefs
        self.data["action"][rows] = actions.to(beliefs.device).float()
        self.data["reward"][rows] = rewards.to(beliefs.device).float()
        self.data[BC_MASK][rows] = 1.0 if bc_mask is None else bc_mask.to(beliefs.device).float()
        self.next = (self.next + B) % capacity
        self.filled = min(capacity, self.filled + B)

    def sample(self, count: int, n_step: int, gamma: float) -> TensorDict:
        """``count`` random transitions from the filled part of the cache."""
        data, rows = self.data, self.filled
        index = random_index(rows, data["belief"].shape[1], n_step, count, data["belief"].device)
        return flat_transitions(data["belief"][:rows], data["action"][:rows], data["reward"][:rows], index, n_step, gamma,
                                data[BC_MASK][:rows])

    def materialize(self, device: torch.device | str) -> None:
        """Move a pending restored state onto ``device`` (no-op without one, or when a buffer exists)."""
        if self.data is None and self.pending is not None:
            pending = dict(self.pending)
            if BC_MASK not in pending:  # a checkpoint written before the mask existed: every step kept
                pending[BC_MASK] = torch.ones_like(pending["reward"])
            self.data = {k: pending[k].to(device) for k in CACHE_FIELDS}
            self.filled, self.next = int(self.pending["filled"]), int(self.pending["next"])
            self.pending = None

    def state_dict(self) -> dict[str, Any] | None:
        """Plain CPU tensors and ints (None when empty and nothing is pending)."""
        if self.data is None:
            return self.pending
        return {**{k: v.detach().cpu().clone() for k, v in self.data.items()},
                "filled": int(self.filled), "next": int(self.next)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output (applied on the next :meth:`materialize`)."""
        self.clear()
        self.pending = state
