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

Belief state for phase 2
------------------------
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
``..._prev_other`` by the preceding segment. Image reconstructions and open-loop predictions every
``log_images_every_n_val`` validation runs (pixels only). ``hp/val_loss`` and ``hp/probe_acc_memory`` (=
``val/probe_acc_seg1_step1``) are the metrics of TensorBoard's HParams tab (hyperparameters logged at train start).

Training guards: a NaN/inf loss term stops the run with ``FloatingPointError`` naming it
(:func:`lightning_modules.guards.check_finite`). The sampling noise of a training step is drawn from the global
RNG seeded by (``noise_seed``, rank, global step, batch index) and the global state is restored afterwards
(validation: fixed noise per batch index), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have (``noise_seed`` is ``torch.initial_seed()`` at construction, i.e. the
``seed_everything`` seed, and is saved in checkpoints).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from tensordict import TensorDictBase

from lightning_modules.filter_images import comparison_grid, pick_steps, to_uint8
from lightning_modules.guards import check_finite, derive_seed, seeded_rng
from lightning_modules.probe import ProbeCollector
from lightning_modules.rssm import FilterState, RewardRSSM, gaussian_kl, gaussian_log_prob, shift_right

REWARD = ("next", "reward")
TRAIN_NOISE, VAL_NOISE = 0, 1  # noise streams (see _noise)


