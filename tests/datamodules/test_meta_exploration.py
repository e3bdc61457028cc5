"""Synthetic exploration sampler (paper section 3.5): statistics, relabelling, structure, seeding, errors.

Every check looks the sampled data up in the real buffers (via the ``task``/``rollout``/``step`` keys). Tests
with more than 2 tasks reuse the real buffers of the 2-task dataset under more task ids.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import MetaExplorationSampler, MetaExplorationStream, SamplerConfig
from datamodules.datamodule import keep_batch

def chi2_critical(df: int, z: float = 3.29) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z=3.29 is p = 0.0005 one-sided."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi2_uniform(values: torch.Tensor, n: int) -> float:
    counts = torch.bincount(values.reshape(-1), minlength=n).double()
    expected = values.numel() / n
    return float(((counts - expected) ** 2 / expected).sum())


def chi2_independence(a: torch.Tensor, b: torch.Tensor, na: int, nb: int) -> float:
    table = torch.bincount(a.reshape(-1) * nb + b.reshape(-1), minlength=na * nb).double().view(na, nb)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def draw(sampler: MetaExplorationSampler, batches: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-segment indices [batches * B, K] (and targets [batches * B]) of many batches."""
    gen = torch.Generator().manual_seed(seed)
    parts = [sampler.sample_indices(gen) for _ in range(batches)]
    return {name: torch.cat([getattr(p, name) for p in parts]) for name in ("task", "rollout", "offset", "target")}


def more_tasks(dataset, n: int) -> list:
    """n task buffers made of the dataset's real buffers (task i reuses buffer i % 2)."""
    return [dataset.buffers[i % dataset.num_tasks] for i in range(n)]


def check_against_buffers(batch, buffers) -> None:
    """Every delivered step equals the buffer entry it claims to come from; rewards are relabelled exactly."""
    task, rollout, step = batch["task"], batch["rollout"], batch["step"]
    obs_keys = [k for k in ("pixels", "state") if k in batch.keys()]
    for t in torch.unique(task).tolist():
        m = task == t
        src = buffers[t]
        for key in obs_keys + ["action", ("next", "reward")]:
            want = src[key][rollout[m], step[m]]
            got = batch[("next", "original_reward") if key == ("next", "reward") else key][m]
            assert torch.equal(got, want), (t, key)
    on_target = (task == batch["target_task"]).unsqueeze(-1)
    assert torch.equal(batch["next", "reward"][on_target], batch["next", "original_reward"][on_target])
    assert (batch["next", "reward"][~on_target] == 0).all()


