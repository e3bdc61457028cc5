"""Diagnostic (docs/RESULTS.md, "Precise beliefs"): how precisely a state filter's beliefs place the hand.

    python docs/scripts/belief_precision.py FILTER_CHECKPOINT [--data data/quickstart_state_varied] [--batches 4]

Filters meta-exploration sequences of the dataset (K = 3 segments, the training sampler), decodes the state from
the posterior mean and prints the error of the hand position (cm) per episode, grouped by how far the hand started
from the nominal start: mean, 90th percentile, first 5 steps, steps 20-40. Phase 2 acts on these beliefs: an error
of several cm is a missed handle (the loop is ~3 cm wide).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from datamodules.meta_exploration import MetaExplorationSampler, SamplerConfig  # noqa: E402
from envs.dataset import open_dataset  # noqa: E402
from envs.keys import STATE  # noqa: E402
from lightning_modules.filter.module import VariationalFilterModule  # noqa: E402

BANDS = ((0.0, 0.03), (0.03, 0.06), (0.06, 0.10))  # distance of the episode's hand start from the nominal one (m)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", default="data/quickstart_state_varied")
    p.add_argument("--batches", type=int, default=4, help="batches of 16 sequences (seeds 100, 101, ...)")
    args = p.parse_args()
    model = VariationalFilterModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    dataset = open_dataset(args.data)
    env = dataset.env_config
    T = env.episode_length
    sampler = MetaExplorationSampler(dataset.buffers, SamplerConfig(batch_size=16, num_segments=3, obs_keys=(STATE,)))
    rssm = model.filter.rssm
    errors, starts = [], []
    with torch.no_grad():
        for k in range(args.batches):
            batch = sampler.sample(torch.Generator().manual_seed(100 + k))
            out, _ = model.filter.run(batch, sample=False)
            decoded = rssm.decode(rssm.features(out["post_mean"], out["deter"]))[STATE] * rssm.state_std + rssm.state_mean
            true = batch[STATE].float()
            B = true.shape[0]
            errors.append((decoded - true)[..., :3].norm(dim=-1).reshape(B, -1, T))  # [B, K, T] metres
            starts.append((true[:, ::T, :2] - torch.tensor(env.hand_init[:2])).norm(dim=-1))  # [B, K]
    error, start = torch.cat(errors), torch.cat(starts)
    print(f"{args.checkpoint}\n| hand start from nominal | episodes | error mean (cm) | p90 | first 5 steps | steps 20-40 |")
    print("|---|---:|---:|---:|---:|---:|")
    for low, high in BANDS:
        e = error[(start >= low) & (start < high)] * 100
        if len(e):
            print(f"| {low * 100:.0f}-{high * 100:.0f} cm | {len(e)} | {e.mean():.2f} | {e.quantile(0.9):.2f} | "
                  f"{e[:, :5].mean():.2f} | {e[:, 20:].mean():.2f} |")


if __name__ == "__main__":
    main()
