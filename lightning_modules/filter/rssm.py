"""The latent model of the variational filter: encoders, decoders and a reward-aware RSSM.

Time alignment (shared with :mod:`lightning_modules.filter.belief_filter`, the belief API and phase 2)
---------------------------------------------------------------------------------------------------
A batch row holds, at index ``t``: the observation ``o_t``, the action ``a_t`` taken after it and
``("next", "reward")[t] = r_{t+1}``, the reward received after ``a_t``. The filter step ``t`` computes

    h_t = GRU(h_{t-1}, [s_{t-1}, a_{t-1}])            deterministic transition (a_{-1} = 0, h_{-1} = s_{-1} = 0)
    p(s_t | h_t)                                      prior: does NOT see o_t nor r_t
    q(s_t | h_t, o_t, r_t)                            posterior, r_t = ("next", "reward")[t-1] (r_0 = 0)

so the posterior sees the observation together with the reward that arrived WITH it, exactly what an agent
has online after ``env.step(a_{t-1})`` returned ``(o_t, r_t)``. The state is never reset inside a sequence:
at a segment boundary the previous episode's last reward reaches the belief together with the next
episode's first observation (online: env reset between episodes, belief carried over).

The *belief* handed to phase 2 at step ``t`` is ``[mean_t, var_t, h_t]`` of the posterior
``q(s_t | ...)`` (``var = std**2``), of size ``2 * stoch_dim + deter_dim``. When beliefs are computed (never
during training) the state fed forward is the posterior *mean*, so beliefs are deterministic; training feeds
forward reparameterised samples.

Use of TorchRL
--------------
:class:`torchrl.modules.models.model_based.RSSMPrior` and ``RSSMPosterior`` hold the transition, prior and
posterior networks (GRU deterministic state, Gaussian stochastic state with ``softplus`` scale clamped at
``min_std``). The reward enters the posterior by being embedded and concatenated to the observation
embedding (``RSSMPosterior`` takes one embedding). Their ``forward`` is not called inside the time loop:
the loop calls their sub-modules in a split order so that everything that does not depend on the
recurrence runs batched over all ``B * L`` steps (the observation/reward part of the posterior's first
layer and the action part of the prior's first layer before the loop, the prior head after it); the test
suite checks that the split computation equals their ``forward``. TorchRL's ``ObsEncoder`` /
``ObsDecoder`` are not used: their unpadded convolutions only work at 64 px (a 32 px image shrinks to
nothing) and the decoder always outputs 64 px; ``RSSMRollout`` is not used either: it has no reward input
and runs prior + posterior through TensorDicts step by step, which is what makes a naive RSSM slow.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrl.data import Bounded
from torchrl.modules.models.model_based import RSSMPosterior, RSSMPrior

from envs.keys import PIXELS, STATE, canonical_obs_keys

REWARD_OUT = "reward"  # the reward model's entry among the decoder outputs (beside the observation keys)

FilterState = dict[str, torch.Tensor]  # {"deter": [B, H], "stoch": [B, S]}


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """``layers`` hidden ELU layers of width ``hidden``, then a linear output."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ELU()]
    mods.append(nn.Linear(hidden if layers else in_dim, out_dim))
    return nn.Sequential(*mods)


def _check_image_size(image_size: int, num_layers: int) -> int:
    factor = 2**num_layers
    if image_size < factor or image_size % factor:
        raise ValueError(f"image_size must be a positive multiple of {factor} (the conv stack halves it "
                         f"{num_layers} times), got {image_size}")
    return image_size // factor


