"""The variational filter's objective as pure functions (no module state, no randomness of their own).

The paper's extended ELBO (section 3.6), per step, with the reward both an input and a reconstruction target:

    log O(o_t | s_t) + beta * log R(r_t | s_t) - KL(q(s_t | h_t, o_t, r_t) || p(s_t | h_t))

plus, with ``prior_reward_weight > 0``, ``beta * prior_reward_weight * log R(r_t | s~_t)`` for a state
``s~_t ~ p(s_t | h_t)`` that has not seen the reward (see :mod:`lightning_modules.filter.module`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from envs.keys import PIXELS
from lightning_modules.filter.rssm import REWARD_OUT


@dataclass(frozen=True)
class ElboWeights:
    """The weights of the objective's terms (the filter module's hyper-parameters of the same names)."""

    beta: float = 10.0
    reward_std: float = 1.0
    prior_reward_weight: float = 1.0
    kl_weight: float = 1.0
    free_nats: float = 0.0
    obs_std: float = 1.0
    kl_balance: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.kl_balance < 1.0:
            raise ValueError(f"kl_balance must be in (0, 1), got {self.kl_balance}")
        if min(self.beta, self.kl_weight, self.free_nats, self.prior_reward_weight) < 0 or self.reward_std <= 0:
            raise ValueError("beta, kl_weight, free_nats and prior_reward_weight must be >= 0 and reward_std > 0")
        if self.obs_std <= 0:
            raise ValueError(f"obs_std must be > 0, got {self.obs_std}")


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """x[:, t-1] at index t, zeros at t=0 (previous action / reward that arrived with o_t)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)


def gaussian_kl(mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, std_q) || N(mean_p, std_p)) summed over the last dim (computed in fp32)."""
    mean_q, std_q, mean_p, std_p = (x.float() for x in (mean_q, std_q, mean_p, std_p))
    var_ratio = (std_q / std_p).square()
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p).square() - 1.0 - var_ratio.log()).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float, event_dims: int) -> torch.Tensor:
    """log N(x; mean, std^2) summed over the last ``event_dims`` dims (fp32)."""
    d = (x.float() - mean.float()) / std
    lp = -0.5 * d.square() - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(-event_dims).sum(-1)


def balanced_kl(out: dict[str, torch.Tensor], balance: float) -> torch.Tensor:
    """KL balancing (DreamerV2): ``balance * KL(sg(q) || p) + (1 - balance) * KL(q || sg(p))`` per step.

    Its value is the KL; its gradient trains the prior ``balance / (1 - balance)`` times as hard as it pulls the
    posterior towards the prior. 0.5 is the plain KL's gradient (then the plain KL is computed, bit for bit).
    """
    q, p = (out["post_mean"], out["post_std"]), (out["prior_mean"], out["prior_std"])
    if balance == 0.5:
        return gaussian_kl(*q, *p)
    train_prior = gaussian_kl(*(x.detach() for x in q), *p)
    train_post = gaussian_kl(*q, *(x.detach() for x in p))
    return balance * train_prior + (1.0 - balance) * train_post


def elbo_loss(target_obs: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor], reward_in: torch.Tensor,
              out: dict[str, torch.Tensor], weights: ElboWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's loss (negative weighted ELBO per step, KL with free nats) and its per-step terms.

    Args:
        target_obs: normalised observations [B, L, ...] per key (the reconstruction targets), or [N, ...] for the
            N steps a key was decoded at (a random subset of the frames, :meth:`RewardRSSM.decode`).
        decoded: decoder means per observation key (same shape as its target) and :data:`REWARD_OUT` [B, L, 1].
        reward_in: r_t [B, L, 1] (the reward input, also the reward target).
        out: the filter pass (``post_mean``/``post_std``/``prior_mean``/``prior_std`` [B, L, S]).

    Returns ``(loss, terms)``; ``terms``: ``obs_nll``, ``reward_nll``, ``kl`` (per-step means) and ``elbo`` (the
    paper's ELBO per step).
    """
    # per key: the mean over the steps it was decoded at (all, or a random subset: an unbiased estimate of the mean)
    obs_ll = sum(gaussian_log_prob(target_obs[k], decoded[k], weights.obs_std, 3 if k == PIXELS else 1).mean()
                 for k in target_obs)
    rew_ll = gaussian_log_prob(reward_in, decoded[REWARD_OUT], weights.reward_std, 1)
    kl = balanced_kl(out, weights.kl_balance)
    kl_term = torch.clamp(kl.mean(), min=weights.free_nats) if weights.free_nats > 0 else kl.mean()
    loss = -(obs_ll + weights.beta * rew_ll.mean()) + weights.kl_weight * kl_term
    kl_value = kl.detach().mean()
    terms = {"obs_nll": -obs_ll, "reward_nll": -rew_ll.mean(), "kl": kl_value,
             "elbo": obs_ll + weights.beta * rew_ll.mean() - kl_value}
    return loss, terms


def prior_reward_loss(reward_in: torch.Tensor, prior_reward: torch.Tensor,
                      weights: ElboWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior-reward term added to the loss (zero weight: nothing) and ``prior_reward_nll`` (always logged)."""
    prior_rew_ll = gaussian_log_prob(reward_in, prior_reward, weights.reward_std, 1)
    added = -weights.beta * weights.prior_reward_weight * prior_rew_ll.mean()
    return added, -prior_rew_ll.mean()
