"""Phase 1, the variational filter: shapes, ELBO, alignment, belief APIs, checkpoints, precision, checks, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.filter.rssm import RewardRSSM
from lightning_modules.filter.module import VariationalFilterModule
from helpers import cpu_trainer, tiny_datamodule  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(deter_dim=32, stoch_dim=8, hidden_dim=32, mlp_hidden=32, state_embed_dim=32, reward_embed_dim=8, cnn_depth=8)


def _sample(dataset, batch_size=3, num_segments=3, seed=0, obs_keys=None):
    from datamodules import MetaExplorationSampler, SamplerConfig

    cfg = SamplerConfig(batch_size=batch_size, num_segments=num_segments, obs_keys=obs_keys)
    return MetaExplorationSampler(dataset.buffers, cfg).sample(torch.Generator().manual_seed(seed))


def _datamodule(dataset, **kw):
    return tiny_datamodule(dataset, **{"batch_size": 4, "batches_per_epoch": 3, **kw})


def _trainer(tmp_path, **kw):
    return cpu_trainer(tmp_path, **{"max_steps": 3, **kw})


def _stepwise(model, batch):
    """Feed a batch sequence through initial_state/step (previous action and reward, zeros at t=0)."""
    B, L = batch.batch_size
    state = model.initial_state(B)
    action, reward = torch.zeros(B, model.hparams.action_dim), torch.zeros(B, 1)
    out = []
    for t in range(L):
        belief, state = model.step(state, {k: batch[k][:, t] for k in model.obs_keys}, action, reward)
        out.append(belief)
        action, reward = batch["action"][:, t], batch["next", "reward"][:, t]
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def state_batch(tiny_state_dataset):
    return _sample(tiny_state_dataset)


@pytest.fixture(scope="module")
def pixel_batch(tiny_pixel_dataset):
    return _sample(tiny_pixel_dataset, batch_size=2, num_segments=2)


# ---------------------------------------------------------------------- shapes and the ELBO
@pytest.mark.parametrize("obs_keys", [["state"], ["pixels"], ["pixels", "state"]])
def test_shapes_and_dtypes(obs_keys, state_batch, pixel_batch):
    batch = state_batch if obs_keys == ["state"] else pixel_batch
    model = VariationalFilterModule(obs_keys=obs_keys, image_size=32, **SMALL)
    B, L = batch.batch_size
    loss, info = model.compute_losses(batch)
    assert loss.shape == () and torch.isfinite(loss)
    assert set(info["terms"]) == {"obs_nll", "reward_nll", "kl", "prior_reward_nll", "elbo"}
    out = info["out"]
    assert out["deter"].shape == (B, L, 32) and out["post_mean"].shape == (B, L, 8) and out["prior_std"].shape == (B, L, 8)
    if "pixels" in obs_keys:
        assert info["dec"]["pixels"].shape == (B, L, 3, 32, 32)
    if "state" in obs_keys:
        assert info["dec"]["state"].shape == (B, L, 6)
    beliefs = model.beliefs(batch)
    assert model.belief_dim == 2 * 8 + 32
    assert beliefs.shape == (B, L, model.belief_dim) and beliefs.dtype == torch.float32
    assert (beliefs[..., 8:16] > 0).all()  # the variance block
    assert model.training  # beliefs() restores the mode


def test_encoder_decoder_sizes_at_64px():
    rssm = RewardRSSM(["pixels"], image_size=64, deter_dim=16, stoch_dim=4, hidden_dim=16)
    assert rssm.encoders["pixels"].out_dim == 256 * 4 * 4
    emb = rssm.embed({"pixels": torch.zeros(2, 3, 3, 64, 64, dtype=torch.uint8)}, torch.zeros(2, 3, 1))
    assert emb.shape == (2, 3, rssm.embed_dim)
    assert rssm.decode(torch.zeros(2, 3, rssm.feature_dim))["pixels"].shape == (2, 3, 3, 64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        RewardRSSM(["pixels"], image_size=40)


def test_split_cell_matches_torchrl_modules():
    """The loop's split computation equals RSSMPrior.forward + RSSMPosterior.forward (zero noise)."""
    torch.manual_seed(0)
    rssm = RewardRSSM(["state"], **{k: v for k, v in SMALL.items() if k != "cnn_depth"})
    deter, stoch = torch.randn(5, 32), torch.randn(5, 8)
    action, embedding = torch.randn(5, 4), torch.randn(5, rssm.embed_dim)
    action_in, embed_in = rssm.input_projections(embedding, action)
    h, mean, std = rssm.cell(deter, stoch, action_in, embed_in)
    _, _, _, h_ref = rssm.prior(stoch, deter, action, noise=torch.zeros_like(stoch))
    mean_ref, std_ref, _ = rssm.posterior(h_ref, embedding, noise=torch.zeros_like(stoch))
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(std, std_ref)


