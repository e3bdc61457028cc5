"""Frames/s of synthetic-exploration batches delivered into device memory (B*L frames per batch, 64 px).

    PYTHONPATH=. MUJOCO_GL=egl python benchmarks/bench_sampler.py [--root data/bench_64px] [--seconds 3]

Goes through ``MetaExplorationDataModule.train_dataloader()`` (the real training path) and times
``batch.to(device)`` too. Rows: memory-mapped vs in-memory buffers, DataLoader workers, a few B/K/T settings,
on cpu and (if available) cuda, where "on device" keeps the buffers on the GPU and gathers there.
The 64 px dataset (2 tasks x 40 rollouts x 40 steps, pixels) is collected into ``--root`` if missing.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

from datamodules import MetaExplorationDataModule  # noqa: E402

SETTINGS = [(16, 2, 40), (32, 4, 20), (64, 2, 10)]  # (B, K, T)


def measure(dm: MetaExplorationDataModule, device: torch.device, seconds: float, warmup: int = 3) -> tuple[float, int]:
    """Batches/s and frames per batch of ``dm``'s training loader, each batch moved to ``device``."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(warmup):
        next(it).to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it).to(device, non_blocking=True)
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    frames = batch.batch_size[0] * batch.batch_size[1]
    del it
    return n / elapsed, frames


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/bench_64px", help="64 px dataset (collected here if missing)")
    parser.add_argument("--rollouts", type=int, default=40, help="rollouts per task when collecting")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to try (cpu storage)")
    args = parser.parse_args(argv)

    common = dict(root=args.root, obs_mode="pixels", image_size=64, episode_length=40, rollouts_per_task=args.rollouts,
                  collection_workers=min(2, os.cpu_count() or 1), batches_per_epoch=None)
    t0 = time.perf_counter()
    MetaExplorationDataModule(**common).prepare_data()
    print(f"dataset {args.root} ready in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}\n")

    targets = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print("| device | buffers | workers | B | K | T | frames/batch | ms/batch | frames/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for device in targets:
        variants = [("memmap", dict(in_memory=False), w) for w in args.workers]
        variants += [("in memory", dict(in_memory=True), w) for w in args.workers]
        if device.type == "cuda":
            variants = [(name, {**kw, "pin_memory": True}, w) for name, kw, w in variants]
            variants.append(("on device", dict(device="cuda"), 0))
        for name, kw, workers in variants:
            for B, K, T in SETTINGS:
                dm = MetaExplorationDataModule(**common, **kw, num_workers=workers, batch_size=B, num_segments=K,
                                               segment_length=T)
                rate, frames = measure(dm, device, args.seconds)
                print(f"| {device.type} | {name} | {workers} | {B} | {K} | {T} | {frames} | {1000 / rate:.2f} | "
                      f"{rate * frames:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
