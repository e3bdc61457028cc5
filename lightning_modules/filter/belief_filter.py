"""The hand-over between the phases: :class:`BeliefFilter`, a plain ``nn.Module`` that phase 1 trains.

Phase 1 (:class:`~lightning_modules.filter.module.VariationalFilterModule`) owns one as ``self.filter`` and saves
its constructor arguments in every checkpoint (``checkpoint["belief_filter"]``, :meth:`BeliefFilter.spec`); the
weights are the checkpoint's ``filter.*`` entries. Phase 2 and the evaluator rebuild it with
:meth:`BeliefFilter.load` (a phase-1 or phase-2 checkpoint): no LightningModule, no Lightning API.

Contract (the time alignment is in :mod:`lightning_modules.filter.rssm`):

* ``beliefs(batch) -> [B, L, belief_dim]``: deterministic fp32 beliefs of a data batch (posterior mean fed forward).
* ``initial_state(n)``, then ``step(state, obs, prev_action, reward) -> (belief [n, D], state)`` per online step;
  feeding a batch's sequence through ``step`` reproduces ``beliefs(batch)``.
* ``obs_keys``, ``action_dim``, ``image_size``, ``num_tasks``, ``belief_dim``; ``check_batch`` / ``check_data``:
  the one data-compatibility check that both phases use.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tensordict import TensorDictBase
from torch import nn

from envs.keys import ACTION, PIXELS, REWARD, STATE
from lightning_modules.filter.losses import shift_right
from lightning_modules.filter.rssm import FilterState, RewardRSSM

SPEC_KEY = "belief_filter"  # the checkpoint entry holding the constructor arguments
SPEC_FORMAT = 1
STATE_PREFIX = "filter."     # the filter's weights inside a phase-1 or phase-2 state dict


class BeliefFilter(nn.Module):
    """The reward-aware RSSM with its observation statistics and the belief API (see the module docstring).

    Args: the sizes of :class:`~lightning_modules.filter.rssm.RewardRSSM`, ``num_tasks`` (the data's task count,
    checked against data) and ``normalize_state`` (standardise ``state`` with statistics of the first batch).
    """

    def __init__(self, obs_keys: Sequence[str] = (PIXELS,), image_size: int = 64, state_dim: int = 6,
                 action_dim: int = 4, num_tasks: int = 2, deter_dim: int = 256, stoch_dim: int = 64,
                 hidden_dim: int = 256, mlp_hidden: int = 256, cnn_depth: int = 32, state_embed_dim: int = 256,
                 reward_embed_dim: int = 32, min_std: float = 0.1, normalize_state: bool = True):
        super().__init__()
        self.rssm = RewardRSSM(obs_keys, image_size, state_dim, action_dim, deter_dim, stoch_dim, hidden_dim,
                               cnn_depth, mlp_hidden, state_embed_dim, reward_embed_dim, min_std)
        self.kwargs = dict(obs_keys=list(self.rssm.obs_keys), image_size=int(image_size), state_dim=int(state_dim),
                           action_dim=int(action_dim), num_tasks=int(num_tasks), deter_dim=int(deter_dim),
                           stoch_dim=int(stoch_dim), hidden_dim=int(hidden_dim), mlp_hidden=int(mlp_hidden),
                           cnn_depth=int(cnn_depth), state_embed_dim=int(state_embed_dim),
                           reward_embed_dim=int(reward_embed_dim), min_std=float(min_std),
                           normalize_state=bool(normalize_state))
        self.register_buffer("state_stats_ready", torch.tensor(False))

    # ------------------------------------------------------------------ description
    @property
    def obs_keys(self) -> tuple[str, ...]:
        return self.rssm.obs_keys

    @property
    def belief_dim(self) -> int:
        return self.rssm.belief_dim

    @property
    def action_dim(self) -> int:
        return self.kwargs["action_dim"]

    @property
    def image_size(self) -> int:
        return self.kwargs["image_size"]

    @property
    def num_tasks(self) -> int:
        return self.kwargs["num_tasks"]

    @property
    def device(self) -> torch.device:
        return self.rssm.state_mean.device

    def spec(self) -> dict[str, Any]:
        """Plain constructor arguments (what a checkpoint stores under :data:`SPEC_KEY`)."""
        return {"format": SPEC_FORMAT, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "BeliefFilter":
        """A filter (untrained weights) from :meth:`spec`'s output."""
        if not isinstance(spec, Mapping) or "kwargs" not in spec:
            raise ValueError(f"not a belief-filter spec: {spec!r:.200}")
        return cls(**spec["kwargs"])

    @classmethod
    def kwargs_from_hparams(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments among a phase-1 module's hyper-parameters (older checkpoints have no spec)."""
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return {k: v for k, v in hparams.items() if k in names}

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> "BeliefFilter":
        """The trained filter of a phase-1 or phase-2 checkpoint; ``FileNotFoundError`` / ``ValueError`` naming
        the path when it cannot be read or holds no filter."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"filter checkpoint {str(path)!r} does not exist: train the variational filter "
                                    f"first (phase 1) and point model.init_args.filter_checkpoint at its checkpoint")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"filter checkpoint {str(path)!r} could not be read: {err}") from err
        try:
            return cls.from_checkpoint(ckpt)
        except ValueError as err:
            raise ValueError(f"filter checkpoint {str(path)!r}: {err}") from err

    @classmethod
    def checkpoint_spec(cls, ckpt: Any) -> tuple[dict[str, Any], str]:
        """The filter's spec in a loaded checkpoint dict and the prefix of its weights in the state dict (this
        layout, or the one before the hand-over existed); ``ValueError`` when it holds no filter."""
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
        if isinstance(ckpt, dict) and SPEC_KEY in ckpt:
            return ckpt[SPEC_KEY], STATE_PREFIX
        if isinstance(ckpt, dict) and "filter_hparams" in ckpt:  # an older phase-2 checkpoint
            return cls._spec(ckpt["filter_hparams"]), STATE_PREFIX
        if isinstance(ckpt, dict) and "hyper_parameters" in ckpt:
            if any(k.startswith("rssm.") for k in state):  # an older phase-1 one
                return cls._spec(ckpt["hyper_parameters"]), ""
            if any(k.startswith(STATE_PREFIX + "rssm.") for k in state):  # phase-1 weights and hparams only
                return cls._spec(ckpt["hyper_parameters"]), STATE_PREFIX
        raise ValueError("it holds no belief filter (no 'belief_filter' entry): not a VariationalFilterModule checkpoint "
                         "(phase 1) nor a LatentCQLModule one (phase 2)")

    @classmethod
    def _spec(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        return cls(**cls.kwargs_from_hparams(hparams)).spec()  # normalised exactly as a built filter stores it

    @classmethod
    def from_checkpoint(cls, ckpt: Any) -> "BeliefFilter":
        """The trained filter of a loaded checkpoint dict (see :meth:`checkpoint_spec`)."""
        spec, prefix = cls.checkpoint_spec(ckpt)
        model = cls.from_spec(spec)
        model.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
        return model

    # ------------------------------------------------------------------ data checks (both phases)
    def check_data(self, obs_keys: Sequence[str] | None, feature_shapes: Mapping[str, Any] | None,
                   num_tasks: int | None) -> list[str]:
        """Every way data described by its delivered ``obs_keys``, per-step ``feature_shapes`` (key -> (shape,
        dtype)) and ``num_tasks`` does not fit this filter (an empty list when it fits)."""
        problems = []
        if obs_keys is not None:
            missing = [k for k in self.obs_keys if k not in tuple(obs_keys)]
            if missing:
                problems.append(f"observation mode: the filter reads observation keys {list(self.obs_keys)} but the "
                                f"data delivers {list(obs_keys)}")
        size = self.image_size
        want = {PIXELS: ("image size", (3, size, size), f"image_size={size}"),
                STATE: ("state size", (self.kwargs["state_dim"],), f"state_dim={self.kwargs['state_dim']}"),
                ACTION: ("action size", (self.action_dim,), f"action_dim={self.action_dim}")}
        shapes = feature_shapes or {}
        for key, (what, expected, setting) in want.items():
            if (key == ACTION or key in self.obs_keys) and key in shapes and tuple(shapes[key][0]) != expected:
                problems.append(f"{what}: the data's {key} has shape {tuple(shapes[key][0])}, the filter expects "
                                f"{expected} ({setting})")
        if num_tasks is not None and num_tasks != self.num_tasks:
            problems.append(f"task count: the data has {num_tasks} tasks, the filter has num_tasks={self.num_tasks}")
        return problems

    def check_datamodule(self, dm: Any, who: str) -> None:
        """``ValueError`` naming every way a data module's data does not fit (``who`` names the model)."""
        sampler = getattr(dm, "sampler", None)
        problems = self.check_data(getattr(dm, "obs_keys", None), getattr(sampler, "feature_shapes", None),
                                   getattr(sampler, "num_tasks", None))
        if problems:
            raise ValueError(f"the data does not match {who}: " + "; ".join(problems))

    def check_batch(self, batch: TensorDictBase) -> None:
        """``ValueError`` naming every way a batch [B, L] does not fit this filter."""
        keys = set(batch.keys(include_nested=True))
        problems = []
        if batch.batch_dims != 2:
            problems.append(f"batches must have batch size [B, L], got {list(batch.batch_size)}")
        if ACTION not in keys or REWARD not in keys:
            problems.append(f"the batch needs {ACTION!r} and {REWARD}")
        shapes = {k: (tuple(batch[k].shape[batch.batch_dims:]), batch[k].dtype)
                  for k in (PIXELS, STATE, ACTION) if k in keys}
        problems += self.check_data([k for k in (PIXELS, STATE) if k in keys], shapes, None)
        if PIXELS in self.obs_keys and PIXELS in keys and batch[PIXELS].dtype != torch.uint8:
            problems.append(f"pixels are {batch[PIXELS].dtype}, the filter expects torch.uint8")
        if problems:
            raise ValueError("the batch does not match the belief filter: " + "; ".join(problems))

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def fit_state_stats(self, batch: TensorDictBase) -> None:
        """Standardisation statistics of ``state`` from a first batch (once; a no-op without state input)."""
        if self.kwargs["normalize_state"] and STATE in self.obs_keys and not bool(self.state_stats_ready):
            x = batch[STATE].float().reshape(-1, self.kwargs["state_dim"]).to(self.device)
            self.rssm.state_mean.copy_(x.mean(0))
            self.rssm.state_std.copy_(x.std(0).clamp_min(1e-2) if len(x) > 1 else torch.ones_like(x[0]))
            self.state_stats_ready.fill_(True)

    # ------------------------------------------------------------------ filtering
    def run(self, batch: TensorDictBase, sample: bool, step_fn=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The filter over a batch [B, L]: the pass of :meth:`RewardRSSM.filter` and the reward input r_t."""
        obs = {k: batch[k] for k in self.obs_keys}
        reward_in = shift_right(batch[REWARD].float())  # r_t: the reward that arrived with o_t
        prev_action = shift_right(batch[ACTION].float())  # a_{t-1}
        embedding = self.rssm.embed(obs, reward_in)
        return self.rssm.filter(embedding, prev_action, sample=sample, step_fn=step_fn), reward_in

    @torch.no_grad()
    def beliefs(self, batch: TensorDictBase) -> torch.Tensor:
        """Beliefs [B, L, belief_dim] (fp32) of every step of a batch; deterministic (posterior mean fed forward)."""
        was_training = self.training
        self.eval()
        try:
            batch = batch.to(self.device)
            self.check_batch(batch)
            with torch.autocast(device_type=self.device.type, enabled=False):  # fp32, like step()
                out = self.run(batch, sample=False)[0]
            return self.rssm.belief(out["post_mean"], out["post_std"], out["deter"])
        finally:
            self.train(was_training)

    def initial_state(self, batch_size: int) -> FilterState:
        """State before the first step of a sequence (feed zeros as the first previous action and reward)."""
        return self.rssm.initial_state(batch_size, self.device)

    @torch.no_grad()
    def step(self, state: FilterState, obs: Mapping[str, torch.Tensor], action: torch.Tensor,
             reward: torch.Tensor) -> tuple[torch.Tensor, FilterState]:
        """One online step: o_t, the previous action a_{t-1} and the reward r_t that came with o_t."""
        device = self.device
        obs = {k: obs[k].to(device) for k in self.obs_keys}
        with torch.autocast(device_type=device.type, enabled=False):
            return self.rssm.step(state, obs, action.to(device), reward.to(device))