def check_structure(batch, K: int, T: int, episode_length: int) -> None:
    B, L = batch.batch_size
    assert L == K * T
    pos = torch.arange(L)
    assert torch.equal(batch["segment"], (pos // T).expand(B, L))
    assert torch.equal(batch["segment_start"][..., 0], (pos % T == 0).expand(B, L))
    assert batch["segment_start"].dtype == torch.bool and batch["segment_start"].shape == (B, L, 1)
    seg = lambda x: x.view(B, K, T)  # noqa: E731
    for key in ("task", "rollout"):
        assert (seg(batch[key]) == seg(batch[key])[..., :1]).all(), key  # constant within a segment
    assert (batch["target_task"] == batch["target_task"][:, :1]).all()  # constant along L
    steps = seg(batch["step"])
    assert torch.equal(steps - steps[..., :1], torch.arange(T).expand(B, K, T))  # consecutive steps
    assert steps.min() >= 0 and steps.max() < episode_length


def test_keys_shapes_and_data(tiny_pixel_dataset):
    ds = tiny_pixel_dataset
    sampler = MetaExplorationSampler(ds.buffers, SamplerConfig(batch_size=8, num_segments=3, segment_length=4))
    batch = sampler.sample(torch.Generator().manual_seed(0))
    B, L = 8, 12
    assert batch.batch_size == (B, L)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (B, L, 3, 32, 32)
    assert batch["state"].dtype == torch.float32 and batch["state"].shape == (B, L, 6)
    assert batch["action"].shape == (B, L, 4)
    for key in (("next", "reward"), ("next", "original_reward")):
        assert batch[key].dtype == torch.float32 and batch[key].shape == (B, L, 1)
    for key in ("task", "target_task", "segment", "rollout", "step"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (B, L)
    assert "is_init" not in batch.keys()
    check_structure(batch, 3, 4, ds.episode_length)
    check_against_buffers(batch, ds.buffers)


def test_obs_subset_and_full_episodes(tiny_pixel_dataset):
    ds = tiny_pixel_dataset
    cfg = SamplerConfig(batch_size=4, num_segments=2, segment_length=None, obs_keys=("pixels",))
    batch = MetaExplorationSampler(ds.buffers, cfg).sample(torch.Generator().manual_seed(1))
    assert "pixels" in batch.keys() and "state" not in batch.keys()
    assert batch.batch_size == (4, 2 * ds.episode_length)
    assert (batch["step"].view(4, 2, -1)[..., 0] == 0).all()  # whole episodes: no crop offset
    check_structure(batch, 2, ds.episode_length, ds.episode_length)
    check_against_buffers(batch, ds.buffers)


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_synthetic_statistics(tiny_state_dataset, num_tasks):
    """Thousands of segments: task, target, rollout and crop marginals uniform; target independent of segment tasks."""
    buffers = more_tasks(tiny_state_dataset, num_tasks)
    K, T, E = 4, 10, tiny_state_dataset.episode_length
    sampler = MetaExplorationSampler(buffers, SamplerConfig(batch_size=64, num_segments=K, segment_length=T))
    d = draw(sampler, batches=100)  # 6400 meta-rollouts, 25600 segments
    N, R = num_tasks, tiny_state_dataset.rollouts_per_task
    assert chi2_uniform(d["target"], N) < chi2_critical(N - 1)
    assert chi2_uniform(d["task"], N) < chi2_critical(N - 1)
    targets = d["target"][:, None].expand_as(d["task"])
    assert chi2_independence(targets, d["task"], N, N) < chi2_critical((N - 1) ** 2)
    for j in range(K):  # every segment position separately, and the first two jointly
        assert chi2_independence(d["target"], d["task"][:, j], N, N) < chi2_critical((N - 1) ** 2)
    assert chi2_independence(d["target"], d["task"][:, 0] * N + d["task"][:, 1], N, N * N) < chi2_critical((N - 1) * (N * N - 1))
    for t in range(N):
        assert chi2_uniform(d["rollout"][d["task"] == t], R) < chi2_critical(R - 1)
    assert chi2_uniform(d["offset"], E - T + 1) < chi2_critical(E - T)
    assert d["offset"].max() == E - T and d["offset"].min() == 0
    # a segment carries the target's rewards with probability 1/N
    frac = (d["task"] == targets).double().mean().item()
    assert abs(frac - 1 / N) < 4 * math.sqrt((1 / N) * (1 - 1 / N) / d["task"].numel())


@pytest.mark.parametrize("num_tasks", [3, 5])
def test_search_fraction_makes_the_first_segments_distinct_tasks(tiny_state_dataset, num_tasks):
    """search_fraction: that share of meta-rollouts searches (distinct tasks first), the rest stays i.i.d.; task and
    target marginals stay uniform and independent; 0 leaves the paper's stream exactly as it was."""
    buffers = more_tasks(tiny_state_dataset, num_tasks)
    K, N = 4, num_tasks
    first = min(K, N)

    def sampler(fraction: float) -> MetaExplorationSampler:
        return MetaExplorationSampler(buffers, SamplerConfig(batch_size=64, num_segments=K, segment_length=10,
                                                             search_fraction=fraction))

    iid = draw(sampler(0.0), batches=20)
    plain = draw(MetaExplorationSampler(buffers, SamplerConfig(batch_size=64, num_segments=K, segment_length=10)), 20)
    assert all(torch.equal(iid[k], plain[k]) for k in iid)
    for fraction in (1.0, 0.5):
        d = draw(sampler(fraction), batches=60)  # 3840 meta-rollouts
        distinct = torch.tensor([len(set(row[:first].tolist())) == first for row in d["task"]])
        p_iid = math.prod((N - j) / N for j in range(first))  # i.i.d. tasks happen to be distinct
        expected = fraction + (1 - fraction) * p_iid
        assert abs(distinct.double().mean().item() - expected) < 4 * math.sqrt(expected * (1 - expected) / len(distinct)) + 1e-9
        assert chi2_uniform(d["task"], N) < chi2_critical(N - 1)
        assert chi2_uniform(d["target"], N) < chi2_critical(N - 1)
        for j in range(K):
            assert chi2_independence(d["target"], d["task"][:, j], N, N) < chi2_critical((N - 1) ** 2)
    with pytest.raises(ValueError, match="search_fraction"):
        sampler(1.5)


@pytest.mark.parametrize("num_tasks", [3, 5])
def test_cyclic_search_order(tiny_state_dataset, num_tasks):
    """search_order "cyclic": a search's first task is uniform, the next ones follow it in index order modulo N
    (the same next task after the same failures); the target stays uniform and independent of it."""
    buffers = more_tasks(tiny_state_dataset, num_tasks)
    K, N = 4, num_tasks
    first = min(K, N)
    d = draw(MetaExplorationSampler(buffers, SamplerConfig(batch_size=64, num_segments=K, segment_length=10,
                                                           search_fraction=1.0, search_order="cyclic")), batches=30)
    start = d["task"][:, :1]
    assert torch.equal(d["task"][:, :first], (start + torch.arange(first)) % N)
    assert chi2_uniform(start, N) < chi2_critical(N - 1)
    assert chi2_independence(d["target"], start[:, 0], N, N) < chi2_critical((N - 1) ** 2)
    with pytest.raises(ValueError, match="search_order"):
        MetaExplorationSampler(buffers, SamplerConfig(search_order="sorted"))


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_rewards_relabelled_against_buffers(tiny_state_dataset, num_tasks):
    buffers = more_tasks(tiny_state_dataset, num_tasks)
    sampler = MetaExplorationSampler(buffers, SamplerConfig(batch_size=32, num_segments=3, segment_length=10))
    gen = torch.Generator().manual_seed(2)
    zeroed = kept = 0
    for _ in range(20):
        batch = sampler.sample(gen)
        check_structure(batch, 3, 10, tiny_state_dataset.episode_length)
        check_against_buffers(batch, buffers)
        off = batch["task"] != batch["target_task"]
        zeroed += int((batch["next", "original_reward"][off] > 0).sum())
        kept += int((batch["next", "reward"] > 0).sum())
    assert zeroed > 100 and kept > 100  # both cases really occur (real rewards are sparse but present)


def test_no_expl_mode(tiny_state_dataset):
    buffers = more_tasks(tiny_state_dataset, 3)
    sampler = MetaExplorationSampler(buffers, SamplerConfig(batch_size=64, num_segments=3, segment_length=10, mode="no_expl"))
    d = draw(sampler, batches=50)
    assert (d["task"] == d["target"][:, None]).all()
    assert chi2_uniform(d["target"], 3) < chi2_critical(2)
    batch = sampler.sample(torch.Generator().manual_seed(3))
    assert torch.equal(batch["task"], batch["target_task"])
    assert torch.equal(batch["next", "reward"], batch["next", "original_reward"])
    assert (batch["next", "reward"] > 0).any()
    check_against_buffers(batch, buffers)


def test_storage_paths_agree(tiny_pixel_dataset):
    """Memory-mapped, in-memory, and the torch index_select (device) path deliver identical batches."""
    cfg = SamplerConfig(batch_size=6, num_segments=3, segment_length=5)
    variants = [MetaExplorationSampler(tiny_pixel_dataset.buffers, cfg),
                MetaExplorationSampler(tiny_pixel_dataset.buffers, cfg, in_memory=True),
                MetaExplorationSampler(tiny_pixel_dataset.buffers, cfg, device="cpu"),
                MetaExplorationSampler(tiny_pixel_dataset.buffers, cfg, torch_gather=True)]
    batches = [s.sample(torch.Generator().manual_seed(4)) for s in variants]
    for other in batches[1:]:
        assert (other == batches[0]).all()


def test_seed_reproducibility(tiny_state_dataset):
    cfg = SamplerConfig(batch_size=16, num_segments=2, segment_length=8)
    a = MetaExplorationSampler(tiny_state_dataset.buffers, cfg)
    b = pickle.loads(pickle.dumps(a))  # as in a spawned DataLoader worker
    same = [s.sample(torch.Generator().manual_seed(5)) for s in (a, b)]
    assert (same[0] == same[1]).all()
    other = a.sample(torch.Generator().manual_seed(6))
    assert not torch.equal(other["rollout"], same[0]["rollout"])
    # streams: batch g depends on (seed, stream, rank, g) only
    s1 = MetaExplorationStream(a, seed=7, batches_per_epoch=6)
    s2 = MetaExplorationStream(b, seed=7, batches_per_epoch=6)
    assert all((x == y).all() for x, y in zip(s1, s2))
    assert not torch.equal(s1.batch(0)["rollout"], s1.batch(1)["rollout"])
    assert not torch.equal(s1.batch(0)["rollout"], MetaExplorationStream(a, seed=8).batch(0)["rollout"])


def test_stream_ranks_workers_and_resume(tiny_state_dataset):
    sampler = MetaExplorationSampler(tiny_state_dataset.buffers, SamplerConfig(batch_size=8, num_segments=2, segment_length=10))
    ref = [MetaExplorationStream(sampler, seed=0).batch(g) for g in range(10)]
    for workers in (0, 2):  # the same stream whatever the number of workers
        stream = MetaExplorationStream(sampler, seed=0, batches_per_epoch=5)
        got = list(DataLoader(stream, batch_size=None, collate_fn=keep_batch, num_workers=workers))
        assert len(got) == 5 and all((x == y).all() for x, y in zip(got, ref))
        stream.position = 3  # resume: the pass runs from batch 3 to the epoch boundary
        got = list(DataLoader(stream, batch_size=None, collate_fn=keep_batch, num_workers=workers))
        assert len(got) == 2 and all((x == y).all() for x, y in zip(got, ref[3:5]))
    # different ranks draw different meta-rollouts (identical ones would be a 1-in-500,000 coincidence here)
    rank1 = [MetaExplorationStream(sampler, seed=0, rank=1).batch(g) for g in range(10)]
    assert not set().union(*map(meta_rollouts, ref)) & set().union(*map(meta_rollouts, rank1))
    assert len(set().union(*map(meta_rollouts, ref))) > 75  # 80 samples, nearly all distinct


def meta_rollouts(batch) -> set[tuple]:
    """Hashable identity of each meta-rollout of a batch: its target and (task, rollout, first step) per segment."""
    starts = batch["segment_start"][..., 0]
    keys = [batch[k][starts].view(batch.batch_size[0], -1) for k in ("task", "rollout", "step")]
    return {(int(batch["target_task"][b, 0]), *zip(*(k[b].tolist() for k in keys))) for b in range(batch.batch_size[0])}


def test_errors(tiny_state_dataset, tiny_pixel_dataset):
    bufs = tiny_state_dataset.buffers
    with pytest.raises(ValueError, match="mode"):
        MetaExplorationSampler(bufs, SamplerConfig(mode="expl"))
    with pytest.raises(ValueError, match="num_segments"):
        MetaExplorationSampler(bufs, SamplerConfig(num_segments=0))
    with pytest.raises(ValueError, match="segment_length"):
        MetaExplorationSampler(bufs, SamplerConfig(segment_length=41))
    with pytest.raises(ValueError, match="pixels"):
        MetaExplorationSampler(bufs, SamplerConfig(obs_keys=("pixels",)))
    with pytest.raises(ValueError, match="at least one"):
        MetaExplorationSampler([], SamplerConfig())
    with pytest.raises(ValueError, match="batch size"):  # episode lengths 40 vs 10
        MetaExplorationSampler([bufs[0], tiny_pixel_dataset.buffers[1]], SamplerConfig(obs_keys=("state",)))
    with pytest.raises(ValueError, match="lacks key"):
        MetaExplorationSampler([bufs[0], bufs[1].exclude("action")], SamplerConfig())
    with pytest.raises(ValueError, match="batches_per_epoch"):
        MetaExplorationStream(MetaExplorationSampler(bufs), seed=0, batches_per_epoch=0)
