"""Diagnostic (docs/RESULTS.md, "How precisely the pixel beliefs place the hand"): how precisely ONE frame places it.

    python docs/scripts/frame_precision.py --fit-data DATA_WITH_STATE --data FRESH_DATA_WITH_STATE [--steps 3000]

Fits the filter's conv encoder (``ConvEncoder``, the pixel preset's depth 16) plus a linear head to regress the hand
position (xyz) from single frames of ``--fit-data`` and prints the error (cm) on every frame of ``--data`` (rollouts
it never saw), overall and at the first step of an episode. No filter, no memory: what a frame alone holds, to compare
with what the beliefs hold (``belief_precision.py --readout``). Both datasets need ``obs_mode: pixels_state``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from belief_precision import fit_regression  # noqa: E402 - this folder (the script's own) is on sys.path
from envs.dataset import open_dataset  # noqa: E402
from envs.keys import PIXELS, STATE  # noqa: E402
from lightning_modules.filter.rssm import ConvEncoder  # noqa: E402


def frames(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every frame [N, T, 3, S, S] (uint8) and hand position [N, T, 3] (metres) of a dataset, tasks stacked."""
    buffers = open_dataset(root).buffers
    if STATE not in buffers[0].keys() or PIXELS not in buffers[0].keys():
        sys.exit(f"error: dataset {root} must store pixels and state (obs_mode pixels_state)")
    return (torch.cat([b[PIXELS] for b in buffers]), torch.cat([b[STATE][..., :3].float() for b in buffers]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fit-data", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--depth", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    x_fit, y_fit = (t.flatten(0, 1) for t in frames(args.fit_data))
    x_test, y_test = frames(args.data)
    encoder = ConvEncoder(x_fit.shape[-1], args.depth)
    net = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.out_dim, 3))
    predict = fit_regression(net, lambda x: x.float() / 255.0 - 0.5, x_fit, y_fit, args.steps, 128)  # filter's norm
    with torch.no_grad():
        pred = torch.cat([predict(x) for x in x_test.flatten(0, 1).split(1024)])
    error = (pred.reshape(y_test.shape) - y_test).norm(dim=-1) * 100  # [N, T] cm
    print(f"single-frame hand error (cm) on {args.data}, {error.numel()} frames: mean {error.mean():.2f}, "
          f"p90 {error.quantile(0.9):.2f}, first step of an episode {error[:, 0].mean():.2f}")


if __name__ == "__main__":
    main()
