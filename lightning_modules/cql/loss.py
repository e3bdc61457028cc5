"""Phase 2's objective: TorchRL's ``CQLLoss`` with an optional, leak-free Lagrange multiplier.

:class:`LatentCQLLoss` composes ``CQLLoss``'s own term methods (``q_loss``, ``cql_loss``, ``actor_loss``,
``alpha_loss``); each term only reaches its own parameters (critics: ``loss_qvalue`` / ``loss_cql``; actor:
``loss_actor`` and ``loss_bc``; ``log_alpha``: ``loss_alpha``; ``log_alpha_prime``: ``loss_alpha_prime``).

``bc_weight > 0`` adds ``loss_bc = bc_weight * mean ||tanh(loc(b)) - a_data||^2`` to the actor (TD3+BC's
regulariser, on the policy's deterministic action): it keeps the actor near actions the data contains. When the
transitions carry ``bc_mask`` (``transitions.BC_MASK``), the term is the mean over the transitions marked 1 only.

``with_lagrange=True`` tunes the conservative weight with a Lagrange multiplier, but NOT through TorchRL's
``alpha_prime_loss``: that term is computed from the undetached conservative gap, so summing it into the loss
pushes the critics' gradient towards *less* conservatism (``tests/cql/test_cql_module.py::
test_torchrl_lagrange_term_leaks_into_critic`` shows it). Here the multiplier learns from the detached gap and the
critics see ``alpha_prime.detach() * loss_cql``. ``conservative=False`` drops the conservative term (SAC on
beliefs: the "No CQL" ablation).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import CQLLoss

from envs.keys import ACTION
from lightning_modules.cql.transitions import BC_MASK

LOSS_TERMS = ("loss_qvalue", "loss_cql", "loss_actor", "loss_alpha")  # logged under losses/
LAGRANGE_TERM = "loss_alpha_prime"
BC_TERM = "loss_bc"  # optional behaviour-cloning term of the actor (bc_weight > 0)
DIAGNOSTICS = ("q_data", "alpha", "entropy")  # logged under train/ and val/
LAGRANGE_DIAGNOSTIC = "alpha_prime"
TOTAL = "loss"  # the sum that is back-propagated


class LatentCQLLoss(CQLLoss):
    """``CQLLoss`` whose forward returns every term, the diagnostics and the total (see the module docstring).

    Args: those of ``CQLLoss``, plus ``conservative`` (keep the conservative term) and, with ``with_lagrange``,
    ``lagrange_thresh`` (the target gap), and ``bc_weight`` (behaviour cloning on the actor, 0 = off). The input
    TensorDict is never modified.
    """

    def __init__(self, *args: Any, conservative: bool = True, with_lagrange: bool = False,
                 lagrange_thresh: float = 5.0, bc_weight: float = 0.0, **kwargs: Any):
        with_lagrange = bool(with_lagrange and conservative)
        super().__init__(*args, with_lagrange=with_lagrange, lagrange_thresh=lagrange_thresh, **kwargs)
        self.conservative = bool(conservative)
        self.lagrange_thresh = float(lagrange_thresh)
        self.bc_weight = float(bc_weight)

    @property
    def out_keys(self) -> list[str]:
        extra = [LAGRANGE_TERM, LAGRANGE_DIAGNOSTIC] if self.with_lagrange else []
        bc = [BC_TERM] if self.bc_weight > 0 else []
        return [TOTAL, *LOSS_TERMS, *bc, *DIAGNOSTICS, *extra]

    @out_keys.setter
    def out_keys(self, values) -> None:  # CQLLoss's constructor assigns it; the keys above are fixed
        pass

    @property
    def loss_terms(self) -> tuple[str, ...]:
        """The loss terms to log (the Lagrange term only when tuned, the BC term only when weighted)."""
        bc = (BC_TERM,) if self.bc_weight > 0 else ()
        return (*LOSS_TERMS, *bc, LAGRANGE_TERM) if self.with_lagrange else (*LOSS_TERMS, *bc)

    @property
    def diagnostics(self) -> tuple[str, ...]:
        return (*DIAGNOSTICS, LAGRANGE_DIAGNOSTIC) if self.with_lagrange else DIAGNOSTICS

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        td = tensordict.copy()  # the terms write pred_q1 / pred_q2 / cql_q*_loss into it
        q_loss, _ = self.q_loss(td)
        out: dict[str, torch.Tensor] = {"loss_qvalue": q_loss, "q_data": td.get(self.tensor_keys.pred_q1).detach().mean()}
        cql_loss = self.cql_loss(td)[0] if self.conservative else q_loss.new_zeros(())
        out["loss_cql"] = cql_loss
        actor_loss, actor_meta = self.actor_loss(td)
        alpha_loss, _ = self.alpha_loss(actor_meta)
        out["loss_actor"], out["loss_alpha"] = actor_loss, alpha_loss
        out["alpha"] = self._alpha.detach()
        out["entropy"] = -actor_meta[self.tensor_keys.log_prob].detach().mean()
        total = q_loss + actor_loss + alpha_loss
        if self.bc_weight > 0:
            out[BC_TERM] = self.bc_weight * self.bc_loss(tensordict)
            total = total + out[BC_TERM]
        if self.with_lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            # the multiplier sees the detached gap (per critic), the critics a detached multiplier
            out[LAGRANGE_TERM] = -alpha_prime * (cql_loss.detach() / 2 - self.lagrange_thresh)
            out[LAGRANGE_DIAGNOSTIC] = alpha_prime.detach()
            total = total + alpha_prime.detach() * cql_loss + out[LAGRANGE_TERM]
        else:
            total = total + cql_loss
        out[TOTAL] = total
        return TensorDict(out, batch_size=[])

    def bc_loss(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Mean squared distance between the actor's deterministic action and the data's action (actor only), over
        the transitions whose ``bc_mask`` is 1 when the input has one."""
        td = tensordict.select(*self.actor_network.in_keys, strict=False).copy()
        with set_exploration_type(ExplorationType.DETERMINISTIC), \
                self.actor_network_params.to_module(self.actor_network):
            action = self.actor_network(td)[ACTION]
        sq = (action - tensordict[ACTION].detach()).pow(2).sum(-1)
        mask = tensordict.get(BC_MASK, None)
        if mask is None:
            return sq.mean()
        mask = mask.reshape(sq.shape).to(sq.dtype)
        return (sq * mask).sum() / mask.sum().clamp(min=1.0)  # the mean over the kept transitions (0 if none)