def test_elbo_improves(state_batch):
    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["state"], lr=3e-3, **SMALL)
    model.filter.fit_state_stats(state_batch)
    opt = model.configure_optimizers()
    with torch.no_grad():
        before = model.compute_losses(state_batch, sample=False)[1]["terms"]["elbo"].item()
    for _ in range(40):
        loss, _ = model.compute_losses(state_batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.compute_losses(state_batch, sample=False)[1]["terms"]["elbo"].item()
    assert after > before + 1.0, (before, after)


def test_subset_reconstruction_is_the_mean_over_the_drawn_frames(pixel_batch):
    """recon_fraction < 1 scores the images of the drawn frames only: their mean image NLL (the full term's
    unbiased estimate); every other term is the full one, and the per-frame NLLs agree with full decoding."""
    from lightning_modules.filter.losses import gaussian_log_prob

    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["pixels"], image_size=32, **SMALL).eval()
    B, L = pixel_batch.batch_size
    with torch.no_grad():
        full_loss, full = model.compute_losses(pixel_batch, sample=False)
        torch.manual_seed(1)
        part_loss, part = model.compute_losses(pixel_batch, sample=False, recon_fraction=0.25)
    index = part["pixel_index"]
    assert index.shape == (round(0.25 * B * L),) and index.unique().numel() == index.numel()
    target = model.rssm.normalize_obs({"pixels": pixel_batch["pixels"]})["pixels"].reshape(B * L, 3, 32, 32)
    per_frame = -gaussian_log_prob(target, full["dec"]["pixels"].reshape(B * L, 3, 32, 32), 1.0, 3)
    torch.testing.assert_close(part["terms"]["obs_nll"], per_frame[index].mean())
    torch.testing.assert_close(full["terms"]["obs_nll"], per_frame.mean())
    for name in ("reward_nll", "kl"):
        torch.testing.assert_close(part["terms"][name], full["terms"][name])
    torch.testing.assert_close(part_loss - full_loss, part["terms"]["obs_nll"] - full["terms"]["obs_nll"])
    with pytest.raises(ValueError, match="recon_fraction"):
        VariationalFilterModule(obs_keys=["pixels"], image_size=32, recon_fraction=0.0, **SMALL)


