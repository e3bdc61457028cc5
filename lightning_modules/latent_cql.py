"""Phase 2: conservative Q-learning on the frozen variational filter's belief states (paper section 3.7).

A trained :class:`~lightning_modules.variational_filter.VariationalFilterModule` (``filter_checkpoint``, an init
argument, not ``--ckpt_path``) turns every meta-exploration batch [B, L] into beliefs ``b_0..b_{L-1}``
(``filter.beliefs``; ``b_t`` is the input of the policy choosing ``a_t``). Training transitions are

    (b_t, a_t, r_{t+1} = ("next", "reward")[t] (relabelled), b_{t+1}),   t = 0 .. L-2,

with ``done = terminated = False`` everywhere: a segment boundary inside a meta-trajectory is not terminal (the
belief carries over, the value of what was learnt in one episode flows into the next), and the last step of
a sequence, which has no successor, is dropped. They are fed to ``torchrl.objectives.CQLLoss`` with a TanhNormal
``ProbabilisticActor`` and twin ``ValueOperator`` critics on standardised beliefs (:mod:`lightning_modules.networks`),
``SoftUpdate`` target critics and one Adam grouping the actor, critic and entropy-temperature optimisers
(``torchrl.objectives.group_optimizers``; manual optimisation, one optimizer step per training step, so
``global_step`` counts updates).

Choices (from a state-observation prototype of the whole method, see the issue):

* ``deterministic_backup=True``: no entropy term in the TD target (SAC's soft backup buried the sparse 0/1 reward).
* Beliefs are standardised with statistics of the first training batch (buffers, saved in the checkpoint).
* Actor learning rate 3e-4.
* The conservative weight is fixed (``cql_weight``, TorchRL's ``min_q_weight``) by default. ``with_lagrange=True``
  tunes it with a Lagrange multiplier, but NOT through TorchRL's ``alpha_prime_loss``: that term is computed from
  the undetached conservative gap, so summing it into the loss pushes the critics' gradient towards *less*
  conservatism (``tests/test_latent_cql.py::test_torchrl_lagrange_term_leaks_into_critic`` shows it). Here the
  multiplier loss uses the detached gap and the critics see ``alpha_prime.detach() * loss_cql``.
* "No CQL" ablation: ``conservative=False`` (or ``cql_weight=0``): the same module without the conservative term,
  i.e. SAC on beliefs.

The filter is frozen (eval mode, ``requires_grad=False``, not in the optimizer) and kept as the submodule
``filter``, so a phase-2 checkpoint is self-contained for evaluation: :meth:`LatentCQLModule.load_phase2` rebuilds
the filter from the hyper-parameters stored in the checkpoint (``checkpoint["filter_hparams"]``) and never reads
``filter_checkpoint``; Lightning's ``load_from_checkpoint`` / ``--ckpt_path`` re-read ``filter_checkpoint`` (which
must then still exist) and the phase-2 state dict then overwrites the filter weights with the saved ones. The
dataset's env parameters are stored too (``checkpoint["env_config"]``) for the evaluation.

Optional belief cache (``belief_cache_batches > 0``): the beliefs, actions and rewards of the last
``belief_cache_batches`` data batches are kept (a ring buffer, saved in checkpoints as plain tensors under
``checkpoint["belief_cache"]`` so that a resumed run samples from the same cache; under DDP the checkpoint holds
rank 0's cache, which every rank then resumes from); a new data batch is filtered
and inserted only every ``refresh_every`` steps (every step until the cache is full), and each update samples
``transition_batch_size`` random transitions from the whole cache. Without a cache every step filters its batch
and samples ``transition_batch_size`` transitions from it (None: all ``B * (L - 1)``).

Logs ``train/loss_qvalue``, ``train/loss_cql``, ``train/loss_actor``, ``train/loss_alpha``, ``train/alpha``,
``train/entropy``, ``train/q_data`` (mean Q of dataset actions), ``train/alpha_prime`` (Lagrange), the same
``val/*`` on validation batches (no update), and the training loss terms again under ``losses/*``
(``losses/loss_qvalue``, ``losses/loss_cql``, ``losses/loss_actor``, ``losses/loss_alpha``, Lagrange:
``losses/loss_alpha_prime``).

Guards (as in phase 1, :mod:`lightning_modules.guards`): the loss terms are checked before backward
(:func:`~lightning_modules.guards.check_finite`: a NaN/inf stops the run with a ``FloatingPointError`` naming the
terms, e.g. ``losses/loss_qvalue=nan``). The randomness of a training step (transition sampling, the actor's
samples, CQL's random actions) is drawn from the global RNG seeded by (``noise_seed``, stream, rank, global step,
batch index) and restored afterwards, so a run resumed from a checkpoint (``noise_seed`` and the belief cache are
saved in it, the normaliser's statistics are buffers) continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import CQLLoss, SoftUpdate, ValueEstimators, group_optimizers

from lightning_modules.guards import check_finite, derive_seed, seeded_rng
from lightning_modules.networks import BELIEF, BeliefNormalizer, make_actor, make_qvalue, move_distribution_kwargs
from lightning_modules.variational_filter import VariationalFilterModule

REWARD = ("next", "reward")
# Lightning's ModelCheckpoint warns, under manual optimisation with every_n_train_steps, that the checkpoint holds the
# weights after the step's update: that is what is wanted here (evaluation runs after the update too).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", module="lightning")
# the frozen filter is in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")
LOSS_KEYS = ("loss_qvalue", "loss_cql", "loss_actor", "loss_alpha")
TRAIN_NOISE, VAL_NOISE = 0, 1  # random streams of training and validation steps


@contextmanager
def _own_hyperparameters():
    """Let a LightningModule built inside another one's ``__init__`` record its own hyper-parameters.

    LightningCLI instantiates the model inside a context that hands *its* init arguments to every
    ``save_hyperparameters()`` call made meanwhile (a ContextVar, not checked against the class), so a filter built
    here would otherwise get the LatentCQLModule's hyper-parameters.
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - other Lightning versions
        yield
        return
    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


