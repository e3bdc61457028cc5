"""Phase 1: the variational filter (paper section 3.6) as a ``LightningModule``.

Fits a sequential latent-variable model on synthetic-exploration batches (``MetaExplorationDataModule``,
TensorDict [B, L], L = K*T) by maximising the paper's extended ELBO

    sum_t log O(o_t | s_t) + beta * log R(r_t | s_t) - sum_t KL(q(s_t | h_t, o_t, r_t) || p(s_t | h_t)),
    h_t = GRU(h_{t-1}, [s_{t-1}, a_{t-1}])

with the reward both an input to the posterior and a reconstruction target. The latent state is initialised
once, at the start of the sequence, and never reset between the K segments (``segment_start`` is ignored on
purpose: carrying the state over is what lets the filter accumulate task evidence across episodes).

Alignment (phase 2 and online evaluation depend on it)
------------------------------------------------------
Batch index ``t`` holds ``o_t`` (``pixels``/``state``), ``a_t`` (``action``) and ``r_{t+1} =
("next", "reward")[t]``, the reward received after ``a_t``. Filter step ``t`` sees ``o_t`` together with
``r_t = ("next", "reward")[t-1]`` (0 at ``t = 0``) and the transition from ``(s_{t-1}, a_{t-1})``
(``a_{-1} = 0``). At a segment boundary the previous episode's last reward therefore reaches the belief
together with the next episode's first observation, as online (env reset, belief carried over). The
reward model reconstructs the same ``r_t`` (the paper's ``log R(r_t | s_t)``); ``prior_reward_weight > 0``
adds ``beta * prior_reward_weight * log R(r_t | s~_t)`` with ``s~_t ~ p(s_t | h_t)``, i.e. the reward is also
predicted BEFORE it is seen, from a state that has not seen it, which forces the task into ``h_t``. This term
is not in the paper's ELBO; it is on by default (1.0) because, on the state quickstart, the pure ELBO
(``prior_reward_weight: 0``) let the task fade from the belief within an episode after a rewarded segment
(probe 0.65 twenty steps into the next episode vs 1.0 with it; see ``val/probe_acc_seg{k}_step{j}``).

Belief state for phase 2 (the hand-over: :class:`~lightning_modules.filter.belief_filter.BeliefFilter`)
--------------------------------------------------------------------------------------------------------
``belief_t = [mean_t, var_t, h_t]`` of the posterior ``q(s_t | h_t, o_t, r_t)`` (size ``2 * stoch_dim +
deter_dim``, :attr:`belief_dim`). ``belief_t`` summarises ``o_{0..t}``, ``a_{0..t-1}``, ``r_{0..t}``: it is
the input of the policy choosing ``a_t``, and ``belief_{t+1}`` is its successor. Beliefs are
deterministic: when computing them the posterior MEAN is fed forward as ``s_t`` (training feeds samples),
and they are computed in fp32 (autocast disabled) whatever the training precision, so that offline and
online beliefs agree.

* ``beliefs(batch) -> [B, L, D]``: for training data (no grad, eval mode).
* ``initial_state(B)``, then per step ``step(state, obs, action, reward) -> (belief [B, D], state)`` with
  ``obs = o_t`` (dict of key -> [B, ...], uint8 pixels), ``action = a_{t-1}`` and ``reward = r_t`` (zeros
  at the start). Feeding a batch's sequence through ``step`` reproduces ``beliefs(batch)``.

Logs: ``train/loss``, ``train/elbo`` and ``losses/*`` (per-step nats: ``obs_nll``, ``reward_nll``, ``kl``,
``prior_reward_nll``); ``val/*`` the same, plus reward-prediction MSE on target (rewarded) vs non-target
segments from the posterior and from the prior, and the task-inference probe (a logistic read-out of
``target_task`` fitted on half of the validation beliefs, scored on the other half): ``val/probe_acc_init``
(belief at ``t = 0``: chance) and ``val/probe_acc_seg{k}`` (belief at the last step of segment ``k``), split
into ``..._target`` / ``..._other`` by whether segment ``k`` came from the target task (was rewarded). The end
of a segment is an easy position: the open drawer is in view and the reward arrives with it, so even an
untrained, memoryless filter scores ~1 there. The memory test is ``val/probe_acc_seg{k}_step{j}`` (``k >= 1``,
``j`` = 1 and T/2): beliefs inside the next episode, after the scene was reset, where only what the filter
carried over can tell the task (chance for a filter that forgets), split into ``..._prev_target`` /
``..._prev_other`` by the preceding segment (:mod:`lightning_modules.filter.probe`). Image reconstructions
and open-loop predictions: the :class:`~lightning_modules.callbacks.filter_images.FilterImageLogger` callback. ``hp/val_loss`` and ``hp/probe_acc_memory`` (=
``val/probe_acc_seg1_step1``) are the metrics of TensorBoard's HParams tab (hyperparameters logged at train start).

Training guards: a NaN/inf loss term stops the run with ``FloatingPointError`` naming it
(:func:`lightning_modules.guards.check_finite`). The sampling noise of a training step is drawn from the global
RNG seeded by (``noise_seed``, rank, global step) and the global state is restored afterwards
(validation: fixed noise per batch index), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have (``noise_seed`` is ``torch.initial_seed()`` at construction, i.e. the
``seed_everything`` seed, and is saved in checkpoints).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from tensordict import TensorDictBase

from envs.keys import PIXELS, TARGET_TASK, TASK
from lightning_modules.filter.augment import random_brightness, random_shift
from lightning_modules.filter.belief_filter import SPEC_KEY, BeliefFilter
from lightning_modules.filter.losses import REWARD_OUT, ElboWeights, elbo_loss, prior_reward_loss, shift_right
from lightning_modules.filter.probe import ProbeCollector, collect_probe_positions, probe_metrics
from lightning_modules.filter.rssm import FilterState
from lightning_modules.guards import PHASE_KEY, check_finite, check_phase, step_noise

PHASE = "filter"
TRAIN_NOISE, VAL_NOISE = 0, 1  # noise streams (see lightning_modules.guards.step_noise)
HP_VAL_LOSS = "hp/val_loss"


class VariationalFilterModule(pl.LightningModule):
    """Variational filter over meta-exploration sequences; see the module docstring.

    Args:
        obs_keys: observations the model reads ("pixels", "state" or both). Give the DataModule the same
            ``obs_keys``: Lightning refuses to log two hyperparameters of one name with different values.
        image_size: pixel observations are [3, image_size, image_size] uint8 (a multiple of 16).
        state_dim, action_dim: sizes of ``state`` and ``action``.
        num_tasks: number of tasks (classes of the task-inference probe; must match the data).
        deter_dim, stoch_dim: GRU state and Gaussian stochastic state sizes (LOMPO: 256 / 64).
        hidden_dim: width of the transition / posterior layers; mlp_hidden: width of the state and reward MLPs.
        cnn_depth: channels of the first conv layer (32 -> 64 -> 128 -> 256).
        state_embed_dim, reward_embed_dim: embedding sizes of the state and of the reward input.
        min_std: lower bound of the prior / posterior standard deviations.
        beta: weight of the reward log-likelihood (MELD: 10).
        reward_std: standard deviation of the Gaussian reward model.
        prior_reward_weight: weight (times beta) of predicting r_t from a prior sample (0 disables).
        kl_weight: weight of the KL term (1.0 = the ELBO); free_nats: the mean KL per step is clamped below at this.
        kl_balance: KL balancing (DreamerV2): the share of the KL's gradient that trains the prior; the rest pulls
            the posterior towards it. 0.5 = the plain KL; above, the posterior pays less for what it takes from
            the observation (:func:`lightning_modules.filter.losses.balanced_kl`).
        obs_std: standard deviation of the Gaussian observation model (of standardised states, of pixels in
            [-0.5, 0.5]). At 1.0 a hand position off by 2 cm costs ~0.01 nats: the beliefs locate the hand only
            roughly; smaller values ask for a sharper position.
        normalize_state: standardise ``state`` observations with statistics of the first training batch.
        lr, weight_decay: Adam(W); grad_clip: gradient norm clipping (0 disables; the Trainer's value wins).
        compile: ``torch.compile`` the recurrent cell (the per-step work of the time loop).
        probe_l2: L2 regularisation of the task-inference probe.
        recon_fraction: in training steps, reconstruct the images of this fraction of the B * L steps, drawn at
            random (the mean over them is an unbiased estimate of the image term; validation decodes every frame).
            The image decoder costs as much as the encoder: 0.25 trains ~1.6x faster from pixels (docs/BENCHMARKS.md).
        channels_last: keep the conv weights in ``torch.channels_last`` memory format (~1.1x faster on a CPU;
            checkpoints are the same either way).
        augment_shift, augment_brightness: training sequences only, one draw per sequence
            (:mod:`lightning_modules.filter.augment`): shift the images by up to this many pixels (DrQ), scale
            their values by 1 +- this factor. 0 = off.
    """

    def __init__(
        self,
        obs_keys: Sequence[str] = (PIXELS,),
        image_size: int = 64,
        state_dim: int = 6,
        action_dim: int = 4,
        num_tasks: int = 2,
        deter_dim: int = 256,
        stoch_dim: int = 64,
        hidden_dim: int = 256,
        mlp_hidden: int = 256,
        cnn_depth: int = 32,
        state_embed_dim: int = 256,
        reward_embed_dim: int = 32,
        min_std: float = 0.1,
        beta: float = 10.0,
        reward_std: float = 1.0,
        prior_reward_weight: float = 1.0,
        kl_weight: float = 1.0,
        free_nats: float = 0.0,
        kl_balance: float = 0.5,
        obs_std: float = 1.0,
        normalize_state: bool = True,
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        grad_clip: float = 100.0,
        compile: bool = False,
        probe_l2: float = 1e-2,
        recon_fraction: float = 1.0,
        channels_last: bool = False,
        augment_shift: int = 0,
        augment_brightness: float = 0.0,
    ):
        super().__init__()
        if not 0.0 < recon_fraction <= 1.0:
            raise ValueError(f"recon_fraction must be in (0, 1], got {recon_fraction}")
        if augment_shift < 0 or not 0.0 <= augment_brightness < 1.0:
            raise ValueError(f"augment_shift must be >= 0 and augment_brightness in [0, 1), got {augment_shift}, "
                             f"{augment_brightness}")
        self.save_hyperparameters()
        obs_keys = list(obs_keys)
        self.hparams["obs_keys"] = obs_keys  # a plain list in checkpoints / YAML and when merged with the
        self._hparams_initial["obs_keys"] = list(obs_keys)  # DataModule's hparams (same name, same value)
        self.weights = ElboWeights(beta, reward_std, prior_reward_weight, kl_weight, free_nats, obs_std, kl_balance)
        self.filter = BeliefFilter(**BeliefFilter.kwargs_from_hparams(self.hparams))
        if channels_last:
            self.filter.to(memory_format=torch.channels_last)
        self._probe = ProbeCollector()
        self._cell_fn = None
        # seed of the sampling noise: the seed_everything / manual_seed in force (draws nothing); kept in checkpoints
        self.noise_seed = int(torch.initial_seed())

    # ------------------------------------------------------------------ the belief API (delegated to the filter)
    @property
    def belief_dim(self) -> int:
        return self.filter.belief_dim

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return self.filter.obs_keys

    @property
    def rssm(self):
        return self.filter.rssm

    def beliefs(self, batch: TensorDictBase) -> torch.Tensor:
        """:meth:`BeliefFilter.beliefs`."""
        return self.filter.beliefs(batch)

    def initial_state(self, batch_size: int) -> FilterState:
        """:meth:`BeliefFilter.initial_state`."""
        return self.filter.initial_state(batch_size)

    def step(self, state: FilterState, obs: dict[str, torch.Tensor], action: torch.Tensor,
             reward: torch.Tensor) -> tuple[torch.Tensor, FilterState]:
        """:meth:`BeliefFilter.step`."""
        return self.filter.step(state, obs, action, reward)

    def check_batch(self, batch: TensorDictBase) -> None:
        """:meth:`BeliefFilter.check_batch`."""
        self.filter.check_batch(batch)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.filter.check_datamodule(dm, "the VariationalFilterModule")

    # ------------------------------------------------------------------ losses
    def _cell(self):
        if self.hparams.compile and self._cell_fn is None:
            self._cell_fn = torch.compile(self.filter.rssm.cell, dynamic=False)
        return self._cell_fn

    def compute_losses(self, batch: TensorDictBase, sample: bool = True,
                       recon_fraction: float = 1.0) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss (negative weighted ELBO, per step) and a dict of per-step terms and intermediates.

        ``recon_fraction < 1``: images are decoded and scored at that fraction of the steps only (drawn from the
        global RNG); ``info["dec"]`` then holds those frames only, ``info["pixel_index"]`` their flat indices.
        """
        rssm = self.filter.rssm
        out, reward_in = self.filter.run(batch, sample, step_fn=self._cell())
        obs = {k: batch[k] for k in self.obs_keys}
        pixel_index = None
        if PIXELS in obs and recon_fraction < 1.0:
            n_steps = batch.batch_size[0] * batch.batch_size[1]
            count = max(1, round(recon_fraction * n_steps))
            pixel_index = torch.randperm(n_steps, device=out["deter"].device)[:count]
            obs[PIXELS] = obs[PIXELS].reshape(n_steps, *obs[PIXELS].shape[2:])[pixel_index]
        target_obs = rssm.normalize_obs(obs)
        dec = rssm.decode(rssm.features(out["stoch"], out["deter"]), pixel_index=pixel_index)
        # (this order of the terms is the one the quickstart's results were made with: autograd sums gradients in it)
        loss, terms = elbo_loss(target_obs, dec, reward_in, out, self.weights)
        prior_mean, prior_std = out["prior_mean"], out["prior_std"]
        prior_state = prior_mean + prior_std * torch.randn_like(prior_std) if sample else prior_mean
        prior_reward = rssm.reward_decoder(rssm.features(prior_state, out["deter"]))
        added, terms["prior_reward_nll"] = prior_reward_loss(reward_in, prior_reward, self.weights)
        if self.weights.prior_reward_weight > 0:
            loss = loss + added
        return loss, {"terms": terms, "out": out, "dec": dec, "reward_in": reward_in, "prior_reward": prior_reward,
                      "pixel_index": pixel_index}

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.filter.fit_state_stats(batch)

    def _noise(self, stream: int, index: int):
        return step_noise(self, self.noise_seed, stream, index, self.filter.device)

    def training_step(self, batch: TensorDictBase, batch_idx: int) -> torch.Tensor:
        self.check_batch(batch)
        with self._noise(TRAIN_NOISE, self.global_step):  # the step alone: independent of epoch length
            batch = self._augment(batch)
            loss, info = self.compute_losses(batch, sample=True, recon_fraction=self.hparams.recon_fraction)
        terms = info["terms"]
        check_finite({"train/loss": loss, **{f"losses/{k}": v for k, v in terms.items() if k != "elbo"}},
                     self.global_step, batch)
        B = batch.batch_size[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/elbo", terms["elbo"], prog_bar=True, batch_size=B)
        self.log_dict({f"losses/{k}": v for k, v in terms.items() if k != "elbo"}, batch_size=B)
        return loss

    def _augment(self, batch: TensorDictBase) -> TensorDictBase:
        """The batch with augmented images (a shallow copy; the loader's batch is left as it is)."""
        shift, brightness = self.hparams.augment_shift, self.hparams.augment_brightness
        if PIXELS not in self.obs_keys or (shift <= 0 and brightness <= 0):
            return batch
        pixels = random_brightness(random_shift(batch[PIXELS], shift), brightness)
        batch = batch.clone(recurse=False)
        batch.set(PIXELS, pixels)
        return batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PHASE_KEY] = PHASE
        checkpoint[SPEC_KEY] = self.filter.spec()  # the hand-over: phase 2 rebuilds the filter from this
        checkpoint["noise_seed"] = self.noise_seed  # a plain int

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_phase(checkpoint, PHASE, "the VariationalFilterModule",
                    getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None)
        state = checkpoint.get("state_dict", {})
        if any(k.startswith("rssm.") for k in state):  # written before the filter was its own module
            checkpoint["state_dict"] = {("filter." + k if k.startswith("rssm.") or k == "state_stats_ready" else k): v
                                        for k, v in state.items()}
        if "noise_seed" in checkpoint:
            self.noise_seed = int(checkpoint["noise_seed"])

    def on_train_start(self) -> None:
        # TensorBoard's HParams tab: hyperparameters (model + data) with the metrics to compare runs by
        # (validation logs hp/*; NaN until the first validation). Only for loggers made with
        # default_hp_metric=False (the configs): otherwise Lightning already wrote its hp_metric summary.
        from lightning.pytorch.loggers import TensorBoardLogger

        from lightning_modules.filter.probe import HP_PROBE_MEMORY

        if self.global_step > 0:  # resumed: the run's HParams entry exists (its NaN placeholders were at step 0)
            return
        params = dict(self.hparams_initial)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            params.update(dm.hparams_initial)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and not getattr(logger, "_default_hp_metric", False):
                logger.log_hyperparams(params, {HP_VAL_LOSS: float("nan"), HP_PROBE_MEMORY: float("nan")},
                                       step=self.global_step)

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.hparams.weight_decay > 0 else torch.optim.Adam
        kwargs = {"weight_decay": self.hparams.weight_decay} if self.hparams.weight_decay > 0 else {}
        return cls(self.parameters(), lr=self.hparams.lr, eps=1e-5, **kwargs)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        value = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: TensorDictBase, batch_idx: int) -> None:
        self.check_batch(batch)
        with self._noise(VAL_NOISE, batch_idx):
            loss, info = self.compute_losses(batch, sample=True)
        B = batch.batch_size[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        self.log(HP_VAL_LOSS, loss, batch_size=B, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in info["terms"].items()}, batch_size=B, sync_dist=True)
        self._log_reward_errors(batch, info, B)
        if TARGET_TASK in batch.keys():
            collect_probe_positions(self._probe, self.beliefs(batch), batch)

    def _log_reward_errors(self, batch: TensorDictBase, info: dict[str, Any], B: int) -> None:
        if TASK not in batch.keys() or TARGET_TASK not in batch.keys():
            return
        # r_t at index t came from step t-1: classify it by that step's segment
        on_target = shift_right((batch[TASK] == batch[TARGET_TASK]).unsqueeze(-1)).squeeze(-1)
        for name, pred in (("reward_mse", info["dec"][REWARD_OUT]), ("prior_reward_mse", info["prior_reward"])):
            err = (pred.float() - info["reward_in"]).square().squeeze(-1)
            for suffix, mask in (("target", on_target), ("nontarget", ~on_target)):
                if mask.any():
                    self.log(f"val/{name}_{suffix}", err[mask].mean(), batch_size=B)

    def on_validation_epoch_end(self) -> None:
        if len(self._probe) == 0:
            return
        metrics = probe_metrics(self._probe.compute(self.hparams.num_tasks, self.hparams.probe_l2))
        if metrics:
            self.log_dict(metrics, sync_dist=True)