def test_augmentation_shifts_whole_sequences_and_leaves_the_batch_alone(pixel_batch):
    """augment_shift / augment_brightness: one draw per sequence (every frame moved alike), a shifted frame is the
    original translated, the loader's batch is not modified, and state-only filters ignore them."""
    from lightning_modules.filter.augment import random_brightness, random_shift

    pixels = pixel_batch["pixels"]
    B, L = pixels.shape[:2]
    torch.manual_seed(0)
    shifted = random_shift(pixels, 2)
    assert shifted.shape == pixels.shape and shifted.dtype == torch.uint8 and not torch.equal(shifted, pixels)
    for b in range(B):  # the offset found on frame 0 explains every frame of the sequence (interior pixels)
        offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(shifted[b, 0, :, 2:-2, 2:-2], pixels[b, 0, :, 2 + dy:30 + dy, 2 + dx:30 + dx])]
        assert offsets, b
        dy, dx = offsets[0]
        assert torch.equal(shifted[b, :, :, 2:-2, 2:-2], pixels[b, :, :, 2 + dy:30 + dy, 2 + dx:30 + dx])
    brighter = random_brightness(pixels, 0.3).float()
    ratio = brighter.sum((2, 3, 4)) / pixels.float().sum((2, 3, 4)).clamp(min=1)
    assert ((ratio - ratio[:, :1]).abs() < 0.02).all() and ((ratio - 1).abs() <= 0.31).all()
    assert random_shift(pixels, 0) is pixels and random_brightness(pixels, 0.0) is pixels

    model = VariationalFilterModule(obs_keys=["pixels"], image_size=32, augment_shift=2, augment_brightness=0.3,
                                    **SMALL)
    before = pixels.clone()
    augmented = model._augment(pixel_batch)
    assert torch.equal(pixel_batch["pixels"], before) and not torch.equal(augmented["pixels"], before)
    assert augmented["action"] is pixel_batch["action"]
    state_model = VariationalFilterModule(obs_keys=["state"], augment_shift=2, **SMALL)
    assert state_model._augment(pixel_batch) is pixel_batch
    with pytest.raises(ValueError, match="augment_brightness"):
        VariationalFilterModule(obs_keys=["pixels"], image_size=32, augment_brightness=1.5, **SMALL)


def test_obs_std_sharpens_the_observation_model_only():
    """obs_std = s: the observation NLL is the Gaussian one with that deviation (errors cost 1/s^2 as much), the
    reward and KL terms are untouched; a non-positive value is refused."""
    import math

    from lightning_modules.filter.losses import REWARD_OUT, ElboWeights, elbo_loss

    torch.manual_seed(0)
    target = {"state": torch.randn(2, 5, 6)}
    decoded = {"state": target["state"] + 0.1 * torch.randn(2, 5, 6), REWARD_OUT: torch.randn(2, 5, 1)}
    reward = torch.randn(2, 5, 1)
    out = {"post_mean": torch.randn(2, 5, 4), "post_std": torch.rand(2, 5, 4) + 0.1,
           "prior_mean": torch.zeros(2, 5, 4), "prior_std": torch.ones(2, 5, 4)}
    _, wide = elbo_loss(target, decoded, reward, out, ElboWeights())
    _, sharp = elbo_loss(target, decoded, reward, out, ElboWeights(obs_std=0.1))
    sq = (target["state"] - decoded["state"]).square().sum(-1).mean()
    torch.testing.assert_close(wide["obs_nll"], 0.5 * sq + 6 * 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(sharp["obs_nll"], 0.5 * sq / 0.01 + 6 * (math.log(0.1) + 0.5 * math.log(2 * math.pi)))
    for name in ("reward_nll", "kl"):
        torch.testing.assert_close(sharp[name], wide[name])
    with pytest.raises(ValueError, match="obs_std"):
        VariationalFilterModule(obs_keys=["state"], obs_std=0.0, **SMALL)


def test_kl_balance_splits_the_kl_gradient_between_prior_and_posterior():
    """kl_balance = b: the KL's value is unchanged, the prior gets b and the posterior 1 - b of the plain KL's
    gradient (b = 0.5 computes the plain KL itself); a value outside (0, 1) is refused before any work."""
    from lightning_modules.filter.losses import balanced_kl, gaussian_kl

    torch.manual_seed(0)
    leaves = {"post_mean": torch.randn(2, 5, 4), "post_std": torch.rand(2, 5, 4) + 0.1,
              "prior_mean": torch.randn(2, 5, 4), "prior_std": torch.rand(2, 5, 4) + 0.1}

    def grads(fn):
        out = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        value = fn(out)
        value.sum().backward()
        return value.detach(), {k: v.grad for k, v in out.items()}

    plain, g_plain = grads(lambda o: gaussian_kl(o["post_mean"], o["post_std"], o["prior_mean"], o["prior_std"]))
    balanced, g_bal = grads(lambda o: balanced_kl(o, 0.8))
    torch.testing.assert_close(balanced, plain)
    for k in ("prior_mean", "prior_std"):
        torch.testing.assert_close(g_bal[k], 0.8 * g_plain[k])
    for k in ("post_mean", "post_std"):
        torch.testing.assert_close(g_bal[k], 0.2 * g_plain[k])
    half, _ = grads(lambda o: balanced_kl(o, 0.5))
    assert torch.equal(half, plain)
    with pytest.raises(ValueError, match="kl_balance"):
        VariationalFilterModule(obs_keys=["state"], kl_balance=1.0, **SMALL)


# ---------------------------------------------------------------------- alignment and the belief APIs
def test_reward_alignment_and_carry_across_segments(state_batch):
    """r_{t+1} = ("next","reward")[t] reaches the belief at t+1 (not before), and the state is not reset."""
    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["state"], **SMALL)
    T = int((state_batch["segment"][0] == 0).sum())
    t = T + 3  # a step inside segment 1
    changed = state_batch.clone()
    changed["next", "reward"][:, t] = 1.0 - changed["next", "reward"][:, t]
    a, b = model.beliefs(state_batch), model.beliefs(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)  # not seen before t+1
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4  # arrives with o_{t+1}
    # a reward late in segment 1 still moves the first beliefs of segment 2 (a reset would give exactly 0 there)
    changed = state_batch.clone()
    changed["next", "reward"][:, 2 * T - 3] = 1.0 - changed["next", "reward"][:, 2 * T - 3]
    b = model.beliefs(changed)
    assert (a[:, 2 * T: 2 * T + 2] - b[:, 2 * T: 2 * T + 2]).abs().amax(-1).min() > 1e-4
    # the last reward of segment 0 reaches the belief at the first step of segment 1
    changed = state_batch.clone()
    changed["next", "reward"][:, T - 1] += 1.0
    a, b = model.beliefs(state_batch), model.beliefs(changed)
    torch.testing.assert_close(a[:, :T], b[:, :T], rtol=0, atol=0)
    assert (a[:, T] - b[:, T]).abs().max() > 1e-4


