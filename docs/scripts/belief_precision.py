"""Diagnostic (docs/RESULTS.md, "Precise beliefs"): how precisely a filter's beliefs place the hand.

    python docs/scripts/belief_precision.py FILTER_CHECKPOINT [--data data/quickstart_state_varied] [--batches 4]
    python docs/scripts/belief_precision.py PIXEL_FILTER_CHECKPOINT --data DATA_WITH_STATE --readout

Filters meta-exploration sequences of the dataset (K = 3 segments, the training sampler) and prints the error of the
hand position (cm) per episode, grouped by how far the hand started from the nominal start: mean, 90th percentile,
first 5 steps, steps 20-40. Phase 2 acts on these beliefs: an error of several cm is a missed handle (the loop is
~3 cm wide). The hand is read from the beliefs by the filter's own state decoder (state filters) or, with
``--readout`` (automatic for a filter that does not reconstruct the state, e.g. from pixels; the dataset must
store the state: ``obs_mode: pixels_state``), by a small MLP fitted on the beliefs of ``--fit-batches`` batches of
``--fit-data``: what phase 2's networks could read from the same beliefs. Score on rollouts the filter and the
read-out never saw (``--data``: a small dataset collected with another seed), or both can look better than online.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
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
    p.add_argument("--readout", action="store_true", help="read the hand with a fitted MLP, not the state decoder")
    p.add_argument("--fit-batches", type=int, default=16, help="--readout: batches it is fitted on (seeds 500, ...)")
    p.add_argument("--fit-data", default=None, help="--readout: the dataset it is fitted on (default: --data); score "
                   "on fresh rollouts (--data) with the filter's training data here, or the read-out can memorise")
    args = p.parse_args()
    model = VariationalFilterModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    dataset = open_dataset(args.data)
    env = dataset.env_config
    T = env.episode_length
    if STATE not in dataset.buffers[0].keys():
        sys.exit(f"error: dataset {args.data} stores no state (obs_mode {env.obs_mode!r}); collect one with pixels_state")
    obs_keys = tuple(dict.fromkeys((*model.filter.obs_keys, STATE)))
    sampler = MetaExplorationSampler(dataset.buffers, SamplerConfig(batch_size=16, num_segments=3, obs_keys=obs_keys))
    rssm = model.filter.rssm
    readout = None
    if args.readout or STATE not in model.filter.obs_keys:
        fit_buffers = open_dataset(args.fit_data).buffers if args.fit_data else dataset.buffers
        readout = fit_readout(model, MetaExplorationSampler(fit_buffers, sampler.config), args.fit_batches)
    errors, starts = [], []
    with torch.no_grad():
        for k in range(args.batches):
            batch = sampler.sample(torch.Generator().manual_seed(100 + k))
            if readout is not None:
                decoded = readout(model.filter.beliefs(batch))
            else:
                out, _ = model.filter.run(batch, sample=False)
                decoded = rssm.decode(rssm.features(out["post_mean"], out["deter"]))[STATE] * rssm.state_std + rssm.state_mean
            true = batch[STATE].float()
            B = true.shape[0]
            errors.append((decoded[..., :3] - true[..., :3]).norm(dim=-1).reshape(B, -1, T))  # [B, K, T] metres
            starts.append((true[:, ::T, :2] - torch.tensor(env.hand_init[:2])).norm(dim=-1))  # [B, K]
    error, start = torch.cat(errors), torch.cat(starts)
    how = f"MLP read-out fitted on {args.fit_batches} batches" if readout is not None else "the filter's state decoder"
    print(f"{args.checkpoint} ({how})\n| hand start from nominal | episodes | error mean (cm) | p90 | first 5 steps | steps 20-40 |")
    print("|---|---:|---:|---:|---:|---:|")
    for low, high in BANDS:
        e = error[(start >= low) & (start < high)] * 100
        if len(e):
            print(f"| {low * 100:.0f}-{high * 100:.0f} cm | {len(e)} | {e.mean():.2f} | {e.quantile(0.9):.2f} | "
                  f"{e[:, :5].mean():.2f} | {e[:, 20:].mean():.2f} |")


def fit_readout(model: VariationalFilterModule, sampler: MetaExplorationSampler, batches: int,
                steps: int = 3000) -> Callable[[torch.Tensor], torch.Tensor]:
    """An MLP from beliefs to the hand position (xyz, metres) fitted by Adam on ``batches`` batches (seeds 500, ...)."""
    with torch.no_grad():
        data = [sampler.sample(torch.Generator().manual_seed(500 + k)) for k in range(batches)]
        x = torch.cat([model.filter.beliefs(b).flatten(0, 1) for b in data])
        y = torch.cat([b[STATE].float()[..., :3].flatten(0, 1) for b in data])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ELU(), torch.nn.Linear(256, 256),
                              torch.nn.ELU(), torch.nn.Linear(256, 3))
    return fit_regression(net, lambda b: (b - mu) / sd, x, y, steps, 512, torch.Generator().manual_seed(0))


def fit_regression(net: torch.nn.Module, prepare: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, steps: int, batch_size: int,
                   generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit ``net(prepare(x))`` to standardised ``y`` by Adam (squared error); returns x -> prediction in y's units."""
    y_mu, y_sd = y.mean(0), y.std(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(len(x), (batch_size,), generator=generator)
            loss = (net(prepare(x[idx])) - (y[idx] - y_mu) / y_sd).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return lambda inputs: net(prepare(inputs)) * y_sd + y_mu


if __name__ == "__main__":
    main()
