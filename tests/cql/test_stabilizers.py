"""Phase 2's stabilisers: the Polyak-averaged acting actor, the cosine learning-rate decay, the BC term."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from lightning_modules.cql.module import LatentCQLModule
from lightning_modules.cql.stabilizers import lr_factor
from lightning_modules.cql.transitions import flat_transitions
from helpers import cpu_trainer, sample_batch, tiny_datamodule  # noqa: E402

SMALL_CQL = dict(hidden_dim=32, transition_batch_size=64, num_random=4)


def _model(filter_ckpt, **kw):
    torch.manual_seed(0)
    return LatentCQLModule(str(filter_ckpt), **{**SMALL_CQL, **kw})


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params.values(True, True)])


def test_lr_factor_cosine_and_constant():
    assert lr_factor("constant", 500, 1000, 0.1) == 1.0
    assert lr_factor("cosine", 0, 1000, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 500, 1000, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 1000, 1000, 0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 5000, 1000, 0.1) == pytest.approx(0.1)  # held after the decay
    values = [lr_factor("cosine", s, 100, 0.0) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("linear", 1, 10, 0.1)


@pytest.mark.parametrize("bad, match", [(dict(actor_polyak=1.0), "actor_polyak"), (dict(bc_weight=-1.0), "bc_weight"),
                                        (dict(lr_schedule="step"), "lr_schedule"), (dict(lr_final=2.0), "lr_final")])
def test_bad_stabiliser_arguments_are_named(filter_ckpt, bad, match):
    with pytest.raises(ValueError, match=match):
        _model(filter_ckpt, **bad)


def test_polyak_actor_starts_equal_and_acts(filter_ckpt):
    model = _model(filter_ckpt, actor_polyak=0.9)
    trained = model.loss_module.actor_network_params
    acting = TensorDict.from_module(model.acting_actor.actor)
    torch.testing.assert_close(_flat(acting), _flat(trained))
    assert not any(p.requires_grad for p in model.acting_actor.parameters())
    beliefs = torch.randn(5, model.filter.belief_dim)
    before = model.act(beliefs)
    # move the trained actor: the acting one follows by (1 - decay) per update, and act() uses it
    with torch.no_grad():
        for p in trained.values(True, True):
            p.add_(1.0)
    model.acting_actor.update(trained)
    torch.testing.assert_close(_flat(acting), _flat(trained) - 0.9, rtol=0, atol=1e-5)
    assert not torch.allclose(model.act(beliefs), before)


def test_bc_term_reaches_only_the_actor(filter_ckpt, tiny_state_dataset):
    model = _model(filter_ckpt, bc_weight=2.0)
    batch = sample_batch(tiny_state_dataset)
    beliefs = model.compute_beliefs(batch)
    model.normalizer.fit(beliefs)
    td = model.normalize(flat_transitions(beliefs, batch["action"], batch["next", "reward"]))
    before = td.clone()
    losses = model.compute_losses(td)
    assert "loss_bc" in model.loss_module.loss_terms and float(losses["loss_bc"]) > 0
    losses["loss_bc"].backward()
    loss = model.loss_module
    actor = [p.grad for p in loss.actor_network_params.values(True, True)]
    critic = [p.grad for p in loss.qvalue_network_params.values(True, True)]
    assert any(g is not None and g.abs().sum() > 0 for g in actor)
    assert all(g is None or g.abs().sum() == 0 for g in critic)
    assert (td == before).all()  # input unchanged
    # the total contains it
    total = losses["loss_qvalue"] + losses["loss_cql"] + losses["loss_actor"] + losses["loss_alpha"] + losses["loss_bc"]
    torch.testing.assert_close(losses["loss"], total)


def test_trainer_decays_lr_and_checkpoint_restores_acting_actor(filter_ckpt, tiny_state_dataset, tmp_path):
    model = _model(filter_ckpt, actor_polyak=0.5, lr_schedule="cosine", lr_final=0.2, actor_lr=1e-3)
    trainer = cpu_trainer(tmp_path, max_steps=4)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_state_dataset, batch_size=4, batches_per_epoch=4))
    groups = trainer.optimizers[0].param_groups
    # the last update (step 3 of 4) ran with the cosine factor of step 3
    expected = 1e-3 * lr_factor("cosine", 3, 4, 0.2)
    assert any(math.isclose(g["lr"], expected, rel_tol=1e-6) for g in groups)
    assert all(g["lr"] < g["base_lr"] for g in groups)
    # after 4 updates the acting actor lags the trained one, and a saved checkpoint restores it exactly
    acting, trained = TensorDict.from_module(model.acting_actor.actor), model.loss_module.actor_network_params
    assert not torch.allclose(_flat(acting), _flat(trained))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = LatentCQLModule.load_phase2(path)
    torch.testing.assert_close(_flat(TensorDict.from_module(loaded.acting_actor.actor)), _flat(acting))
    beliefs = torch.randn(3, model.filter.belief_dim)
    torch.testing.assert_close(loaded.act(beliefs), model.act(beliefs))
