"""Phase 2: conservative Q-learning on the frozen belief filter's beliefs (paper section 3.7), Lightning hooks only.

The filter comes from phase 1 as a plain :class:`~lightning_modules.filter.belief_filter.BeliefFilter`
(``filter_checkpoint``, an init argument, not ``--ckpt_path``); it turns every meta-exploration batch [B, L] into
beliefs, cut into transitions by :mod:`lightning_modules.cql.transitions` and fed to
:class:`~lightning_modules.cql.loss.LatentCQLLoss` (TorchRL's ``CQLLoss``) with the TanhNormal actor and twin
critics of :mod:`lightning_modules.cql.networks` on standardised beliefs, ``SoftUpdate`` target critics and one Adam
grouping the actor, critic and temperature optimisers (``torchrl.objectives.group_optimizers``; manual
optimisation, one optimizer step per training step, so ``global_step`` counts updates).

Choices: ``deterministic_backup=True`` (SAC's soft backup buried the sparse 0/1 reward); beliefs standardised with
statistics of the first training batch (rank 0's under DDP, broadcast; buffers in the checkpoint); a fixed
conservative weight by default; "No CQL" = ``conservative=False`` (or ``cql_weight=0``).

The frozen filter (eval mode, ``requires_grad=False``, not in the optimizer) is the submodule ``filter`` and its
constructor arguments are saved in every checkpoint (``checkpoint["belief_filter"]``), so a phase-2 checkpoint is
self-contained: :meth:`LatentCQLModule.load_phase2` never reads ``filter_checkpoint``. The dataset's env parameters
are stored too (``checkpoint["env_config"]``) for the evaluation.

Optional belief cache (``belief_cache_batches > 0``, :class:`~lightning_modules.cql.transitions.BeliefCache`): a
new data batch is filtered only every ``refresh_every`` steps (every step until full), each update samples
``transition_batch_size`` transitions from the whole cache; it is saved in checkpoints (rank 0's under DDP).

Logs: the loss terms under ``losses/`` (``losses/loss_qvalue``, ``losses/loss_cql``, ``losses/loss_actor``,
``losses/loss_alpha``; Lagrange: ``losses/loss_alpha_prime``), ``train/loss`` and the diagnostics ``train/q_data``
(mean Q of dataset actions), ``train/alpha``, ``train/entropy`` (``train/alpha_prime``), and the same under ``val/``
on validation batches (no update).

Guards: non-finite loss terms stop the run naming them; the randomness of a training step is drawn from the global
RNG seeded by (``noise_seed``, stream, rank, global step) and restored afterwards, so a resumed run
continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import SoftUpdate, ValueEstimators, group_optimizers

from envs.keys import ACTION, REWARD
from lightning_modules.cql.loss import TOTAL, LatentCQLLoss
from lightning_modules.cql.networks import BELIEF, BeliefNormalizer, make_actor, make_qvalue, move_distribution_kwargs
from lightning_modules.cql.hparams import check_hparams
from lightning_modules.cql.stabilizers import PolyakActor, lr_factor
from lightning_modules.cql.transitions import BeliefCache, flat_transitions, bc_segment_mask, random_index
from lightning_modules.filter.belief_filter import SPEC_KEY, BeliefFilter
from lightning_modules.guards import PHASE_KEY, check_finite, check_phase, step_noise

PHASE = "cql"
TRAIN_NOISE, VAL_NOISE = 0, 1  # random streams of training and validation steps


class LatentCQLModule(pl.LightningModule):
    """CQL (or SAC, ``conservative=False``) on the beliefs of a frozen belief filter; see the module docstring.

    Args:
        filter_checkpoint: phase-1 checkpoint (or a phase-2 one: its filter); must exist (checked first).
        gamma: discount. tau: Polyak factor of the target critics.
        n_step: bootstrap after n logged steps (discounted n-step reward sums, TD target discounted by
            ``gamma ** n_step``); 1 = one-step TD.
        conservative: add the CQL term; False (or ``cql_weight == 0``) gives the "No CQL" ablation.
        cql_weight: weight of the conservative term (TorchRL's ``min_q_weight``; the paper's beta).
        cql_temperature, num_random: CQL's logsumexp temperature and number of sampled actions per belief.
        with_lagrange, lagrange_thresh: tune the conservative weight to keep the gap at ``lagrange_thresh``
            (leak-free version, :mod:`lightning_modules.cql.loss`). Off by default.
        alpha_init, fixed_alpha, target_entropy: SAC entropy temperature (auto-tuned to ``target_entropy``,
            "auto" = -action_dim, unless fixed).
        deterministic_backup: no entropy bonus in the TD target. max_q_backup: CQL's max-over-actions backup.
        loss_function: TD loss ("l2", "smooth_l1", "l1").
        actor_lr, critic_lr, alpha_lr: Adam learning rates; grad_clip: per-network gradient-norm clip (0 = off).
        lr_schedule, lr_final, lr_decay_steps: "constant" or "cosine" decay of every learning rate to
            ``lr_final`` x its value at ``lr_decay_steps`` updates (None = the trainer's ``max_steps``).
        actor_polyak: act with a Polyak average of the actor (decay per update, e.g. 0.995; 0 = the actor itself),
            :class:`~lightning_modules.cql.stabilizers.PolyakActor`.
        bc_weight: behaviour-cloning term on the actor (TD3+BC style, 0 = off), :mod:`lightning_modules.cql.loss`.
        bc_filter: which transitions it imitates: ``all``, ``identified`` (rewarded segments whose target the
            earlier segments identify) or ``search`` (also those trying the drawer a systematic search tries
            next): :func:`~lightning_modules.cql.transitions.bc_segment_mask`.
        hidden_dim, num_layers, activation: actor and critic MLPs.
        transition_batch_size: transitions per update (None = every transition of the data batch without a cache).
            Not called ``batch_size``: the DataModule's ``batch_size`` (meta-trajectories) shares the hparams namespace.
        belief_cache_batches, refresh_every: optional belief cache (0 = off), see the module docstring.
        normalize_beliefs, belief_min_std: standardise beliefs with first-batch statistics.
        filter_spec: internal, set by :meth:`load_phase2`: build the filter from these constructor arguments instead
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
        lr_schedule: str = "constant",
        lr_final: float = 0.1,
        lr_decay_steps: int | None = None,
        actor_polyak: float = 0.0,
        bc_weight: float = 0.0,
        bc_filter: str = "all",
        hidden_dim: int = 256,
        num_layers: int = 2,
        activation: str = "relu",
        transition_batch_size: int | None = 256,
        belief_cache_batches: int = 0,
        refresh_every: int = 1,
        normalize_beliefs: bool = True,
        belief_min_std: float = 1e-3,
        filter_spec: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["filter_spec"])
        # fail on the filter before any other work
        if not filter_spec and not filter_checkpoint:
            raise ValueError("filter_checkpoint is required: the phase-1 run's checkpoints/last.ckpt")
        self.filter = BeliefFilter.from_spec(filter_spec) if filter_spec else BeliefFilter.load(filter_checkpoint)
        check_hparams(self.hparams)
        conservative = bool(conservative) and cql_weight > 0
        if with_lagrange and not conservative:
            warnings.warn("with_lagrange=True has no effect without the conservative term", stacklevel=2)

        self.automatic_optimization = False
        self.filter.requires_grad_(False)
        self.filter.eval()
        belief_dim, action_dim = self.filter.belief_dim, self.filter.action_dim
        self.normalizer = BeliefNormalizer(belief_dim, enabled=normalize_beliefs, min_std=belief_min_std)
        actor = make_actor(belief_dim, action_dim, hidden_dim, num_layers, activation)
        critics = [make_qvalue(belief_dim, action_dim, hidden_dim, num_layers, activation) for _ in range(2)]
        self.loss_module = LatentCQLLoss(
            actor, critics, conservative=conservative, with_lagrange=with_lagrange, lagrange_thresh=lagrange_thresh,
            loss_function=loss_function, alpha_init=alpha_init, fixed_alpha=fixed_alpha,
            target_entropy=target_entropy, delay_qvalue=True, temperature=cql_temperature, min_q_weight=cql_weight,
            max_q_backup=max_q_backup, deterministic_backup=deterministic_backup, num_random=num_random,
            bc_weight=bc_weight,
        )
        # the deployed policy: a Polyak average of the actor (a submodule only when used: older checkpoints load)
        self.acting_actor = (PolyakActor(make_actor(belief_dim, action_dim, hidden_dim, num_layers, activation),
                                         self.loss_module.actor_network_params, actor_polyak)
                             if actor_polyak > 0 else None)
        # n-step transitions carry the discounted reward sum; the TD target discounts their successor by gamma^n
        self.loss_module.make_value_estimator(ValueEstimators.TD0, gamma=gamma ** n_step)
        self._updater: SoftUpdate | None = None
        self.env_config: dict[str, Any] | None = None  # the dataset's env parameters (set in setup, checkpointed)
        self.data_config: dict[str, Any] | None = None
        self.cache = BeliefCache(belief_cache_batches)
        self.loaded_step = self.loaded_epoch = -1  # set by load_phase2: where the loaded checkpoint was written
        # seed of the training noise: the seed_everything / manual_seed in force (draws nothing); kept in checkpoints
        self.noise_seed = int(torch.initial_seed())
        self.target_updater()

    @property
    def conservative(self) -> bool:
        return self.loss_module.conservative

    @property
    def with_lagrange(self) -> bool:
        return self.loss_module.with_lagrange

    @property
    def action_dim(self) -> int:
        return self.filter.action_dim

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True):
        super().train(mode)
        self.filter.eval()  # frozen: always in eval mode
        return self

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        move_distribution_kwargs(self, fn)
        self._updater = None  # its cached parameter references are stale after a move
        self.cache.clear()
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
        if self.acting_actor is not None:
            with set_exploration_type(mode):
                return self.acting_actor(td)[ACTION]
        loss = self.loss_module
        with set_exploration_type(mode), loss.actor_network_params.to_module(loss.actor_network):
            return loss.actor_network(td)[ACTION]

    # ------------------------------------------------------------------ data -> transitions
    def compute_beliefs(self, batch: TensorDictBase) -> torch.Tensor:
        """Beliefs [B, L, D] of a data batch (frozen filter, fp32)."""
        return self.filter.beliefs(batch)

    def transitions(self, beliefs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                    index: torch.Tensor | None = None, bc_mask: torch.Tensor | None = None) -> TensorDict:
        """:func:`~lightning_modules.cql.transitions.flat_transitions` with this module's ``n_step`` and ``gamma``."""
        return flat_transitions(beliefs, actions, rewards, index, self.hparams.n_step, self.hparams.gamma, bc_mask)

    def normalize(self, td: TensorDictBase) -> TensorDictBase:
        """Standardise ``belief`` and ``("next", "belief")`` (a new TensorDict; the input is left as it is)."""
        out = td.copy()
        out["next"] = td["next"].copy()
        out[BELIEF] = self.normalizer(td[BELIEF])
        out["next", BELIEF] = self.normalizer(td["next", BELIEF])
        return out

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
        if hp.belief_cache_batches > 0:
            self.cache.materialize(self.device)
            if not self.cache.is_full() or self.global_step % hp.refresh_every == 0:
                beliefs = self.compute_beliefs(batch)
                self.fit_normalizer(beliefs)
                self.cache.insert(beliefs, batch[ACTION], batch[REWARD], self.bc_mask(batch))
            return self.cache.sample(hp.transition_batch_size, hp.n_step, hp.gamma)
        beliefs = self.compute_beliefs(batch)
        self.fit_normalizer(beliefs)
        actions, rewards = batch[ACTION].to(beliefs.device), batch[REWARD].to(beliefs.device)
        B, L = beliefs.shape[:2]
        n = hp.transition_batch_size
        index = None if n is None else random_index(B, L, hp.n_step, n, beliefs.device)
        return self.transitions(beliefs, actions, rewards, index, self.bc_mask(batch))

    def bc_mask(self, batch: TensorDictBase) -> torch.Tensor | None:
        """The behaviour-cloning mask [B, L, 1] of a data batch (``bc_filter``), None when every step is kept."""
        if self.hparams.bc_weight <= 0 or self.hparams.bc_filter == "all":
            return None
        return bc_segment_mask(batch, self.filter.num_tasks, self.hparams.bc_filter).to(self.device)

    def compute_losses(self, transitions: TensorDictBase) -> TensorDict:
        """Every loss term, the diagnostics and the total ``loss`` for standardised transitions (input unchanged)."""
        return self.loss_module(transitions)

    # ------------------------------------------------------------------ training
    def _noise(self, stream: int, index: int):
        return step_noise(self, self.noise_seed, stream, index, self.device)

    def training_step(self, batch: TensorDictBase, batch_idx: int) -> None:
        with self._noise(TRAIN_NOISE, self.global_step):  # the step alone: independent of epoch length
            transitions = self.normalize(self.sample_transitions(batch))
            losses = self.compute_losses(transitions)
        terms = self.loss_module.loss_terms
        check_finite({"train/loss": losses[TOTAL], **{f"losses/{k}": losses[k] for k in terms}}, self.global_step,
                     batch)
        opt = self.optimizers()
        self._schedule_lr(opt)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(losses[TOTAL])
        if self.hparams.grad_clip > 0:
            for group in opt.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], self.hparams.grad_clip)
        opt.step()
        self.target_updater().step()
        if self.acting_actor is not None:
            self.acting_actor.update(self.loss_module.actor_network_params)
        n = transitions.batch_size[0]
        self.log_dict({f"losses/{k}": losses[k].detach() for k in terms}, batch_size=n)
        self._log("train", losses, n)

    def _schedule_lr(self, opt) -> None:
        """Set every group's learning rate for this update (a function of ``global_step`` alone: resumes exactly)."""
        hp = self.hparams
        if hp.lr_schedule == "constant":
            return
        total = hp.lr_decay_steps or (self.trainer.max_steps if self._trainer is not None else -1)
        factor = lr_factor(hp.lr_schedule, self.global_step, total, hp.lr_final)
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * factor
        self.log("train/lr_factor", factor, batch_size=1)

    def validation_step(self, batch: TensorDictBase, batch_idx: int) -> None:
        beliefs = self.compute_beliefs(batch)
        transitions = self.normalize(self.transitions(beliefs, batch[ACTION].to(beliefs.device),
                                                      batch[REWARD].to(beliefs.device)))
        with torch.no_grad(), self._noise(VAL_NOISE, batch_idx):
            losses = self.compute_losses(transitions)
        self.log_dict({f"val/{k}": losses[k].detach() for k in self.loss_module.loss_terms},
                      batch_size=transitions.batch_size[0])
        self._log("val", losses, transitions.batch_size[0])

    def _log(self, prefix: str, losses: TensorDict, n: int) -> None:
        self.log_dict({f"{prefix}/{k}": losses[k].detach() for k in self.loss_module.diagnostics}, batch_size=n)
        self.log(f"{prefix}/loss", losses[TOTAL].detach(), batch_size=n, prog_bar=prefix == "train")

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
        self.filter.check_datamodule(dm, f"the filter from {self.hparams.filter_checkpoint!r}")
        dataset = getattr(dm, "dataset", None)
        if dataset is not None and getattr(dataset, "env_config", None) is not None:
            self.env_config = _plain(dataset.env_config.to_dict())
        hp = getattr(dm, "hparams", {})
        self.data_config = {k: hp[k] for k in ("root", "mode", "num_segments", "segment_length", "episode_length")
                            if k in hp}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PHASE_KEY] = PHASE
        checkpoint[SPEC_KEY] = self.filter.spec()
        checkpoint["env_config"] = _plain(self.env_config)
        checkpoint["data_config"] = _plain(self.data_config)
        checkpoint["noise_seed"] = self.noise_seed  # a plain int
        cache = self.cache.state_dict()
        if cache is not None:
            checkpoint["belief_cache"] = cache  # plain tensors and ints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_phase(checkpoint, PHASE, "the LatentCQLModule",
                    getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None)
        self.env_config = checkpoint.get("env_config", self.env_config)
        self.data_config = checkpoint.get("data_config", self.data_config)
        if "noise_seed" in checkpoint:
            self.noise_seed = int(checkpoint["noise_seed"])
        # restored on the first training step (after Lightning moved the module to its device)
        self.cache.load_state_dict(checkpoint.get("belief_cache") if self.hparams.belief_cache_batches > 0 else None)
        self._updater = None

    @classmethod
    def load_phase2(cls, path: str | Path, map_location: Any = "cpu") -> "LatentCQLModule":
        """Restore a phase-2 checkpoint on its own (the filter comes from the checkpoint, not ``filter_checkpoint``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"phase-2 checkpoint {str(path)!r} does not exist")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"phase-2 checkpoint {str(path)!r} could not be read: {err}") from err
        if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt:
            raise ValueError(f"{str(path)!r} is not a LatentCQLModule checkpoint (no hyper_parameters)")
        check_phase(ckpt, PHASE, "the evaluation", path)
        spec = BeliefFilter.checkpoint_spec(ckpt)[0]  # the weights come with the phase-2 state dict below
        hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_") and k != "filter_hparams"}
        model = cls(**hp, filter_spec=spec)
        model.load_state_dict(ckpt["state_dict"])
        model.on_load_checkpoint(ckpt)
        model.loaded_step, model.loaded_epoch = int(ckpt.get("global_step", -1)), int(ckpt.get("epoch", -1))
        model.eval()
        return model


def _plain(value: Any) -> Any:
    """Plain Python containers (lists for tuples) so that checkpoints hold no custom objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