class ConvEncoder(nn.Module):
    """Four stride-2 4x4 convolutions (``depth`` * 1, 2, 4, 8 channels: 32..256), ReLU, flattened.

    Padding 1 halves the size exactly, so any multiple of 16 works: 64 px -> 256 x 4 x 4, 32 px -> 256 x 2 x 2.
    Input: float images in [-0.5, 0.5] of shape [N, 3, S, S].
    """

    def __init__(self, image_size: int, depth: int = 32, num_layers: int = 4):
        super().__init__()
        final = _check_image_size(image_size, num_layers)
        layers: list[nn.Module] = []
        in_ch = 3
        for i in range(num_layers):
            layers += [nn.Conv2d(in_ch, depth * 2**i, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = depth * 2**i
        self.net = nn.Sequential(*layers)
        self.out_dim = in_ch * final * final

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(1)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: linear to ``8 * depth`` x S/16 x S/16, four stride-2 transposed convs."""

    def __init__(self, in_dim: int, image_size: int, depth: int = 32, num_layers: int = 4):
        super().__init__()
        self.start = _check_image_size(image_size, num_layers)
        self.channels = depth * 2 ** (num_layers - 1)
        self.linear = nn.Linear(in_dim, self.channels * self.start * self.start)
        layers: list[nn.Module] = []
        ch = self.channels
        for i in reversed(range(num_layers)):
            out = 3 if i == 0 else depth * 2 ** (i - 1)
            layers += [nn.ReLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear(features).view(-1, self.channels, self.start, self.start)
        return self.net(x)


class RewardRSSM(nn.Module):
    """Encoders, decoders and the reward-aware RSSM filter (see the module docstring for the alignment)."""

    def __init__(
        self,
        obs_keys: Sequence[str] = ("pixels",),
        image_size: int = 64,
        state_dim: int = 6,
        action_dim: int = 4,
        deter_dim: int = 256,
        stoch_dim: int = 64,
        hidden_dim: int = 256,
        cnn_depth: int = 32,
        mlp_hidden: int = 256,
        state_embed_dim: int = 256,
        reward_embed_dim: int = 32,
        min_std: float = 0.1,
    ):
        super().__init__()
        if hidden_dim != deter_dim:  # TorchRL's RSSMPrior maps the GRU state with a hidden_dim -> hidden_dim layer
            raise ValueError(f"hidden_dim ({hidden_dim}) must equal deter_dim ({deter_dim}): TorchRL's RSSMPrior "
                             f"projects the deterministic state with a hidden_dim x hidden_dim layer")
        self.obs_keys = canonical_obs_keys(obs_keys)
        self.image_size, self.state_dim, self.action_dim = image_size, state_dim, action_dim
        self.deter_dim, self.stoch_dim = deter_dim, stoch_dim
        feat_dim = deter_dim + stoch_dim

        self.encoders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        embed_dim = 0
        if PIXELS in self.obs_keys:
            self.encoders[PIXELS] = ConvEncoder(image_size, cnn_depth)
            self.decoders[PIXELS] = ConvDecoder(feat_dim, image_size, cnn_depth)
            embed_dim += self.encoders[PIXELS].out_dim
        if STATE in self.obs_keys:
            self.encoders[STATE] = mlp(state_dim, mlp_hidden, state_embed_dim)
            self.decoders[STATE] = mlp(feat_dim, mlp_hidden, state_dim)
            embed_dim += state_embed_dim
        # state normalisation (set from data by the LightningModule; identity until then)
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self.reward_encoder = nn.Sequential(nn.Linear(1, reward_embed_dim), nn.ELU())
        self.reward_decoder = mlp(feat_dim, mlp_hidden, 1)
        self.embed_dim = embed_dim + reward_embed_dim

        spec = Bounded(-1.0, 1.0, shape=(action_dim,))
        self.prior = RSSMPrior(spec, hidden_dim=hidden_dim, rnn_hidden_dim=deter_dim, state_dim=stoch_dim,
                               scale_lb=min_std, action_dim=action_dim)
        self.posterior = RSSMPosterior(hidden_dim=hidden_dim, state_dim=stoch_dim, scale_lb=min_std,
                                       rnn_hidden_dim=deter_dim, obs_embed_dim=self.embed_dim)

    # ------------------------------------------------------------------ sizes
    @property
    def belief_dim(self) -> int:
        return 2 * self.stoch_dim + self.deter_dim

    @property
    def feature_dim(self) -> int:
        return self.stoch_dim + self.deter_dim

    # ------------------------------------------------------------------ observations
    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 pixels -> float in [-0.5, 0.5]; state -> standardised with the stored statistics."""
        out = {}
        if PIXELS in self.obs_keys:
            out[PIXELS] = obs[PIXELS].float() / 255.0 - 0.5
        if STATE in self.obs_keys:
            out[STATE] = (obs[STATE].float() - self.state_mean) / self.state_std
        return out

    def embed(self, obs: dict[str, torch.Tensor], reward: torch.Tensor) -> torch.Tensor:
        """Embedding [..., embed_dim] of observations and the reward that came with them, any batch dims.

        All frames go through the encoders in one batched call.
        """
        norm = self.normalize_obs(obs)
        parts = []
        for key in self.obs_keys:
            x = norm[key]
            event = 3 if key == PIXELS else 1
            batch = x.shape[:-event]
            parts.append(self.encoders[key](x.reshape(-1, *x.shape[-event:])).reshape(*batch, -1))
        parts.append(self.reward_encoder(reward))
        return torch.cat([p.to(parts[-1].dtype) for p in parts], -1)

    def decode(self, features: torch.Tensor, pixel_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Means of the observation and reward models for features [..., feature_dim].

        ``pixel_index`` (indices into the flattened batch dims): decode images for those steps only, returned as
        [len(pixel_index), 3, S, S] (the image decoder is the filter's most expensive part on a CPU).
        """
        batch = features.shape[:-1]
        flat = features.reshape(-1, features.shape[-1])
        out = {}
        for key in self.obs_keys:
            if key == PIXELS and pixel_index is not None:
                out[key] = self.decoders[key](flat[pixel_index])
                continue
            y = self.decoders[key](flat)
            out[key] = y.reshape(*batch, *y.shape[1:])
        out[REWARD_OUT] = self.reward_decoder(flat).reshape(*batch, 1)
        return out

    # ------------------------------------------------------------------ the filter
    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> FilterState:
        """The state before the first step: zeros (h_{-1}, s_{-1}). The previous action/reward are zeros too."""
        return {"deter": torch.zeros(batch_size, self.deter_dim, device=device),
                "stoch": torch.zeros(batch_size, self.stoch_dim, device=device)}

    def _split_weights(self):
        first_prior = self.prior.action_state_projector[0]  # Linear on cat([stoch, action])
        first_post = self.posterior.obs_rnn_to_post_projector[0]  # Linear on cat([deter, embedding])
        S, H = self.stoch_dim, self.deter_dim
        return (first_prior.weight[:, :S], first_prior.weight[:, S:], first_prior.bias,
                first_post.weight[:, :H], first_post.weight[:, H:], first_post.bias)

    def input_projections(self, embedding: torch.Tensor, prev_action: torch.Tensor):
        """Parts of the first prior/posterior layers that do not depend on the recurrence (batched over time)."""
        _, w_pa, b_p, _, w_qe, b_q = self._split_weights()
        return F.linear(prev_action, w_pa, b_p), F.linear(embedding, w_qe, b_q)

    def cell(self, deter: torch.Tensor, stoch: torch.Tensor, action_in: torch.Tensor, embed_in: torch.Tensor):
        """One filter step from projected inputs: returns (h_t, posterior mean, posterior std)."""
        w_ps, _, _, w_qh, _, _ = self._split_weights()
        x = self.prior.action_state_projector[1](action_in + F.linear(stoch, w_ps.to(stoch.dtype)))
        with torch.autocast(device_type=x.device.type, enabled=False):  # recurrence in fp32, like RSSMPrior
            deter = self.prior.rnn(x.float(), deter.float())
        pre = embed_in + F.linear(deter, w_qh)
        post_mean, post_std = self.posterior.obs_rnn_to_post_projector[1:](pre)
        return deter, post_mean, post_std

    def filter(self, embedding: torch.Tensor, prev_action: torch.Tensor, state: FilterState | None = None,
               sample: bool = True, step_fn=None) -> dict[str, torch.Tensor]:
        """Run the posterior over a sequence.

        Args:
            embedding: [B, L, embed_dim] from :meth:`embed` (o_t with r_t).
            prev_action: [B, L, A], a_{t-1} (zeros at t=0).
            state: initial state (default zeros).
            sample: feed reparameterised posterior samples forward (training); else the posterior mean.
            step_fn: replacement for :meth:`cell` (e.g. a compiled version).

        Returns: ``deter`` [B, L, H], ``post_mean``/``post_std``/``stoch`` [B, L, S] (``stoch`` is what was fed
        forward), ``prior_mean``/``prior_std`` [B, L, S] of p(s_t | h_t).
        """
        B, L = embedding.shape[:2]
        if state is None:
            state = self.initial_state(B, embedding.device)
        action_in, embed_in = self.input_projections(embedding, prev_action)
        action_in, embed_in = action_in.transpose(0, 1), embed_in.transpose(0, 1)  # time-major for the loop
        noise = torch.randn(L, B, self.stoch_dim, device=embedding.device) if sample else None
        step = step_fn or self.cell
        deter, stoch = state["deter"], state["stoch"]
        out_d, out_m, out_s, out_z = [], [], [], []
        for t in range(L):
            deter, mean, std = step(deter, stoch, action_in[t], embed_in[t])
            stoch = mean + std * noise[t].to(std.dtype) if noise is not None else mean
            out_d.append(deter)
            out_m.append(mean)
            out_s.append(std)
            out_z.append(stoch)
        result = {k: torch.stack(v, 1) for k, v in
                  (("deter", out_d), ("post_mean", out_m), ("post_std", out_s), ("stoch", out_z))}
        result["prior_mean"], result["prior_std"] = self.prior.rnn_to_prior_projector(result["deter"])
        return result

    def step(self, state: FilterState, obs: dict[str, torch.Tensor], action: torch.Tensor,
             reward: torch.Tensor) -> tuple[torch.Tensor, FilterState]:
        """One online step: ``obs`` = o_t, ``action`` = a_{t-1}, ``reward`` = r_t (both zeros at the start).

        Returns the belief [B, belief_dim] and the new state (the posterior mean is fed forward).
        """
        reward = reward.reshape(-1, 1).float()
        embedding = self.embed(obs, reward)
        action_in, embed_in = self.input_projections(embedding, action.float())
        deter, mean, std = self.cell(state["deter"], state["stoch"], action_in, embed_in)
        return self.belief(mean, std, deter), {"deter": deter, "stoch": mean}

    def imagine(self, state: FilterState, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Open-loop prior rollout from ``state`` (h_t, s_t) under actions [B, N, A] (a_t .. a_{t+N-1}).

        Returns ``deter`` and ``stoch`` (prior means) [B, N, ...] for steps t+1 .. t+N.
        """
        deter, stoch = state["deter"], state["stoch"]
        out_d, out_z = [], []
        for i in range(actions.shape[1]):
            mean, _, _, deter = self.prior(stoch, deter, actions[:, i], noise=torch.zeros_like(stoch))
            stoch = mean
            out_d.append(deter)
            out_z.append(stoch)
        return {"deter": torch.stack(out_d, 1), "stoch": torch.stack(out_z, 1)}

    @staticmethod
    def belief(post_mean: torch.Tensor, post_std: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
        """The phase-2 belief: [posterior mean, posterior variance, deterministic state]."""
        return torch.cat([post_mean.float(), post_std.float().square(), deter.float()], -1)

    @staticmethod
    def features(stoch: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
        """Decoder input: [s_t, h_t]."""
        return torch.cat([stoch, deter.to(stoch.dtype)], -1)
