"""Variational filter (phase 1) training speed: frames/s = B * L per second of forward + backward + optimizer step.

    python benchmarks/bench_filter.py                                   # CPU: state and 64 px, eager
    python benchmarks/bench_filter.py --compile                         # also torch.compile'd rows
    python benchmarks/bench_filter.py --device cuda --bf16 --batch-size 64 --obs pixels --compile
    python benchmarks/bench_filter.py --obs pixels --image-size 32 --cnn-depth 16 --deter-dim 64 --stoch-dim 16 \
        --hidden-dim 64 --batch-size 16 --length 120 --recon-fraction 1 0.25 --channels-last   # the pixels preset

Batches are random tensors with the DataModule's layout (uint8 pixels, state, action, ("next", "reward")),
already on the device: this measures the model, not data loading. Model sizes default to the paper-scale
ones (RSSM 256 / 64, conv 32..256 channels). The conv encoder runs over all B*L frames in one call before the
time loop and the decoders after it; only the transition / posterior cells are inside the loop.
On a small shared CPU pass ``--threads 1``: the recurrent loop is latency-bound and oversubscribed threads
make it several times slower.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from lightning_modules.filter.module import VariationalFilterModule  # noqa: E402


def make_batch(obs: str, B: int, L: int, image_size: int, device: torch.device) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    fields = {
        "action": torch.rand(B, L, 4, generator=g) * 2 - 1,
        ("next", "reward"): (torch.rand(B, L, 1, generator=g) < 0.2).float(),
        "state": torch.randn(B, L, 6, generator=g),
    }
    if obs == "pixels":
        fields["pixels"] = torch.randint(0, 256, (B, L, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    return TensorDict(fields, batch_size=[B, L]).to(device)


def bench(obs: str, args: argparse.Namespace, compiled: bool, recon_fraction: float = 1.0,
          channels_last: bool = False) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = VariationalFilterModule(obs_keys=[obs], image_size=args.image_size, deter_dim=args.deter_dim,
                                    stoch_dim=args.stoch_dim, hidden_dim=args.hidden_dim, mlp_hidden=args.hidden_dim,
                                    cnn_depth=args.cnn_depth, channels_last=channels_last, compile=compiled).to(device)
    batch = make_batch(obs, args.batch_size, args.length, args.image_size, device)
    model.filter.fit_state_stats(batch)
    opt = model.configure_optimizers()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss, _ = model.compute_losses(batch, recon_fraction=recon_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    frames = args.batch_size * args.length
    return {"obs": obs, "mode": "compiled" if compiled else "eager", "warmup_s": warmup_s,
            "ms": seconds * 1e3, "fps": frames / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--obs", nargs="+", default=["state", "pixels"], choices=["state", "pixels"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=80, help="L = K * T")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--deter-dim", type=int, default=256)
    parser.add_argument("--stoch-dim", type=int, default=64)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (like --trainer.precision bf16-mixed)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd recurrent cell")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cnn-depth", type=int, default=32, help="channels of the first conv layer")
    parser.add_argument("--recon-fraction", type=float, nargs="+", default=[1.0],
                        help="fractions of the frames whose images are reconstructed (one row each, pixels)")
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last conv weights (pixels)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: {args.device} ({name}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, precision {'bf16 autocast' if args.bf16 else 'fp32'}")
    print(f"model: RSSM {args.deter_dim}/{args.stoch_dim}, hidden {args.hidden_dim}; batch B={args.batch_size}, "
          f"L={args.length}")
    print()
    print("| obs | mode | reconstructed frames | B x L | ms / step | frames/s | warm-up s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for obs in args.obs:
        fractions = args.recon_fraction if obs == "pixels" else [1.0]
        layouts = [False, True] if (args.channels_last and obs == "pixels") else [False]
        for compiled in ([False, True] if args.compile else [False]):
            for fraction in fractions:
                for channels_last in layouts:
                    r = bench(obs, args, compiled, fraction, channels_last)
                    label = f"{args.image_size} px, depth {args.cnn_depth}" if obs == "pixels" else "state"
                    mode = r["mode"] + (", channels_last" if channels_last else "")
                    print(f"| {label} | {mode} | {fraction:.0%} | {args.batch_size} x {args.length} | {r['ms']:.1f} | "
                          f"{r['fps']:,.0f} | {r['warmup_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