class VariationalFilterModule(pl.LightningModule):
    """Variational filter over meta-exploration sequences; see the module docstring.

    Args:
        obs_keys: observations the model reads ("pixels", "state" or both). Give the DataModule the same
            ``obs_keys``: Lightning refuses to log two hyperparameters of one name with different values.
        image_size: pixel observations are [3, image_size, image_size] uint8 (a multiple of 16).
        state_dim, action_dim: sizes of ``state`` and ``action``.
        num_tasks: number of tasks (classes of the task-inference probe).
        deter_dim, stoch_dim: GRU state and Gaussian stochastic state sizes (LOMPO: 256 / 64).
        hidden_dim: width of the transition / posterior layers; mlp_hidden: width of the state and reward MLPs.
        cnn_depth: channels of the first conv layer (32 -> 64 -> 128 -> 256).
        state_embed_dim, reward_embed_dim: embedding sizes of the state and of the reward input.
        min_std: lower bound of the prior / posterior standard deviations.
        beta: weight of the reward log-likelihood (MELD: 10).
        reward_std: standard deviation of the Gaussian reward model.
        prior_reward_weight: weight (times beta) of predicting r_t from a prior sample (0 disables).
        kl_weight: weight of the KL term (1.0 = the ELBO); free_nats: the mean KL per step is clamped below at this.
        normalize_state: standardise ``state`` observations with statistics of the first training batch.
        lr, weight_decay: Adam(W); grad_clip: gradient norm clipping (0 disables; the Trainer's value wins).
        compile: ``torch.compile`` the recurrent cell (the per-step work of the time loop).
        log_images_every_n_val: image logs every N validation runs (0 disables).
        probe_l2: L2 regularisation of the task-inference probe.
    """

    def __init__(
        self,
        obs_keys: Sequence[str] = ("pixels",),
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
        normalize_state: bool = True,
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        grad_clip: float = 100.0,
        compile: bool = False,
        log_images_every_n_val: int = 5,
        probe_l2: float = 1e-2,
    ):
        super().__init__()
        self.save_hyperparameters()
        obs_keys = list(obs_keys)
        self.hparams["obs_keys"] = obs_keys  # a plain list in checkpoints / YAML and when merged with the
        self._hparams_initial["obs_keys"] = list(obs_keys)  # DataModule's hparams (same name, same value)
        if beta < 0 or kl_weight < 0 or free_nats < 0 or prior_reward_weight < 0 or reward_std <= 0:
            raise ValueError("beta, kl_weight, free_nats and prior_reward_weight must be >= 0 and reward_std > 0")
        self.rssm = RewardRSSM(obs_keys, image_size, state_dim, action_dim, deter_dim, stoch_dim, hidden_dim,
                               cnn_depth, mlp_hidden, state_embed_dim, reward_embed_dim, min_std)
        self.register_buffer("state_stats_ready", torch.tensor(False))
        self._probe = ProbeCollector()
        self._val_runs = 0
        self._cell_fn = None
        # seed of the sampling noise: the seed_everything / manual_seed in force (draws nothing); kept in checkpoints
        self.noise_seed = int(torch.initial_seed())

    # ------------------------------------------------------------------ public belief API
    @property
    def belief_dim(self) -> int:
        return self.rssm.belief_dim

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return self.rssm.obs_keys

    @property
    def _dev(self) -> torch.device:
        """Where the weights are (robust when this module is a child of another module)."""
        return self.rssm.state_mean.device

    @torch.no_grad()
    def beliefs(self, batch: TensorDictBase) -> torch.Tensor:
        """Beliefs [B, L, belief_dim] (fp32) of every step of a batch; deterministic (posterior mean fed forward)."""
        was_training = self.training
        self.eval()
        try:
            batch = batch.to(self._dev)
            self.check_batch(batch)
            with torch.autocast(device_type=self._dev.type, enabled=False):  # fp32, like step()
                out = self._run_filter(batch, sample=False)[0]
            return self.rssm.belief(out["post_mean"], out["post_std"], out["deter"])
        finally:
            self.train(was_training)

    def initial_state(self, batch_size: int) -> FilterState:
        """State before the first step of a sequence (feed zeros as the first previous action and reward)."""
        return self.rssm.initial_state(batch_size, self._dev)

    @torch.no_grad()
    def step(self, state: FilterState, obs: dict[str, torch.Tensor], action: torch.Tensor,
             reward: torch.Tensor) -> tuple[torch.Tensor, FilterState]:
        """One online step: o_t, the previous action a_{t-1} and the reward r_t that came with o_t."""
        device = self._dev
        obs = {k: obs[k].to(device) for k in self.obs_keys}
        with torch.autocast(device_type=device.type, enabled=False):
            return self.rssm.step(state, obs, action.to(device), reward.to(device))

    # ------------------------------------------------------------------ checks
    def check_batch(self, batch: TensorDictBase) -> None:
        """Raise ``ValueError`` naming every way a batch does not fit this model."""
        hp = self.hparams
        keys = set(batch.keys(include_nested=True))
        problems = []
        missing = [k for k in self.obs_keys if k not in keys]
        if missing:
            have = [k for k in ("pixels", "state") if k in keys]
            problems.append(f"the model reads observation keys {list(self.obs_keys)} but the data has {have}")
        if "pixels" in self.obs_keys and "pixels" in keys:
            px = batch["pixels"]
            want = (3, hp.image_size, hp.image_size)
            if tuple(px.shape[-3:]) != want or px.dtype != torch.uint8:
                problems.append(f"pixels are {tuple(px.shape[-3:])} {px.dtype}, the model expects {want} torch.uint8 "
                                f"(image_size={hp.image_size})")
        if "state" in self.obs_keys and "state" in keys and batch["state"].shape[-1] != hp.state_dim:
            problems.append(f"state has size {batch['state'].shape[-1]}, the model expects state_dim={hp.state_dim}")
        if "action" not in keys or REWARD not in keys:
            problems.append("the batch needs 'action' and ('next', 'reward')")
        elif batch["action"].shape[-1] != hp.action_dim:
            problems.append(f"action has size {batch['action'].shape[-1]}, the model expects action_dim={hp.action_dim}")
        if batch.batch_dims != 2:
            problems.append(f"batches must have batch size [B, L], got {list(batch.batch_size)}")
        if problems:
            raise ValueError("data does not match the VariationalFilterModule: " + "; ".join(problems))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        hp = self.hparams
        problems = []
        dm_keys = getattr(dm, "obs_keys", None)
        if dm_keys is not None:
            missing = [k for k in self.obs_keys if k not in tuple(dm_keys)]
            if missing:
                problems.append(f"the model reads observation keys {list(self.obs_keys)} but the data module "
                                f"delivers {list(dm_keys)}")
        shapes = getattr(getattr(dm, "sampler", None), "feature_shapes", None) or {}
        want = {"pixels": (3, hp.image_size, hp.image_size), "state": (hp.state_dim,), "action": (hp.action_dim,)}
        for key, expected in want.items():
            if (key == "action" or key in self.obs_keys) and key in shapes and tuple(shapes[key][0]) != expected:
                problems.append(f"the data's {key} has shape {tuple(shapes[key][0])}, the model expects {expected}")
        num_tasks = getattr(getattr(dm, "sampler", None), "num_tasks", None)
        if num_tasks is not None and num_tasks > hp.num_tasks:
            problems.append(f"the data has {num_tasks} tasks, the model was configured with num_tasks={hp.num_tasks}")
        if problems:
            raise ValueError("data module does not match the VariationalFilterModule: " + "; ".join(problems))

    # ------------------------------------------------------------------ model
    def _cell(self):
        if self.hparams.compile and self._cell_fn is None:
            self._cell_fn = torch.compile(self.rssm.cell, dynamic=False)
        return self._cell_fn

    def _run_filter(self, batch: TensorDictBase, sample: bool):
        obs = {k: batch[k] for k in self.obs_keys}
        reward_in = shift_right(batch[REWARD].float())  # r_t: the reward that arrived with o_t
        prev_action = shift_right(batch["action"].float())  # a_{t-1}
        embedding = self.rssm.embed(obs, reward_in)
        out = self.rssm.filter(embedding, prev_action, sample=sample, step_fn=self._cell())
        return out, reward_in

    def _init_state_stats(self, batch: TensorDictBase) -> None:
        if self.hparams.normalize_state and "state" in self.obs_keys and not bool(self.state_stats_ready):
            x = batch["state"].float().reshape(-1, self.hparams.state_dim)
            self.rssm.state_mean.copy_(x.mean(0))
            self.rssm.state_std.copy_(x.std(0).clamp_min(1e-2) if len(x) > 1 else torch.ones_like(x[0]))
            self.state_stats_ready.fill_(True)

    def compute_losses(self, batch: TensorDictBase, sample: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss (negative weighted ELBO, per step) and a dict of per-step terms and intermediates."""
        hp = self.hparams
        out, reward_in = self._run_filter(batch, sample)
        target_obs = self.rssm.normalize_obs({k: batch[k] for k in self.obs_keys})
        dec = self.rssm.decode(self.rssm.features(out["stoch"], out["deter"]))
        obs_ll = sum(gaussian_log_prob(target_obs[k], dec[k], 1.0, 3 if k == "pixels" else 1) for k in self.obs_keys)
        rew_ll = gaussian_log_prob(reward_in, dec["reward"], hp.reward_std, 1)
        kl = gaussian_kl(out["post_mean"], out["post_std"], out["prior_mean"], out["prior_std"])
        kl_term = torch.clamp(kl.mean(), min=hp.free_nats) if hp.free_nats > 0 else kl.mean()
        loss = -(obs_ll.mean() + hp.beta * rew_ll.mean()) + hp.kl_weight * kl_term
        prior_mean, prior_std = out["prior_mean"], out["prior_std"]
        prior_state = prior_mean + prior_std * torch.randn_like(prior_std) if sample else prior_mean
        prior_reward = self.rssm.reward_decoder(self.rssm.features(prior_state, out["deter"]))
        prior_rew_ll = gaussian_log_prob(reward_in, prior_reward, hp.reward_std, 1)
        if hp.prior_reward_weight > 0:
            loss = loss - hp.beta * hp.prior_reward_weight * prior_rew_ll.mean()
        terms = {
            "obs_nll": -obs_ll.mean(), "reward_nll": -rew_ll.mean(), "kl": kl.mean(),
            "prior_reward_nll": -prior_rew_ll.mean(),
            "elbo": (obs_ll + hp.beta * rew_ll - kl).mean(),
        }
        return loss, {"terms": terms, "out": out, "dec": dec, "reward_in": reward_in, "prior_reward": prior_reward}

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._init_state_stats(batch)

    def _noise(self, stream: int, index: int):
        """The global RNG seeded for (noise_seed, stream, rank, index) inside the block, restored after.

        Training noise of batch ``batch_idx`` at ``global_step`` depends on those alone, so a resumed run
        draws exactly the noise of the uninterrupted one (nothing Lightning, the loaders or validation drew
        in between matters), each DDP rank draws its own, and validation (fixed batches) uses fixed noise.
        """
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return seeded_rng(derive_seed(self.noise_seed, stream, rank, index), self._dev)

    def training_step(self, batch: TensorDictBase, batch_idx: int) -> torch.Tensor:
        self.check_batch(batch)
        with self._noise(TRAIN_NOISE, derive_seed(self.global_step, batch_idx)):
            loss, info = self.compute_losses(batch, sample=True)
        terms = info["terms"]
        check_finite({"train/loss": loss, **{f"losses/{k}": v for k, v in terms.items() if k != "elbo"}},
                     self.global_step)
        B = batch.batch_size[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/elbo", terms["elbo"], prog_bar=True, batch_size=B)
        self.log_dict({f"losses/{k}": v for k, v in terms.items() if k != "elbo"}, batch_size=B)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["noise_seed"] = self.noise_seed  # a plain int

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "noise_seed" in checkpoint:
            self.noise_seed = int(checkpoint["noise_seed"])

    def on_train_start(self) -> None:
        # TensorBoard's HParams tab: hyperparameters (model + data) with the metrics to compare runs by
        # (validation logs hp/*; NaN until the first validation). Only for loggers made with
        # default_hp_metric=False (the configs): otherwise Lightning already wrote its hp_metric summary.
        from lightning.pytorch.loggers import TensorBoardLogger

        params = dict(self.hparams_initial)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            params.update(dm.hparams_initial)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and not getattr(logger, "_default_hp_metric", False):
                logger.log_hyperparams(params, {"hp/val_loss": float("nan"), "hp/probe_acc_memory": float("nan")},
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
        terms = info["terms"]
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        self.log("hp/val_loss", loss, batch_size=B, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, batch_size=B, sync_dist=True)
        self._log_reward_errors(batch, info, B)
        if "target_task" in batch.keys():
            self._collect_probe(batch)
        every = self.hparams.log_images_every_n_val
        if (batch_idx == 0 and "pixels" in self.obs_keys and every and not self.trainer.sanity_checking
                and self._val_runs % every == 0):
            self._log_images(batch, info)

    def _log_reward_errors(self, batch: TensorDictBase, info: dict[str, Any], B: int) -> None:
        if "task" not in batch.keys() or "target_task" not in batch.keys():
            return
        # r_t at index t came from step t-1: classify it by that step's segment
        on_target = shift_right((batch["task"] == batch["target_task"]).unsqueeze(-1)).squeeze(-1)
        for name, pred in (("reward_mse", info["dec"]["reward"]), ("prior_reward_mse", info["prior_reward"])):
            err = (pred.float() - info["reward_in"]).square().squeeze(-1)
            for suffix, mask in (("target", on_target), ("nontarget", ~on_target)):
                if mask.any():
                    self.log(f"val/{name}_{suffix}", err[mask].mean(), batch_size=B)

    def _collect_probe(self, batch: TensorDictBase) -> None:
        beliefs = self.beliefs(batch)  # deterministic beliefs, as handed to phase 2
        target = batch["target_task"][:, 0]
        segment = batch["segment"] if "segment" in batch.keys() else torch.zeros_like(batch["target_task"])
        seg = segment[0]
        ends = torch.nonzero(torch.cat([seg[1:] != seg[:-1], torch.ones(1, dtype=torch.bool, device=seg.device)])).squeeze(1)
        self._probe.add("init", beliefs[:, 0], target)
        L = beliefs.shape[1]
        start = 0
        for end in ends.tolist():
            k, length = int(seg[end]), end - start + 1
            on_target = (batch["task"][:, end] == target).long() if "task" in batch.keys() else None
            self._probe.add(f"seg{k}", beliefs[:, end], target, on_target)
            # inside the next segment (scene reset): step 1 (r = 0, drawers closed: only memory tells the
            # task) and the middle (memory must have survived length / 2 steps of another episode)
            for j in sorted({1, length // 2}):
                t = end + 1 + j
                if t < L and int(seg[t]) == k + 1:
                    self._probe.add(f"seg{k + 1}_step{j}", beliefs[:, t], target, on_target)
            start = end + 1

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._val_runs += 1
        if len(self._probe) == 0:
            return
        results = self._probe.compute(self.hparams.num_tasks, self.hparams.probe_l2)
        metrics = {}
        for name, res in results.items():
            prefix = "_prev" if "_step" in name else ""
            for key, value in res.items():
                suffix = {"acc": "", "acc_1": prefix + "_target", "acc_0": prefix + "_other"}.get(key, "_" + key)
                if name == "init" and suffix:
                    continue
                metrics[f"val/probe_acc_{name}{suffix}"] = value
        memory = metrics.get("val/probe_acc_seg1_step1")  # the task inside the next episode: memory only
        if memory is not None:
            metrics["hp/probe_acc_memory"] = memory
        if metrics:
            self.log_dict(metrics, sync_dist=True)

    @torch.no_grad()
    def _log_images(self, batch: TensorDictBase, info: dict[str, Any]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        L = batch.batch_size[1]
        steps = pick_steps(L, 10).to(batch["pixels"].device)
        truth = batch["pixels"][0, steps]
        recon = to_uint8(info["dec"]["pixels"][0, steps])
        experiment.add_image("val/reconstruction", comparison_grid([truth, recon]), self.global_step)
        # open loop: filter the first `context` steps, then imagine with the prior under the logged actions
        context = max(1, L // 4)
        horizon = min(10, L - context)
        if horizon < 1:
            return
        out = info["out"]
        state = {"deter": out["deter"][:1, context - 1].float(), "stoch": out["post_mean"][:1, context - 1].float()}
        actions = batch["action"][:1, context - 1: context - 1 + horizon].float()
        imagined = self.rssm.imagine(state, actions)
        pred = self.rssm.decode(self.rssm.features(imagined["stoch"], imagined["deter"]))["pixels"][0]
        truth = batch["pixels"][0, context: context + horizon]
        experiment.add_image("val/open_loop", comparison_grid([truth, to_uint8(pred)]), self.global_step)
