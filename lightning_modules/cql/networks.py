"""Phase-2 networks on belief states: the belief normaliser, the TanhNormal actor and the twin Q critics.

Everything reads the TensorDict key :data:`BELIEF` ("belief", the *standardised* belief ``[..., D]``) and, for the
critics, ``"action"`` ``[..., A]``. The normaliser lives outside the actor and critics on purpose: TorchRL's
``CQLLoss`` copies the networks' parameters and buffers into its own (stacked) functional parameters, so
statistics kept inside the networks would have to be updated in several places. Standardising once before the
loss (and before acting online) keeps a single copy of the statistics, saved with the checkpoint as buffers.
"""

from __future__ import annotations

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator

from envs.keys import ACTION

BELIEF = "belief"  # the TensorDict key of the (standardised) belief, phase 2's observation
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BeliefNormalizer(nn.Module):
    """Per-feature standardisation ``clamp((b - mean) / std, -clip, clip)`` with statistics fitted once.

    ``fit`` sets the statistics from a first set of beliefs (``std`` clamped below at ``min_std``: belief
    features that hardly vary, e.g. a saturated variance, are not blown up). Until then, and when disabled,
    it is the identity. The buffers (``mean``, ``std``, ``ready``) are saved in checkpoints.
    """

    def __init__(self, dim: int, enabled: bool = True, min_std: float = 1e-3, clip: float = 10.0):
        super().__init__()
        self.enabled = enabled
        self.min_std = min_std
        self.clip = clip
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("ready", torch.tensor(False))

    @torch.no_grad()
    def fit(self, beliefs: torch.Tensor) -> None:
        """Set the statistics from beliefs ``[..., D]`` (once; later calls are ignored)."""
        if not self.enabled or bool(self.ready):
            return
        x = beliefs.reshape(-1, beliefs.shape[-1]).float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(self.min_std) if len(x) > 1 else torch.ones_like(x[0]))
        self.ready.fill_(True)

    def forward(self, beliefs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return beliefs.float()
        return ((beliefs.float() - self.mean) / self.std).clamp(-self.clip, self.clip)


def action_spec(action_dim: int, device: torch.device | str | None = None) -> Bounded:
    """The [-1, 1]^A action box of ``SawyerTwoDrawersEnv``."""
    return Bounded(-1.0, 1.0, shape=(action_dim,), device=device)


def make_actor(belief_dim: int, action_dim: int, hidden_dim: int = 256, num_layers: int = 2,
               activation: str = "relu", min_scale: float = 1e-4,
               device: torch.device | str | None = None) -> ProbabilisticActor:
    """TanhNormal policy ``pi(a | b)`` in [-1, 1]^A: an MLP to (loc, scale), ``"action"`` out.

    The bounds are passed as tensors on ``device`` (a Python float would be copied to the device on every
    call, which breaks CUDA-graph capture); :func:`move_distribution_kwargs` keeps them on the module's device.
    """
    net = nn.Sequential(
        MLP(in_features=belief_dim, out_features=2 * action_dim, num_cells=[hidden_dim] * num_layers,
            activation_class=ACTIVATIONS[activation], device=device),
        NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=min_scale),
    )
    module = TensorDictModule(net, in_keys=[BELIEF], out_keys=["loc", "scale"])
    low = torch.full((action_dim,), -1.0, device=device)
    high = torch.full((action_dim,), 1.0, device=device)
    return ProbabilisticActor(module, in_keys=["loc", "scale"], spec=action_spec(action_dim, device),
                              distribution_class=TanhNormal, distribution_kwargs={"low": low, "high": high},
                              return_log_prob=False)


def make_qvalue(belief_dim: int, action_dim: int, hidden_dim: int = 256, num_layers: int = 2,
                activation: str = "relu", device: torch.device | str | None = None) -> ValueOperator:
    """``Q(b, a)``: an MLP on ``cat([belief, action])`` writing ``"state_action_value"`` [..., 1]."""
    net = MLP(in_features=belief_dim + action_dim, out_features=1, num_cells=[hidden_dim] * num_layers,
              activation_class=ACTIVATIONS[activation], device=device)
    return ValueOperator(net, in_keys=[BELIEF, ACTION])


def move_distribution_kwargs(module: nn.Module, fn) -> None:
    """Apply a tensor function (``nn.Module._apply``'s) to tensor ``distribution_kwargs`` of every
    probabilistic sub-module (they are plain attributes, not buffers, so ``.to()`` would not move them)."""
    for sub in module.modules():
        kwargs = getattr(sub, "distribution_kwargs", None)
        if isinstance(kwargs, dict):
            for key, value in list(kwargs.items()):
                if isinstance(value, torch.Tensor):
                    kwargs[key] = fn(value)