@pytest.mark.parametrize("obs_keys", [["state"], ["pixels", "state"]])
def test_stepwise_api_matches_beliefs(obs_keys, state_batch, pixel_batch):
    torch.manual_seed(0)
    batch = state_batch if obs_keys == ["state"] else pixel_batch
    model = VariationalFilterModule(obs_keys=obs_keys, image_size=32, **SMALL)
    model.filter.fit_state_stats(batch)  # non-trivial normalisation
    torch.testing.assert_close(_stepwise(model, batch), model.beliefs(batch), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- Trainer: checkpoints, precision, checks
def test_checkpoint_round_trip(tmp_path, tiny_state_dataset, state_batch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["state"], **SMALL)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=1, val_check_interval=3)
    trainer.fit(model, _datamodule(tiny_state_dataset, obs_keys=["state"]))
    path = tmp_path / "ckpt" / "last.ckpt"
    assert path.is_file()
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
    assert "state_dict" in raw and bool(raw["state_dict"]["filter.state_stats_ready"])
    assert raw["belief_filter"]["kwargs"]["obs_keys"] == ["state"] and raw["phase"] == "filter"
    loaded = VariationalFilterModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.obs_keys == ["state"]
    torch.testing.assert_close(loaded.beliefs(state_batch), model.beliefs(state_batch), rtol=0, atol=0)


