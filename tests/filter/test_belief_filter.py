"""The hand-over between the phases: BeliefFilter in checkpoints (this layout and the one before), phase checks."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.filter.belief_filter import BeliefFilter
from lightning_modules.filter.module import VariationalFilterModule

SMALL = dict(deter_dim=16, stoch_dim=4, hidden_dim=16, mlp_hidden=16, state_embed_dim=16, reward_embed_dim=4)


def _batch(tiny_state_dataset):
    from datamodules import MetaExplorationSampler, SamplerConfig

    cfg = SamplerConfig(batch_size=2, num_segments=2, obs_keys=("state",))
    return MetaExplorationSampler(tiny_state_dataset.buffers, cfg).sample(torch.Generator().manual_seed(0))


def test_filter_round_trips_through_both_checkpoint_layouts(tmp_path, tiny_state_dataset):
    torch.manual_seed(0)
    module = VariationalFilterModule(obs_keys=["state"], **SMALL)
    batch = _batch(tiny_state_dataset)
    module.filter.fit_state_stats(batch)
    expected = module.beliefs(batch)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["phase"] == "filter" and checkpoint["belief_filter"]["kwargs"]["obs_keys"] == ["state"]
    torch.save(checkpoint, tmp_path / "new.ckpt")
    # the layout before the hand-over: weights at rssm.* / state_stats_ready, no spec, the module's hparams
    old = {"state_dict": {k.removeprefix("filter."): v for k, v in module.state_dict().items()},
           "hyper_parameters": {**dict(module.hparams), "log_images_every_n_val": 5}}
    torch.save(old, tmp_path / "old.ckpt")
    for name in ("new.ckpt", "old.ckpt"):
        loaded = BeliefFilter.load(tmp_path / name)
        assert isinstance(loaded, BeliefFilter) and not isinstance(loaded, VariationalFilterModule)
        torch.testing.assert_close(loaded.beliefs(batch), expected, rtol=0, atol=0)
    # an old phase-1 checkpoint also resumes into the new module (its weights are renamed on load)
    again = VariationalFilterModule(obs_keys=["state"], **SMALL)
    again.on_load_checkpoint(old)
    again.load_state_dict(old["state_dict"])
    torch.testing.assert_close(again.beliefs(batch), expected, rtol=0, atol=0)


def test_checkpoint_of_the_other_phase_is_refused_by_name():
    module = VariationalFilterModule(obs_keys=["state"], **SMALL)
    with pytest.raises(ValueError, match=r"phase 'cql' \(LatentCQLModule\); the VariationalFilterModule \(phase "
                                         r"'filter'\) cannot resume or load it"):
        module.on_load_checkpoint({"phase": "cql", "state_dict": {}})
    with pytest.raises(ValueError, match="phase 'cql'"):  # older files: told apart by their weights
        module.on_load_checkpoint({"state_dict": {"loss_module.qvalue_network_params.x": torch.zeros(1)}})


def test_one_compatibility_check_names_every_mismatch():
    filt = BeliefFilter(obs_keys=["pixels"], image_size=32, num_tasks=2, cnn_depth=8, **SMALL)
    problems = filt.check_data(["state"], {"pixels": ((3, 64, 64), torch.uint8), "action": ((3,), torch.float32)}, 3)
    text = "; ".join(problems)
    for part in ("observation keys ['pixels']", "image_size=32", "action_dim=4", "task count"):
        assert part in text, text
    assert filt.check_data(["pixels"], {"pixels": ((3, 32, 32), torch.uint8)}, 2) == []


def test_mismatched_rssm_sizes_are_named_at_construction():
    """TorchRL's RSSMPrior needs hidden_dim == deter_dim; otherwise the first forward pass failed with a shape error."""
    with pytest.raises(ValueError, match=r"hidden_dim \(64\) must equal deter_dim \(16\)"):
        VariationalFilterModule(obs_keys=["state"], **{**SMALL, "hidden_dim": 64})
