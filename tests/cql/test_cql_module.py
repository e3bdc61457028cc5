"""Phase 2, CQL on beliefs: transitions, gradient isolation, Lagrange leak, frozen filter, checkpoints, checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tensordict import TensorDictBase

from lightning_modules.cql.module import LatentCQLModule
from lightning_modules.cql.transitions import flat_transitions
from lightning_modules.filter.belief_filter import BeliefFilter
from lightning_modules.cql.networks import BELIEF
from lightning_modules.filter.module import VariationalFilterModule
from helpers import SMALL_FILTER, cpu_trainer, sample_batch, tiny_datamodule  # noqa: E402

SMALL_CQL = dict(hidden_dim=32, transition_batch_size=64, num_random=4)


def make_datamodule(dataset, **kw):
    return tiny_datamodule(dataset, **{"batch_size": 4, "batches_per_epoch": 4, **kw})


def make_trainer(tmp_path, **kw):
    return cpu_trainer(tmp_path, **{"max_steps": 3, **kw})


@pytest.fixture(scope="module")
def batch(tiny_state_dataset):
    return sample_batch(tiny_state_dataset)


def _model(filter_ckpt, **kw):
    torch.manual_seed(0)
    return LatentCQLModule(str(filter_ckpt), **{**SMALL_CQL, **kw})


def _transitions(model, batch):
    beliefs = model.compute_beliefs(batch)
    model.normalizer.fit(beliefs)
    return model.normalize(flat_transitions(beliefs, batch["action"], batch["next", "reward"]))


def _params(module) -> list[torch.Tensor]:
    return list(module.values(True, True))


def _grad_norm(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


# ---------------------------------------------------------------------- transitions
def test_transitions_alignment_and_no_terminal(filter_ckpt, batch):
    model = _model(filter_ckpt)
    beliefs = model.compute_beliefs(batch)
    B, L, D = beliefs.shape
    td = flat_transitions(beliefs, batch["action"], batch["next", "reward"])
    assert td.batch_size == torch.Size([B * (L - 1)])  # the last step (no successor) is dropped
    b, t = 1, L // 2 - 1  # the last step of segment 0: its successor is the first step of segment 1
    assert bool(batch["segment_start"][b, t + 1])
    i = b * (L - 1) + t
    torch.testing.assert_close(td[BELIEF][i], beliefs[b, t])
    torch.testing.assert_close(td["next", BELIEF][i], beliefs[b, t + 1])  # the belief continues across the boundary
    torch.testing.assert_close(td["action"][i], batch["action"][b, t])
    torch.testing.assert_close(td["next", "reward"][i], batch["next", "reward"][b, t])  # relabelled r_{t+1}
    assert not td["next", "done"].any() and not td["next", "terminated"].any()
    # sampled transitions index the same table
    index = torch.tensor([0, i, B * (L - 1) - 1])
    sub = flat_transitions(beliefs, batch["action"], batch["next", "reward"], index)
    for key in (BELIEF, "action", ("next", BELIEF), ("next", "reward")):
        torch.testing.assert_close(sub[key], td[key][index])


def test_n_step_transitions(filter_ckpt, batch):
    """n-step: the discounted sum of the next n logged rewards, the belief n steps on, across segment boundaries."""
    model = _model(filter_ckpt, n_step=3, gamma=0.9)
    beliefs = model.compute_beliefs(batch)
    B, L, _ = beliefs.shape
    rewards = torch.rand(B, L, 1)  # any values: checks the window and the discounts
    td = model.transitions(beliefs, batch["action"], rewards)
    assert td.batch_size == torch.Size([B * (L - 3)])  # the last 3 steps have no 3-step successor
    for b, t in [(0, 0), (1, L // 2 - 2), (B - 1, L - 4)]:  # the middle one straddles the segment boundary
        i = b * (L - 3) + t
        expected = rewards[b, t] + 0.9 * rewards[b, t + 1] + 0.81 * rewards[b, t + 2]
        torch.testing.assert_close(td["next", "reward"][i], expected)
        torch.testing.assert_close(td[BELIEF][i], beliefs[b, t])
        torch.testing.assert_close(td["next", BELIEF][i], beliefs[b, t + 3])
        torch.testing.assert_close(td["action"][i], batch["action"][b, t])
    # the TD target bootstraps with gamma ** n
    assert float(model.loss_module.value_estimator.gamma) == pytest.approx(0.9 ** 3)
    with pytest.raises(ValueError, match="n_step"):
        _model(filter_ckpt, n_step=0)


def test_beliefs_are_the_filters(filter_ckpt, batch):
    model = _model(filter_ckpt)
    reference = BeliefFilter.load(filter_ckpt)
    torch.testing.assert_close(model.compute_beliefs(batch), reference.beliefs(batch))


# ---------------------------------------------------------------------- gradients
def test_gradient_isolation_per_loss_term(filter_ckpt, batch):
    model = _model(filter_ckpt)
    loss = model.loss_module
    actor, critic = _params(loss.actor_network_params), _params(loss.qvalue_network_params)
    target = _params(loss.target_qvalue_network_params)
    td = _transitions(model, batch)
    expect = {"loss_qvalue": "critic", "loss_cql": "critic", "loss_actor": "actor", "loss_alpha": "alpha"}
    for term, owner in expect.items():
        model.zero_grad(set_to_none=True)
        losses = model.compute_losses(td)
        losses[term].backward()
        got = {"actor": _grad_norm(actor), "critic": _grad_norm(critic), "alpha": _grad_norm([loss.log_alpha]),
               "target": _grad_norm(target), "filter": _grad_norm(list(model.filter.parameters()))}
        assert got[owner] > 0, (term, got)
        for other, value in got.items():
            if other != owner:
                assert value == 0, f"{term} leaks gradient into {other}: {got}"
    assert all(not p.requires_grad for p in model.filter.parameters())
    assert all(not p.requires_grad for p in target)


def test_no_cql_ablation(filter_ckpt, batch):
    for kw in (dict(conservative=False), dict(cql_weight=0.0)):
        model = _model(filter_ckpt, **kw)
        assert not model.conservative
        losses = model.compute_losses(_transitions(model, batch))
        assert float(losses["loss_cql"]) == 0.0
        assert torch.isfinite(losses["loss"])
    on = _model(filter_ckpt)
    assert float(on.compute_losses(_transitions(on, batch))["loss_cql"].detach()) != 0.0


def test_torchrl_lagrange_term_leaks_into_critic(filter_ckpt, batch):
    """TorchRL's CQLLoss.alpha_prime_loss is computed from the undetached conservative gap: its gradient reaches
    the critics (with the sign that makes them LESS conservative). If this starts failing, TorchRL fixed it."""
    model = _model(filter_ckpt, with_lagrange=True)
    loss = model.loss_module
    td = _transitions(model, batch).copy()
    loss.q_loss(td)
    loss.cql_loss(td)
    model.zero_grad(set_to_none=True)
    alpha_prime_loss, _ = loss.alpha_prime_loss(td)
    alpha_prime_loss.backward()
    assert _grad_norm(_params(loss.qvalue_network_params)) > 0


def test_lagrange_without_leak(filter_ckpt, batch):
    model = _model(filter_ckpt, with_lagrange=True, lagrange_thresh=0.5)
    loss = model.loss_module
    critic = _params(loss.qvalue_network_params)
    td = _transitions(model, batch)
    model.zero_grad(set_to_none=True)
    losses = model.compute_losses(td)
    losses["loss_alpha_prime"].backward()
    assert _grad_norm(critic) == 0 and _grad_norm(_params(loss.actor_network_params)) == 0
    assert _grad_norm([loss.log_alpha_prime]) > 0
    # the critics see alpha_prime * loss_cql in the total: same gradient as the terms combined by hand
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    losses = model.compute_losses(td)
    losses["loss"].backward()
    total = [p.grad.clone() for p in critic]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    losses = model.compute_losses(td)
    (losses["loss_qvalue"] + losses["alpha_prime"] * losses["loss_cql"]).backward()
    for a, b in zip(total, critic):
        torch.testing.assert_close(a, b.grad)


def test_input_batch_and_transitions_unchanged(filter_ckpt, batch):
    model = _model(filter_ckpt)
    before = batch.clone()
    td = model.normalize(model.sample_transitions(batch))
    td_before = td.clone()
    model.compute_losses(td)
    assert set(td.keys(True, True)) == set(td_before.keys(True, True))
    assert (td == td_before).all()
    assert set(batch.keys(True, True)) == set(before.keys(True, True))
    assert (batch == before).all()


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("cache", [0, 2])
def test_tiny_run_finite_and_filter_frozen(filter_ckpt, tiny_state_dataset, tmp_path, cache):
    model = _model(filter_ckpt, belief_cache_batches=cache, refresh_every=2)
    filter_before = {k: v.clone() for k, v in model.filter.state_dict().items()}
    critic_before = [p.clone() for p in _params(model.loss_module.qvalue_network_params)]
    trainer = make_trainer(tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=4)
    trainer.fit(model, datamodule=make_datamodule(tiny_state_dataset, num_segments=3))
    assert trainer.global_step == 4  # one grouped optimizer: one step per update
    metrics = trainer.callback_metrics
    for key in ("losses/loss_qvalue", "losses/loss_cql", "losses/loss_actor", "losses/loss_alpha", "val/loss_qvalue"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    for k, v in model.filter.state_dict().items():
        torch.testing.assert_close(v, filter_before[k], msg=f"filter {k} changed")
    assert not model.filter.training
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, _params(model.loss_module.qvalue_network_params)))
    assert bool(model.normalizer.ready)
    # the normaliser's statistics are the first training batch's (not updated later)
    assert model.env_config is not None and model.env_config["obs_mode"] == "state"


def test_belief_cache_refresh(filter_ckpt, batch, monkeypatch):
    model = _model(filter_ckpt, belief_cache_batches=2, refresh_every=3, transition_batch_size=32)
    calls = []
    original = model.compute_beliefs
    monkeypatch.setattr(model, "compute_beliefs", lambda b: calls.append(1) or original(b))
    monkeypatch.setattr(LatentCQLModule, "global_step", property(lambda self: self._step_override))
    steps = []
    for step in range(8):
        model._step_override = step
        n = len(calls)
        td = model.sample_transitions(batch)
        steps.append(len(calls) > n)
        assert td.batch_size == torch.Size([32])
    # filled on the first 2 steps, then refreshed on multiples of refresh_every
    assert steps == [True, True, False, True, False, False, True, False]
    assert model.cache.filled == 2 * batch.batch_size[0]


def _walk(obj, path="checkpoint"):
    if isinstance(obj, TensorDictBase):
        raise AssertionError(f"a TensorDict in the checkpoint at {path}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]")


def test_checkpoint_round_trip(filter_ckpt, tiny_state_dataset, tmp_path, batch):
    model = _model(filter_ckpt)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(model, datamodule=make_datamodule(tiny_state_dataset))
    path = tmp_path / "phase2.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    _walk(ckpt)
    assert ckpt["belief_filter"]["kwargs"]["obs_keys"] == ["state"] and ckpt["phase"] == "cql" and ckpt["env_config"]["obs_mode"] == "state"
    assert any(k.startswith("filter.") for k in ckpt["state_dict"]) and "normalizer.mean" in ckpt["state_dict"]
    beliefs = model.compute_beliefs(batch)[:, :5].reshape(-1, model.filter.belief_dim)
    expected = model.act(beliefs)

    # self-contained: works without the phase-1 checkpoint
    moved = tmp_path / "moved_filter.ckpt"
    shutil.copy(filter_ckpt, moved)
    restored_model = LatentCQLModule(str(moved), **SMALL_CQL)
    moved.unlink()
    restored = LatentCQLModule.load_phase2(path)
    torch.testing.assert_close(restored.act(beliefs), expected)
    torch.testing.assert_close(restored.compute_beliefs(batch)[:, :5].reshape(-1, restored.filter.belief_dim), beliefs)
    sd, ref = restored.state_dict(), model.state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], msg=k)
    assert restored.env_config == model.env_config
    # Lightning's own loader (reads filter_checkpoint, then the saved weights win)
    lightning_loaded = LatentCQLModule.load_from_checkpoint(path, map_location="cpu")
    torch.testing.assert_close(lightning_loaded.act(beliefs), expected)
    # a plain state_dict round trip into a fresh module
    restored_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored_model.act(beliefs), expected)
    # the target critics survive a reload (the SoftUpdate is re-created without resetting them)
    restored.target_updater()
    torch.testing.assert_close(restored.loss_module.target_qvalue_network_params.flatten_keys().to_dict(),
                               model.loss_module.target_qvalue_network_params.flatten_keys().to_dict())


def test_resume_with_ckpt_path(filter_ckpt, tiny_state_dataset, tmp_path):
    model = _model(filter_ckpt)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(model, datamodule=make_datamodule(tiny_state_dataset))
    path = tmp_path / "phase2.ckpt"
    trainer.save_checkpoint(path)
    again = _model(filter_ckpt)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(again, datamodule=make_datamodule(tiny_state_dataset), ckpt_path=str(path))
    assert trainer.global_step == 4
    torch.testing.assert_close(again.normalizer.mean, model.normalizer.mean)


# ---------------------------------------------------------------------- errors
def test_missing_filter_checkpoint(tmp_path):
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="nope/last.ckpt"):
        LatentCQLModule(str(missing))


def test_not_a_filter_checkpoint(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(1)}, "hyper_parameters": {}}, path)
    with pytest.raises(ValueError, match="not a VariationalFilterModule checkpoint"):
        LatentCQLModule(str(path))
    (tmp_path / "garbage.ckpt").write_text("garbage")
    with pytest.raises(ValueError, match="garbage.ckpt"):
        LatentCQLModule(str(tmp_path / "garbage.ckpt"))


def _untrained_filter_ckpt(path: Path, **kw) -> Path:
    model = VariationalFilterModule(**{**dict(obs_keys=["state"], cnn_depth=8, **SMALL_FILTER), **kw})
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.mark.parametrize("kw, dataset_name, match", [
    (dict(action_dim=3), "tiny_state_dataset", "action size"),
    (dict(num_tasks=3), "tiny_state_dataset", "task count"),
    (dict(), "tiny_pixel_dataset", "observation mode"),
    (dict(obs_keys=["pixels"], image_size=64), "tiny_pixel_dataset", "image size"),
])
def test_mismatched_filter_is_refused(tmp_path, request, kw, dataset_name, match):
    dataset = request.getfixturevalue(dataset_name)
    path = _untrained_filter_ckpt(tmp_path / "filter.ckpt", **kw)
    model = LatentCQLModule(str(path), **SMALL_CQL)
    obs_keys = ["pixels"] if dataset_name == "tiny_pixel_dataset" else ["state"]
    dm = make_datamodule(dataset, obs_keys=obs_keys)
    with pytest.raises(ValueError, match=match) as info:
        make_trainer(tmp_path, max_steps=1).fit(model, datamodule=dm)
    assert "filter.ckpt" in str(info.value)


def test_bad_arguments(filter_ckpt):
    with pytest.raises(ValueError, match="gamma"):
        LatentCQLModule(str(filter_ckpt), gamma=1.5)
    with pytest.raises(ValueError, match="transition_batch_size"):
        LatentCQLModule(str(filter_ckpt), belief_cache_batches=2, transition_batch_size=None)


def test_cli_fit_quickstart_config(filter_ckpt, tiny_state_dataset, tmp_path):
    """configs/cql_quickstart.yaml through the `lightning` CLI (shrunk): the filter built inside the model keeps its
    own hyper-parameters (LightningCLI hands the model's to every save_hyperparameters() call it wraps)."""
    import yaml

    from lightning_modules.cli import build_cli

    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = yaml.safe_load((configs / "cql_quickstart.yaml").read_text())
    cfg["data"] = yaml.safe_load((configs / cfg["data"]).read_text())  # the shared data-module block it names
    env = tiny_state_dataset.env_config
    cfg["trainer"].update(max_steps=2, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    evaluation, checkpoint = cfg["trainer"]["callbacks"]
    evaluation["init_args"].update(every_n_steps=2, trials=2, episodes=1, video=False)
    checkpoint["init_args"].update(every_n_train_steps=2)
    cfg["model"]["init_args"].update(filter_checkpoint=str(filter_ckpt), hidden_dim=32, num_random=4,
                                     belief_cache_batches=2, refresh_every=2)
    cfg["data"]["init_args"].update(root=str(tiny_state_dataset.root), rollouts_per_task=tiny_state_dataset.rollouts_per_task,
                                    episode_length=env.episode_length, batch_size=4, batches_per_epoch=2, val_batches=1)
    path = tmp_path / "cql.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = build_cli(["fit", "--config", str(path)])
    model = cli.model
    assert model.filter.kwargs["obs_keys"] == ["state"] and "filter_checkpoint" not in model.filter.kwargs
    assert cli.trainer.global_step == 2
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "eval_results.json").is_file()
    # the shipped config keeps the final model (last.ckpt) and chooses none with online rollouts (no best_eval.ckpt)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "checkpoints" / "best_eval.ckpt").exists()
    # it acts with the Polyak-averaged actor and decays the learning rates
    assert model.acting_actor is not None and model.hparams.lr_schedule == "cosine"
    assert "filter_hparams" not in model.hparams
    restored = LatentCQLModule.load_phase2(run_dir / "checkpoints" / "last.ckpt")
    assert restored.filter.kwargs["deter_dim"] == SMALL_FILTER["deter_dim"]
    # Lightning's loader re-instantiates through the CLI's instantiator: the filter must keep its own hparams too
    loaded = LatentCQLModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert loaded.filter.kwargs["obs_keys"] == ["state"]
    beliefs = torch.randn(3, model.filter.belief_dim)
    torch.testing.assert_close(loaded.act(beliefs), restored.act(beliefs))