def build_filter(hparams: dict[str, Any]) -> VariationalFilterModule:
    """A VariationalFilterModule from saved hyper-parameters (private keys such as ``_instantiator`` dropped)."""
    with _own_hyperparameters():
        return VariationalFilterModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})


def load_filter(path: str | Path, map_location: Any = "cpu") -> VariationalFilterModule:
    """Load a phase-1 checkpoint; ``FileNotFoundError`` / ``ValueError`` naming the path when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"filter_checkpoint {str(path)!r} does not exist: train the variational filter "
                                f"first (phase 1) and point model.init_args.filter_checkpoint at its checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"filter_checkpoint {str(path)!r} could not be read: {err}") from err
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    if "hyper_parameters" not in ckpt or not any(k.startswith("rssm.") for k in state):
        raise ValueError(f"filter_checkpoint {str(path)!r} is not a VariationalFilterModule checkpoint "
                         f"(no hyper-parameters or no 'rssm.*' weights)")
    model = build_filter(ckpt["hyper_parameters"])
    model.load_state_dict(state)
    return model


class LatentCQLModule(pl.LightningModule):
    """CQL (or SAC, ``conservative=False``) on the beliefs of a frozen variational filter; see the module docstring.

    Args:
        filter_checkpoint: phase-1 checkpoint (a ``VariationalFilterModule``); must exist (checked first).
        gamma: discount. tau: Polyak factor of the target critics.
        n_step: bootstrap after n logged steps (discounted n-step reward sums from the offline sequences, TD target
            discounted by ``gamma ** n_step``); 1 = one-step TD.
        conservative: add the CQL term; False (or ``cql_weight == 0``) gives the "No CQL" ablation.
        cql_weight: weight of the conservative term (TorchRL's ``min_q_weight``; the paper's beta).
        cql_temperature, num_random: CQL's logsumexp temperature and number of sampled actions per belief.
        with_lagrange, lagrange_thresh: tune the conservative weight to keep the gap at ``lagrange_thresh``
            (leak-free version, see the module docstring). Off by default.
        alpha_init, fixed_alpha, target_entropy: SAC entropy temperature (auto-tuned to ``target_entropy``,
            "auto" = -action_dim, unless fixed).
        deterministic_backup: no entropy bonus in the TD target (keep True, see the module docstring).
        max_q_backup: CQL's max-over-sampled-actions backup.
        loss_function: TD loss ("l2", "smooth_l1", "l1").
        actor_lr, critic_lr, alpha_lr: Adam learning rates; grad_clip: per-network gradient-norm clip (0 = off).
        hidden_dim, num_layers, activation: actor and critic MLPs.
        transition_batch_size: transitions per update (None = every transition of the data batch without a cache).
            Not called ``batch_size``: the DataModule's ``batch_size`` (meta-trajectories) shares the hparams namespace.
        belief_cache_batches, refresh_every: optional belief cache (0 = off), see the module docstring.
        normalize_beliefs, belief_min_std: standardise beliefs with first-batch statistics.
        filter_hparams: internal, set by :meth:`load_phase2`: build the filter from these hyper-parameters instead
            of reading ``filter_checkpoint`` (its weights then come from the phase-2 state dict).
    """

    def __init__(
        self,
        filter_checkpoint: str,
        gamma: float = 0.99,
        n_step: int = 1,
        tau: float = 0.005,
        conservative: bool = True,
        cql_weight: float = 1.0,
        cql_temperature: float = 1.0,
        num_random: int = 10,
        with_lagrange: bool = False,
        lagrange_thresh: float = 5.0,
        alpha_init: float = 1.0,
        fixed_alpha: bool = False,
        target_entropy: float | str = "auto",
        deterministic_backup: bool = True,
        max_q_backup: bool = False,
        loss_function: str = "l2",
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        alpha_lr: float = 3e-4,
        grad_clip: float = 0.0,
        hidden_dim: int = 256,
        num_layers: int = 2,
        activation: str = "relu",
        transition_batch_size: int | None = 256,
        belief_cache_batches: int = 0,
        refresh_every: int = 1,
        normalize_beliefs: bool = True,
        belief_min_std: float = 1e-3,
        filter_hparams: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["filter_hparams"])
        # fail on the filter before any other work
        if filter_hparams is None:
            self.filter = load_filter(filter_checkpoint)
        else:
            self.filter = build_filter(filter_hparams)
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
        if belief_cache_batches > 0 and transition_batch_size is None:
            problems.append("a belief cache needs transition_batch_size (transitions sampled per update)")
        if problems:
            raise ValueError("LatentCQLModule: " + "; ".join(problems))
        if with_lagrange and not self.conservative:
            warnings.warn("with_lagrange=True has no effect without the conservative term", stacklevel=2)

        self.automatic_optimization = False
        self.filter.requires_grad_(False)
        self.filter.eval()
        fhp = self.filter.hparams
        belief_dim, action_dim = self.filter.belief_dim, int(fhp.action_dim)
        self.normalizer = BeliefNormalizer(belief_dim, enabled=normalize_beliefs, min_std=belief_min_std)
        actor = make_actor(belief_dim, action_dim, hidden_dim, num_layers, activation)
        critics = [make_qvalue(belief_dim, action_dim, hidden_dim, num_layers, activation) for _ in range(2)]
        self.loss_module = CQLLoss(
            actor, critics, loss_function=loss_function, alpha_init=alpha_init, fixed_alpha=fixed_alpha,
            target_entropy=target_entropy, delay_qvalue=True, temperature=cql_temperature,
            min_q_weight=cql_weight, max_q_backup=max_q_backup, deterministic_backup=deterministic_backup,
            num_random=num_random, with_lagrange=with_lagrange and self.conservative, lagrange_thresh=lagrange_thresh,
        )
        # n-step transitions carry the discounted reward sum; the TD target discounts their successor by gamma^n
        self.loss_module.make_value_estimator(ValueEstimators.TD0, gamma=gamma ** n_step)
        self._updater: SoftUpdate | None = None
        self.env_config: dict[str, Any] | None = None  # the dataset's env parameters (set in setup, checkpointed)
        self.data_config: dict[str, Any] | None = None
        self._cache: dict[str, torch.Tensor] | None = None
        self._cache_filled = 0
        self._cache_next = 0
        self._pending_cache: dict[str, Any] | None = None  # a cache restored from a checkpoint, not yet on device
        # seed of the training noise: the seed_everything / manual_seed in force (draws nothing); kept in checkpoints
        self.noise_seed = int(torch.initial_seed())
        self.target_updater()

    # ------------------------------------------------------------------ properties
    @property
    def conservative(self) -> bool:
        return bool(self.hparams.conservative) and self.hparams.cql_weight > 0

    @property
    def with_lagrange(self) -> bool:
        return bool(self.hparams.with_lagrange) and self.conservative

    @property
    def action_dim(self) -> int:
        return int(self.filter.hparams.action_dim)

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True):
        super().train(mode)
        self.filter.eval()  # frozen: always in eval mode
        return self

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        move_distribution_kwargs(self, fn)
        self._updater = None  # its cached parameter references are stale after a move
        self._cache = None
        self._cache_filled = self._cache_next = 0
        return out

    def target_updater(self) -> SoftUpdate:
        """The SoftUpdate of the target critics (re-created after the module moved)."""
        if self._updater is None:
            # SoftUpdate.init_ copies the critics into the targets: keep the current targets (e.g. loaded ones)
            # (read through named_children: the loss's attribute access warns while no updater exists)
            target_params = dict(self.loss_module.named_children())["target_qvalue_network_params"]
            saved = target_params.detach().clone()
            self._updater = SoftUpdate(self.loss_module, tau=self.hparams.tau)
            target_params.data.update_(saved)
        return self._updater

    def on_fit_start(self) -> None:
        self.filter.eval()
        self.target_updater()  # before the first loss call (TorchRL warns about target params without an updater)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, beliefs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Actions [..., A] for raw beliefs [..., D]: the TanhNormal's deterministic action (tanh of its
        location) by default, a sample otherwise."""
        td = TensorDict({BELIEF: self.normalizer(beliefs.to(self.device))}, batch_size=beliefs.shape[:-1])
        mode = ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM
        loss = self.loss_module
        with set_exploration_type(mode), loss.actor_network_params.to_module(loss.actor_network):
            return loss.actor_network(td)["action"]

    # ------------------------------------------------------------------ data -> transitions
    def compute_beliefs(self, batch: TensorDictBase) -> torch.Tensor:
        """Beliefs [B, L, D] of a data batch (frozen filter, fp32)."""
        return self.filter.beliefs(batch)

    @staticmethod
    def flat_transitions(beliefs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                         index: torch.Tensor | None = None, n_step: int = 1, gamma: float = 1.0) -> TensorDict:
        """Transitions from sequences [B, L, ...] as a flat TensorDict (beliefs raw, not standardised).

        ``n_step = 1``: (b_t, a_t, r_{t+1}, b_{t+1}) for t < L-1. ``n_step = n``: (b_t, a_t, R, b_{t+n}) with the
        discounted sum ``R = sum_{k<n} gamma^k r_{t+1+k}`` of the logged rewards, for t < L-n (the TD target
        then discounts by ``gamma ** n``). ``index`` (optional) selects flat transitions (``row * (L - n) + t``).
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
        n = b.shape[0]
        false = torch.zeros(n, 1, dtype=torch.bool, device=b.device)
        return TensorDict({BELIEF: b, "action": a.float(),
                           "next": {BELIEF: nb, "reward": r.float(), "done": false, "terminated": false.clone()}},
                          batch_size=[n], device=b.device)

    def transitions(self, beliefs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                    index: torch.Tensor | None = None) -> TensorDict:
        """:meth:`flat_transitions` with this module's ``n_step`` and ``gamma``."""
        return self.flat_transitions(beliefs, actions, rewards, index, self.hparams.n_step, self.hparams.gamma)

    def normalize(self, td: TensorDictBase) -> TensorDictBase:
        """Standardise ``belief`` and ``("next", "belief")`` (a new TensorDict; the input is left as it is)."""
        out = td.copy()
        out["next"] = td["next"].copy()
        out[BELIEF] = self.normalizer(td[BELIEF])
        out["next", BELIEF] = self.normalizer(td["next", BELIEF])
        return out

    def _insert_cache(self, beliefs: torch.Tensor, batch: TensorDictBase) -> None:
        B = beliefs.shape[0]
        capacity = self.hparams.belief_cache_batches * B
        if self._cache is None or self._cache["belief"].shape[0] != capacity or self._cache["belief"].shape[1:] != beliefs.shape[1:]:
            L = beliefs.shape[1]
            self._cache = {"belief": beliefs.new_zeros(capacity, L, beliefs.shape[-1]),
                           "action": beliefs.new_zeros(capacity, L, self.action_dim),
                           "reward": beliefs.new_zeros(capacity, L, 1)}
            self._cache_filled = self._cache_next = 0
        rows = (torch.arange(B, device=beliefs.device) + self._cache_next) % capacity
        self._cache["belief"][rows] = beliefs
        self._cache["action"][rows] = batch["action"].to(beliefs.device).float()
        self._cache["reward"][rows] = batch[REWARD].to(beliefs.device).float()
        self._cache_next = (self._cache_next + B) % capacity
        self._cache_filled = min(capacity, self._cache_filled + B)

    def _cache_state(self) -> dict[str, Any] | None:
        """The belief cache as plain CPU tensors and ints (for checkpoints), None when there is none."""
        if self._cache is None:
            return self._pending_cache
        return {**{k: v.detach().cpu().clone() for k, v in self._cache.items()},
                "filled": int(self._cache_filled), "next": int(self._cache_next)}

    def _restore_cache(self, state: dict[str, Any]) -> None:
        self._cache = {k: state[k].to(self.device) for k in ("belief", "action", "reward")}
        self._cache_filled, self._cache_next = int(state["filled"]), int(state["next"])
        self._pending_cache = None

    def fit_normalizer(self, beliefs: torch.Tensor) -> None:
        """Fit the belief statistics on the first training batch (rank 0's under DDP, broadcast to all ranks)."""
        if bool(self.normalizer.ready) or not self.normalizer.enabled:
            return
        self.normalizer.fit(beliefs)
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.broadcast((self.normalizer.mean.clone(), self.normalizer.std.clone()), src=0)
            self.normalizer.mean.copy_(stats[0].to(self.device))
            self.normalizer.std.copy_(stats[1].to(self.device))

    def sample_transitions(self, batch: TensorDictBase) -> TensorDict:
        """The training transitions of one step (raw beliefs), from the batch or the belief cache."""
        hp = self.hparams
        n = hp.transition_batch_size
        if hp.belief_cache_batches > 0:
            if self._cache is None and self._pending_cache is not None:
                self._restore_cache(self._pending_cache)
            capacity = None if self._cache is None else self._cache["belief"].shape[0]
            if capacity is None or self._cache_filled < capacity or self.global_step % hp.refresh_every == 0:
                beliefs = self.compute_beliefs(batch)
                self.fit_normalizer(beliefs)
                self._insert_cache(beliefs, batch)
            cache, rows, L = self._cache, self._cache_filled, self._cache["belief"].shape[1]
            index = torch.randint(rows * (L - hp.n_step), (n,), device=cache["belief"].device)
            return self.transitions(cache["belief"][:rows], cache["action"][:rows], cache["reward"][:rows], index)
        beliefs = self.compute_beliefs(batch)
        self.fit_normalizer(beliefs)
        actions, rewards = batch["action"].to(beliefs.device), batch[REWARD].to(beliefs.device)
        B, L = beliefs.shape[:2]
        index = None if n is None else torch.randint(B * (L - hp.n_step), (n,), device=beliefs.device)
        return self.transitions(beliefs, actions, rewards, index)

    # ------------------------------------------------------------------ losses
    def compute_losses(self, transitions: TensorDictBase) -> dict[str, torch.Tensor]:
        """All loss terms for standardised transitions; ``loss`` is their sum (each term only reaches its own
        parameters: critics for loss_qvalue / loss_cql, actor for loss_actor, log_alpha for loss_alpha,
        log_alpha_prime for loss_alpha_prime). The input TensorDict is not modified."""
        loss = self.loss_module
        td = transitions.copy()  # the loss writes pred_q1 / pred_q2 / cql_q*_loss into it
        q_loss, _ = loss.q_loss(td)
        out: dict[str, torch.Tensor] = {"loss_qvalue": q_loss, "q_data": td.get(loss.tensor_keys.pred_q1).detach().mean()}
        if self.conservative:
            cql_loss, _ = loss.cql_loss(td)
        else:
            cql_loss = q_loss.new_zeros(())
        out["loss_cql"] = cql_loss
        actor_loss, actor_meta = loss.actor_loss(td)
        alpha_loss, _ = loss.alpha_loss(actor_meta)
        out["loss_actor"], out["loss_alpha"] = actor_loss, alpha_loss
        out["alpha"] = loss._alpha.detach()
        out["entropy"] = -actor_meta[loss.tensor_keys.log_prob].detach().mean()
        total = q_loss + actor_loss + alpha_loss
        if self.with_lagrange:
            alpha_prime = loss.log_alpha_prime.exp().clamp(0.0, 1e6)
            # the multiplier sees the detached gap (per critic), the critics a detached multiplier
            out["loss_alpha_prime"] = -alpha_prime * (cql_loss.detach() / 2 - self.hparams.lagrange_thresh)
            out["alpha_prime"] = alpha_prime.detach()
            total = total + alpha_prime.detach() * cql_loss + out["loss_alpha_prime"]
        else:
            total = total + cql_loss
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ training
    def _noise(self, stream: int, index: int):
        """The global RNG seeded for (noise_seed, stream, rank, index) inside the block, restored after."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return seeded_rng(derive_seed(self.noise_seed, stream, rank, index), self.device)

    def _loss_keys(self) -> list[str]:
        return [*LOSS_KEYS, *(["loss_alpha_prime"] if self.with_lagrange else [])]

    def training_step(self, batch: TensorDictBase, batch_idx: int) -> None:
        with self._noise(TRAIN_NOISE, derive_seed(self.global_step, batch_idx)):
            transitions = self.normalize(self.sample_transitions(batch))
            losses = self.compute_losses(transitions)
        check_finite({"train/loss": losses["loss"], **{f"losses/{k}": losses[k] for k in self._loss_keys()}},
                     self.global_step)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        if self.hparams.grad_clip > 0:
            for group in opt.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], self.hparams.grad_clip)
        opt.step()
        self.target_updater().step()
        self._log("train", losses, transitions.batch_size[0])
        self.log_dict({f"losses/{k}": losses[k].detach() for k in self._loss_keys()},
                      batch_size=transitions.batch_size[0])

    def validation_step(self, batch: TensorDictBase, batch_idx: int) -> None:
        beliefs = self.compute_beliefs(batch)
        transitions = self.normalize(self.transitions(beliefs, batch["action"].to(beliefs.device),
                                                           batch[REWARD].to(beliefs.device)))
        with torch.no_grad(), self._noise(VAL_NOISE, batch_idx):
            losses = self.compute_losses(transitions)
        self._log("val", losses, transitions.batch_size[0])

    def _log(self, prefix: str, losses: dict[str, torch.Tensor], n: int) -> None:
        keys = [*LOSS_KEYS, "q_data", "alpha", "entropy"] + (["loss_alpha_prime", "alpha_prime"] if self.with_lagrange else [])
        self.log_dict({f"{prefix}/{k}": losses[k].detach() for k in keys}, batch_size=n, prog_bar=False)
        self.log(f"{prefix}/loss", losses["loss"].detach(), batch_size=n, prog_bar=prefix == "train")

    def configure_optimizers(self):
        hp, loss = self.hparams, self.loss_module
        actor = list(loss.actor_network_params.values(True, True))
        critic = list(loss.qvalue_network_params.values(True, True))
        opts = [torch.optim.Adam(actor, lr=hp.actor_lr), torch.optim.Adam(critic, lr=hp.critic_lr)]
        if isinstance(loss.log_alpha, torch.nn.Parameter):
            opts.append(torch.optim.Adam([loss.log_alpha], lr=hp.alpha_lr))
        if self.with_lagrange:
            opts.append(torch.optim.Adam([loss.log_alpha_prime], lr=hp.critic_lr))
        return group_optimizers(*opts)

    # ------------------------------------------------------------------ data checks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        self.check_datamodule(dm)
        dataset = getattr(dm, "dataset", None)
        if dataset is not None and getattr(dataset, "env_config", None) is not None:
            self.env_config = _plain(dataset.env_config.to_dict())
        hp = getattr(dm, "hparams", {})
        self.data_config = {k: hp[k] for k in ("root", "mode", "num_segments", "segment_length", "episode_length")
                            if k in hp}

    def check_datamodule(self, dm: Any) -> None:
        """``ValueError`` naming every way the data module's data does not fit the filter."""
        fhp = self.filter.hparams
        problems = []
        dm_keys = getattr(dm, "obs_keys", None)
        if dm_keys is not None:
            missing = [k for k in self.filter.obs_keys if k not in tuple(dm_keys)]
            if missing:
                problems.append(f"observation mode: the filter reads {list(self.filter.obs_keys)} but the data module "
                                f"delivers {list(dm_keys)}")
        sampler = getattr(dm, "sampler", None)
        shapes = getattr(sampler, "feature_shapes", None) or {}
        if "action" in shapes and tuple(shapes["action"][0]) != (fhp.action_dim,):
            problems.append(f"action size: the data's actions have shape {tuple(shapes['action'][0])}, the filter "
                            f"was trained with action_dim={fhp.action_dim}")
        if "state" in self.filter.obs_keys and "state" in shapes and tuple(shapes["state"][0]) != (fhp.state_dim,):
            problems.append(f"state size: the data's state has shape {tuple(shapes['state'][0])}, the filter expects "
                            f"state_dim={fhp.state_dim}")
        if "pixels" in self.filter.obs_keys and "pixels" in shapes:
            want = (3, fhp.image_size, fhp.image_size)
            if tuple(shapes["pixels"][0]) != want:
                problems.append(f"image size: the data's pixels are {tuple(shapes['pixels'][0])}, the filter expects {want}")
        num_tasks = getattr(sampler, "num_tasks", None)
        if num_tasks is not None and num_tasks != fhp.num_tasks:
            problems.append(f"task count: the data has {num_tasks} tasks, the filter was trained with num_tasks={fhp.num_tasks}")
        if problems:
            raise ValueError(f"the filter from {self.hparams.filter_checkpoint!r} does not match the data: " + "; ".join(problems))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["filter_hparams"] = _plain(dict(self.filter.hparams))
        checkpoint["env_config"] = _plain(self.env_config)
        checkpoint["data_config"] = _plain(self.data_config)
        checkpoint["noise_seed"] = self.noise_seed  # a plain int
        cache = self._cache_state()
        if cache is not None:
            checkpoint["belief_cache"] = cache  # plain tensors and ints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.env_config = checkpoint.get("env_config", self.env_config)
        self.data_config = checkpoint.get("data_config", self.data_config)
        if "noise_seed" in checkpoint:
            self.noise_seed = int(checkpoint["noise_seed"])
        # restored on the first training step (after Lightning moved the module to its device)
        self._pending_cache = checkpoint.get("belief_cache") if self.hparams.belief_cache_batches > 0 else None
        self._cache = None
        self._cache_filled = self._cache_next = 0
        self._updater = None

    @classmethod
    def load_phase2(cls, path: str | Path, map_location: Any = "cpu") -> "LatentCQLModule":
        """Restore a phase-2 checkpoint on its own (the filter comes from the checkpoint, not ``filter_checkpoint``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"phase-2 checkpoint {str(path)!r} does not exist")
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        if "filter_hparams" not in ckpt or "hyper_parameters" not in ckpt:
            raise ValueError(f"{str(path)!r} is not a LatentCQLModule checkpoint (no filter_hparams / hyper_parameters)")
        hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
        model = cls(**hp, filter_hparams=ckpt["filter_hparams"])
        model.load_state_dict(ckpt["state_dict"])
        model.on_load_checkpoint(ckpt)
        model.eval()
        return model


def _plain(value: Any) -> Any:
    """Plain Python containers (lists for tuples) so that checkpoints hold no custom objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
