"""Phase 2's stabilisers: the Polyak-averaged acting actor, the cosine learning-rate decay, the BC term and its
``identified`` / ``search`` filters."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from lightning_modules.cql.module import LatentCQLModule
from lightning_modules.cql.stabilizers import lr_factor
from envs.keys import ORIGINAL_REWARD, REWARD, SEGMENT, TARGET_TASK, TASK
from lightning_modules.cql.transitions import BC_MASK, bc_segment_mask, flat_transitions
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
                                        (dict(bc_filter="rewarded"), "bc_filter"),
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


def _meta(tasks: list[list[int]], target: int, steps: int = 2) -> TensorDict:
    """Meta-trajectories of N = 3 tasks, ``steps`` per segment: every rollout opens its drawer (logged reward 1 on
    its last step), the relabelled reward is that of the target's segments."""
    task = torch.tensor(tasks).repeat_interleave(steps, dim=1)
    B, L = task.shape
    segment = torch.arange(L).div(steps, rounding_mode="floor").expand(B, L)
    last = (torch.arange(L) % steps == steps - 1).expand(B, L)
    logged = last.float().unsqueeze(-1).expand(B, L, 1).clone()
    reward = logged * (task == target).float().unsqueeze(-1)
    return TensorDict({TASK: task, TARGET_TASK: torch.full((B, L), target), SEGMENT: segment, REWARD: reward,
                       ORIGINAL_REWARD: logged}, batch_size=[B, L])


def test_bc_segment_mask_identified_and_search_rules():
    batch = _meta([[1, 2, 0, 0],      # two distinct failures identify 0: segments 2 and 3 kept
                   [0, 1, 0, 2],      # found in segment 0 (a guess, not kept): segment 2 kept
                   [1, 1, 0, 0],      # one drawer failed twice: segment 2 is still a guess, segment 3 kept
                   [2, 2, 2, 1]], target=0)
    mask = bc_segment_mask(batch, num_tasks=3, rule="identified")[..., 0].reshape(4, 4, 2)
    assert (mask == mask[..., :1]).all()  # whole segments
    assert mask[..., 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    # search: the found drawer, else the lowest-index drawer not failed yet (0 first, then 1, then 2)
    search = _meta([[0, 0, 1, 2],     # 0 (next) fails, 0 again (not next: 1 is), 1 (next) fails, 2 (next) found
                    [1, 2, 0, 0],     # 1 (a guess: 0 was next), 2 found by luck (not next), then 0: not 2
                    [1, 0, 2, 0]], target=2)   # 1 guess, 0 next -> fails, 2 next -> found, 0 is not the found one
    rows = bc_segment_mask(search, num_tasks=3, rule="search")[..., 0].reshape(3, 4, 2)[..., 0].tolist()
    assert rows == [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    with pytest.raises(ValueError, match="rule"):
        bc_segment_mask(search, num_tasks=3, rule="all")
    # a rollout that opened nothing (a failed attempt) neither counts nor identifies
    failed = batch.clone()
    failed[REWARD][0, 4:6] = 0.0
    failed[ORIGINAL_REWARD][0, 4:6] = 0.0
    assert bc_segment_mask(failed, num_tasks=3)[0, :, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_identified_mask_on_sampled_batches_is_inside_the_target_segments(tiny_state_dataset):
    batch = sample_batch(tiny_state_dataset, batch_size=16, num_segments=3)
    mask = bc_segment_mask(batch, num_tasks=2)[..., 0]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (batch[TASK][mask > 0] == batch[TARGET_TASK][mask > 0]).all()
    assert (mask[batch[SEGMENT] == 0] == 0).all()  # nothing is known in the first segment


def test_bc_term_with_identified_filter_imitates_only_the_masked_transitions(filter_ckpt, tiny_state_dataset):
    model = _model(filter_ckpt, bc_weight=1.0, bc_filter="identified")
    batch = sample_batch(tiny_state_dataset, batch_size=16, num_segments=3)
    beliefs = model.compute_beliefs(batch)
    model.normalizer.fit(beliefs)
    mask = model.bc_mask(batch)
    assert mask is not None and mask.shape == (*beliefs.shape[:2], 1)
    td = model.normalize(flat_transitions(beliefs, batch["action"], batch["next", "reward"], bc_mask=mask))
    full = model.loss_module.bc_loss(td.exclude(BC_MASK))
    kept = td[BC_MASK][:, 0] > 0
    masked = model.loss_module.bc_loss(td)
    torch.testing.assert_close(masked, model.loss_module.bc_loss(td[kept].exclude(BC_MASK)))
    assert kept.any() and not kept.all() and not torch.allclose(masked, full)
    # with the "all" filter no mask is made, and the cache fills ones
    assert _model(filter_ckpt, bc_weight=1.0).bc_mask(batch) is None


def test_cache_state_written_before_the_mask_restores_with_every_step_kept():
    from lightning_modules.cql.transitions import BeliefCache

    cache = BeliefCache(2)
    cache.insert(torch.randn(3, 5, 4), torch.randn(3, 5, 2), torch.rand(3, 5, 1))
    old = {k: v for k, v in cache.state_dict().items() if k != BC_MASK}  # an older checkpoint's cache
    restored = BeliefCache(2)
    restored.load_state_dict(old)
    restored.materialize("cpu")
    td = restored.sample(8, 1, 0.9)
    assert (td[BC_MASK] == 1).all() and restored.filled == 3
