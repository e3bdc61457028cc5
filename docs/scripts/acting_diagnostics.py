"""Diagnostic (docs/RESULTS.md, "From pixels"): one phase-2 checkpoint acted on the same fresh trials in other ways.

    python docs/scripts/acting_diagnostics.py CHECKPOINT [--trials 50] [--seed 1000] [--gains 1.5 2.0] [--episodes E]

Rows: the shipped acting (Polyak-averaged actor, deterministic tanh(loc)), sampled actions, the online actor, and
the deterministic actions scaled by each gain (hand x, y, z; then clipped). Prints success per episode, the share of
episodes that open no drawer and the mean |action| of the hand; then, for the shipped acting (state observations),
where the hand is at its deepest reach in the episodes that open no drawer, beside the drawers' x positions.
Not a way to report a model: it changes how the final model acts.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from lightning_modules.cql.module import LatentCQLModule  # noqa: E402
from lightning_modules.evaluation.runner import run_trials  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--gains", type=float, nargs="*", default=[1.5, 2.0])
    p.add_argument("--episodes", type=int, default=None, help="episodes per trial (default: N + 1 for N drawers)")
    args = p.parse_args()
    model = LatentCQLModule.load_phase2(args.checkpoint)
    if args.episodes is None:
        from lightning_modules.evaluation.protocol import default_episodes

        args.episodes = default_episodes(int((model.env_config or {}).get("num_drawers", 2)))
    polyak = model.acting_actor

    def online(beliefs: torch.Tensor) -> torch.Tensor:
        model.acting_actor = None
        try:
            return model.act(beliefs, True)
        finally:
            model.acting_actor = polyak

    variants = {"shipped (Polyak actor, deterministic)": lambda b: model.act(b, True),
                "sampled actions": lambda b: model.act(b, False),
                "online actor, deterministic": online}
    for gain in args.gains:
        scale = torch.tensor([gain, gain, gain, 1.0])
        variants[f"deterministic x {gain} (clipped)"] = lambda b, s=scale: (model.act(b, True) * s).clamp(-1.0, 1.0)
    columns = " | ".join(f"episode {k + 1}" for k in range(args.episodes))
    print(f"| acting | {columns} | no drawer opened | mean hand abs(action) |\n|---|{'---:|' * (args.episodes + 2)}")
    shipped = None
    for name, act in variants.items():
        wrapped = types.SimpleNamespace(filter=model.filter, act=act, env_config=model.env_config)
        result = run_trials(wrapped, trials=args.trials, episodes=args.episodes, seed=args.seed, record=True)
        rates = " | ".join(f"{r:.2f}" for r in result.summary["success_per_episode"])
        size = result.recorded["action"][..., :3].abs().mean().item()
        opened = [o for t in result.trials for o in t["opened"]]
        print(f"| {name} | {rates} | {opened.count(-1) / len(opened):.2f} | {size:.3f} |", flush=True)
        if name.startswith("shipped") and "state" in result.recorded.keys():
            shipped = result
    if shipped is not None:
        print_empty_reaches(shipped, args.episodes, model.env_config or {})


def print_empty_reaches(result, episodes: int, env_config: dict) -> None:
    """Hand x at the deepest reach (largest y) of each episode that opens no drawer, against the drawers' x."""
    from envs.scene import SceneConfig

    state = result.recorded["state"]
    T = state.shape[1] // episodes
    xs = []
    for i, trial in enumerate(result.trials):
        for e, opened in enumerate(trial["opened"]):
            if opened == -1:
                hand = state[i, e * T:(e + 1) * T, :3]
                xs.append(hand[hand[:, 1].argmax(), 0].item())
    drawers = SceneConfig.for_drawers(int(env_config.get("num_drawers", 2))).drawer_x
    print(f"\nepisodes that open no drawer: {len(xs)}; hand x at the deepest reach: "
          + (f"mean {sum(xs) / len(xs):+.3f}, range [{min(xs):+.3f}, {max(xs):+.3f}]" if xs else "-")
          + f"; drawers at x = {list(drawers)}")


if __name__ == "__main__":
    main()