def test_bf16_mixed_one_step(tmp_path, tiny_pixel_dataset):
    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=["pixels", "state"], image_size=32, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=1, precision="bf16-mixed")
    trainer.fit(model, _datamodule(tiny_pixel_dataset, obs_keys=["pixels", "state"], batch_size=2))
    assert trainer.global_step == 1 and trainer.precision == "bf16-mixed"
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_mismatched_data_is_refused(tmp_path, tiny_state_dataset, tiny_pixel_dataset, state_batch, pixel_batch):
    pixel_model = VariationalFilterModule(obs_keys=["pixels"], image_size=32, **SMALL)
    with pytest.raises(ValueError, match=r"observation keys \['pixels'\].*\['state'\]"):
        pixel_model.beliefs(state_batch)
    with pytest.raises(ValueError, match="image_size=64"):
        VariationalFilterModule(obs_keys=["pixels"], image_size=64, **SMALL).beliefs(pixel_batch)
    with pytest.raises(ValueError, match="state_dim=5"):
        VariationalFilterModule(obs_keys=["state"], state_dim=5, **SMALL).training_step(state_batch, 0)
    with pytest.raises(ValueError, match="action_dim=3"):
        VariationalFilterModule(obs_keys=["state"], action_dim=3, **SMALL).beliefs(state_batch)
    # through the Trainer: refused in setup, before any step
    with pytest.raises(ValueError, match=r"observation keys \['pixels'\]"):
        _trainer(tmp_path).fit(pixel_model, _datamodule(tiny_state_dataset, obs_keys=["state"]))
    with pytest.raises(ValueError, match=r"pixels has shape \(3, 32, 32\).*\(3, 64, 64\)"):
        model = VariationalFilterModule(obs_keys=["pixels"], image_size=64, **SMALL)
        dm = _datamodule(tiny_pixel_dataset, obs_keys=["pixels"], image_size=32)
        _trainer(tmp_path).fit(model, dm)


def test_validation_logs_probe_and_images(tmp_path, tiny_pixel_dataset):
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    from lightning_modules.callbacks.filter_images import FilterImageLogger

    model = VariationalFilterModule(obs_keys=["pixels", "state"], image_size=32, **SMALL)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = _trainer(tmp_path, max_steps=2, logger=logger, limit_val_batches=2, val_check_interval=2,
                       log_every_n_steps=1, callbacks=[FilterImageLogger(every_n_val=1)])
    trainer.fit(model, _datamodule(tiny_pixel_dataset, obs_keys=["pixels", "state"], batch_size=4, val_batches=2))
    metrics = trainer.callback_metrics
    for key in ("val/elbo", "val/kl", "val/probe_acc_init", "val/probe_acc_seg0", "val/probe_acc_seg1", "val/probe_acc_seg1_step1", "val/probe_acc_seg1_step5",
                "val/reward_mse_nontarget", "val/prior_reward_mse_nontarget", "train/loss", "losses/kl"):
        assert key in metrics, (key, sorted(metrics))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(logger.log_dir))).Reload()
    assert {"val/reconstruction", "val/open_loop"} <= set(events.Tags()["images"])


def test_probe_separates_informative_features():
    from lightning_modules.filter.probe import probe_accuracy

    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (200,), generator=g)
    x = torch.randn(200, 10, generator=g)
    informative = x.clone()
    informative[:, 0] += 4 * y
    assert probe_accuracy(informative, y, 2)["acc"] > 0.95
    assert probe_accuracy(x, y, 2)["acc"] < 0.75


# ---------------------------------------------------------------------- the command line
def test_cli_fit_quickstart_config(tmp_path, tiny_state_dataset):
    if not (ROOT / "lightning_modules" / "cli.py").is_file() or not (ROOT / "configs" / "filter_quickstart.yaml").is_file():
        pytest.skip("lightning_modules/cli.py or configs/filter_quickstart.yaml is missing")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    overrides = [
        f"--data.root={tiny_state_dataset.root}", f"--data.rollouts_per_task={tiny_state_dataset.rollouts_per_task}",
        "--data.batch_size=2", "--data.batches_per_epoch=2", "--data.val_batches=1", "--data.num_segments=2",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--model.deter_dim=16", "--model.hidden_dim=16",
    ]
    result = subprocess.run([sys.executable, "-m", "lightning_modules.cli", "fit", "--config",
                             "configs/filter_quickstart.yaml", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "runs").rglob("last.ckpt")), "ModelCheckpoint(save_last=True) wrote no last.ckpt"
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
