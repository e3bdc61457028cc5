"""Phase-2 speed: CQL updates/s on belief transitions, and online evaluation episodes/s.

    python benchmarks/bench_cql.py                                  # CPU, eager, batch 256, belief dim 576
    python benchmarks/bench_cql.py --compile                        # also torch.compile of the whole update
    python benchmarks/bench_cql.py --device cuda --batch-size 1024 --compile --cudagraph

One *update* = ``LatentCQLModule.compute_losses`` (TD loss, CQL term with ``num_random`` sampled actions per belief
for the current and next beliefs, actor and temperature losses) + backward + one step of the grouped Adam + the
SoftUpdate of the target critics, on a flat batch of random standardised belief transitions already on the device
(the filter is not run: see ``bench_filter.py`` and the module's belief cache). The belief size comes from an
(untrained) filter of ``--stoch-dim`` / ``--deter-dim`` (belief = 2 * stoch + deter: 64 / 448 -> 576).

Evaluation: ``--eval-trials`` trials x 3 episodes of 40 steps of the real env, the filter and the actor stepped in
lockstep over ``--eval-trials`` envs (state observations, quickstart-sized filter, and 64 px pixels with the
paper-sized filter unless ``--no-eval-pixels``); episodes/s includes building the envs once.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.gl import select_headless_gl  # noqa: E402

select_headless_gl()

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from lightning_modules.cql.module import LatentCQLModule  # noqa: E402
from lightning_modules.cql.networks import BELIEF  # noqa: E402


def make_model(args: argparse.Namespace, obs_keys=("state",), stoch=None, deter=None, image_size=64) -> LatentCQLModule:
    fh = dict(obs_keys=list(obs_keys), image_size=image_size, stoch_dim=stoch or args.stoch_dim,
              deter_dim=deter or args.deter_dim, hidden_dim=deter or args.deter_dim)  # the RSSM needs them equal
    torch.manual_seed(0)
    return LatentCQLModule("unused.ckpt", filter_spec={"format": 1, "kwargs": fh}, hidden_dim=args.hidden_dim,
                           num_random=args.num_random, transition_batch_size=args.batch_size)


def make_transitions(n: int, belief_dim: int, device: torch.device) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    false = torch.zeros(n, 1, dtype=torch.bool)
    return TensorDict({
        BELIEF: torch.randn(n, belief_dim, generator=g),
        "action": torch.rand(n, 4, generator=g) * 2 - 1,
        "next": {BELIEF: torch.randn(n, belief_dim, generator=g), "reward": (torch.rand(n, 1, generator=g) < 0.2).float(),
                 "done": false, "terminated": false.clone()},
    }, batch_size=[n]).to(device)


def bench_updates(args: argparse.Namespace, mode: str) -> dict:
    device = torch.device(args.device)
    model = make_model(args).to(device)
    opt = model.configure_optimizers()
    if "cudagraph" in mode:  # Adam must keep its step counters on the device to be captured
        for group in opt.param_groups:
            group["capturable"] = True
    updater = model.target_updater()
    td = make_transitions(args.batch_size, model.filter.belief_dim, device)

    def update(data: TensorDict) -> torch.Tensor:
        losses = model.compute_losses(data)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        updater.step()
        return losses["loss"].detach()

    fn = update
    if mode in ("compile", "compile+cudagraph"):
        fn = torch.compile(update, mode=args.compile_mode)
    if mode == "compile+cudagraph" or mode == "cudagraph":
        from tensordict.nn import CudaGraphModule

        fn = CudaGraphModule(fn, warmup=args.warmup)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        fn(td)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        loss = fn(td)
    sync(device)
    dt = time.perf_counter() - t0
    assert torch.isfinite(loss).all()
    return {"mode": mode, "updates_s": args.iters / dt, "ms": 1000 * dt / args.iters, "warmup_s": warmup_s,
            "belief_dim": model.filter.belief_dim}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_eval(args: argparse.Namespace, obs: str) -> dict:
    from envs.two_drawers import EnvConfig
    from lightning_modules.evaluation.runner import TrialRunner

    if obs == "state":  # the quickstart filter (configs/filter_quickstart.yaml)
        model = make_model(args, ("state",), stoch=16, deter=64)
    else:  # paper-sized filter on 64 px
        model = make_model(args, ("pixels",), stoch=64, deter=256)
    model = model.to(args.device).eval()
    t0 = time.perf_counter()
    runner = TrialRunner(EnvConfig(obs_mode=obs, image_size=64, episode_length=40), num_envs=args.eval_trials)
    build = time.perf_counter() - t0
    try:
        result = runner.run(model.filter, model.act, trials=args.eval_trials, episodes=3, seed=0)
    finally:
        runner.close()
    s = result.summary
    return {"obs": obs, "episodes_s": s["episodes_per_second"], "env_build_s": build, "trials": args.eval_trials,
            "episodes_s_incl_build": s["trials"] * 3 / (s["seconds"] + build)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--stoch-dim", type=int, default=64)
    p.add_argument("--deter-dim", type=int, default=448)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-random", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the whole update")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. reduce-overhead, max-autotune)")
    p.add_argument("--cudagraph", action="store_true", help="also tensordict.nn.CudaGraphModule (CUDA only)")
    p.add_argument("--eval-trials", type=int, default=20, help="0 skips the evaluation benchmark")
    p.add_argument("--no-eval-pixels", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = ["eager"] + (["compile"] if args.compile else [])
    if args.cudagraph and device.type == "cuda":
        modes += ["cudagraph"] + (["compile+cudagraph"] if args.compile else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}"
    print(f"# CQL updates ({name}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch "
          f"{args.batch_size}, hidden {args.hidden_dim}, num_random {args.num_random})\n")
    print("| mode | belief dim | updates/s | ms/update | warm-up s |")
    print("|---|---|---|---|---|")
    for mode in modes:
        try:
            r = bench_updates(args, mode)
            print(f"| {mode} | {r['belief_dim']} | {r['updates_s']:.1f} | {r['ms']:.2f} | {r['warmup_s']:.1f} |", flush=True)
        except Exception as err:  # noqa: BLE001 - report and go on
            msg = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            print(f"| {mode} | - | failed: {type(err).__name__}: {msg} | | |", flush=True)
    if args.eval_trials > 0:
        print(f"\n# Online evaluation ({args.eval_trials} envs in lockstep, 3 episodes x 40 steps per trial)\n")
        print("| observations | episodes/s | env build s | episodes/s incl. build |")
        print("|---|---|---|---|")
        for obs in ["state"] + ([] if args.no_eval_pixels else ["pixels"]):
            try:
                r = bench_eval(args, obs)
                print(f"| {obs} | {r['episodes_s']:.1f} | {r['env_build_s']:.1f} | {r['episodes_s_incl_build']:.1f} |",
                      flush=True)
            except Exception as err:  # noqa: BLE001
                print(f"| {obs} | failed: {type(err).__name__}: {str(err)[:120]} | | |", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
