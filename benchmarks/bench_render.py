"""Frames/s of dataset collection (physics + rendering) on this machine, as a markdown table.

Every measurement runs in fresh ``spawn``-ed processes that step real ``SawyerTwoDrawersEnv`` physics with the
scripted drawer-opening policies (``action_repeat x frame_skip`` physics steps per agent step, episodes reset
every ``episode_length`` steps, as the collector does) and produce one frame per agent step or reset:

* ``physics only``: no rendering (the upper bound),
* ``mujoco.Renderer``: one ``mujoco.Renderer`` per env (``env.render()``), one env per process,
* ``TiledRenderer``: E envs per process drawn as tiles of one offscreen buffer, one read-back per call.

Each process first warms up (GL contexts, JIT, caches; not timed), then all processes of a measurement start
together (a barrier) and run for ``--seconds``. Aggregate frames/s = all frames / the longest process's time.

Usage (repo root)::

    MUJOCO_GL=egl python benchmarks/bench_render.py --image-size 64 --envs-per-process 8 16 64 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from envs.gl import select_headless_gl  # noqa: E402

select_headless_gl()  # before mujoco is imported, here and in every spawned child

MODES = ("physics", "renderer", "tiled")
_ENV_VARS = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID", "LP_NUM_THREADS", "GALLIUM_DRIVER")


# ---------------------------------------------------------------------------------------------- workers
def _worker(
    mode: str, image_size: int, num_envs: int, seconds: float, warmup: float, seed: int, barrier: Any, queue: Any,
    antialias: bool = False,
) -> None:
    """Run one process of a measurement and put a result dict (or an error string) on ``queue``."""
    try:
        queue.put(_measure(mode, image_size, num_envs, seconds, warmup, seed, barrier, antialias))
    except BaseException as exc:  # noqa: BLE001 - report to the parent instead of hanging the barrier
        barrier.abort()
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _measure(mode: str, image_size: int, num_envs: int, seconds: float, warmup: float, seed: int, barrier: Any,
             antialias: bool = False):
    import numpy as np

    from envs.scripted import DrawerOpener
    from envs.tiled_render import TiledRenderer
    from envs.two_drawers import SawyerTwoDrawersEnv

    envs = [SawyerTwoDrawersEnv(obs_mode="state", image_size=image_size, antialias=antialias) for _ in range(num_envs)]
    policies = [DrawerOpener(task=i % 2, seed=seed * 1000 + i) for i in range(num_envs)]
    done = [True] * num_envs
    tiled = TiledRenderer(envs[0].model, image_size, num_envs) if mode == "tiled" else None
    datas = [env.data for env in envs]
    frames_out = np.empty((num_envs, image_size, image_size, 3), np.uint8)
    episode = [0]

    def tick() -> float:
        """One agent step (or reset) of every env and one frame each; returns the seconds spent rendering."""
        for i, env in enumerate(envs):
            if done[i]:
                env.reset(seed=seed * 100_000 + episode[0] * num_envs + i, options={"task": policies[i].task})
                done[i] = False
            else:
                _, _, terminated, truncated, _ = env.step(policies[i](env))
                done[i] = terminated or truncated
        episode[0] += 1
        start = time.perf_counter()
        if mode == "renderer":
            for i, env in enumerate(envs):
                frames_out[i] = env.render()
        elif mode == "tiled":
            tiled.render(datas, out=frames_out)
        return time.perf_counter() - start

    try:
        end = time.perf_counter() + warmup
        tick()
        while time.perf_counter() < end:
            tick()
        info: dict[str, str] = {}
        if mode != "physics":
            from envs.tiled_render import gl_info

            info = tiled.gl_info if tiled is not None else gl_info()  # env.render() left its context current
        barrier.wait(timeout=600)
        ticks, render_s = 0, 0.0
        start = time.perf_counter()
        end = start + seconds
        while True:
            render_s += tick()
            ticks += 1
            now = time.perf_counter()
            if now >= end:
                break
        elapsed = now - start
        return {"frames": ticks * num_envs, "elapsed": elapsed, "render_s": render_s, "gl": info}
    finally:
        if tiled is not None:
            tiled.close()
        for env in envs:
            env.close()


def _probe_gl() -> dict[str, str]:
    """GL vendor / renderer / version of a fresh MuJoCo GL context (run in a child process)."""
    import mujoco

    from envs.tiled_render import gl_info

    if mujoco.gl_context.GLContext is None:
        return {}
    context = mujoco.gl_context.GLContext(64, 64)
    try:
        context.make_current()
        return gl_info()
    finally:
        context.free()


def _probe_worker(queue: Any) -> None:
    try:
        queue.put(_probe_gl())
    except BaseException as exc:  # noqa: BLE001
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


# ---------------------------------------------------------------------------------------------- driver
def run_measurement(
    ctx: Any, mode: str, processes: int, envs_per_process: int, image_size: int, seconds: float, warmup: float,
    antialias: bool = False,
) -> dict[str, Any]:
    """Run ``processes`` spawned workers together; aggregate their frames/s."""
    barrier = ctx.Barrier(processes)
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(mode, image_size, envs_per_process, seconds, warmup, rank + 1, barrier, queue, antialias),
            daemon=True,
        )
        for rank in range(processes)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0]}
    frames = sum(r["frames"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    render_share = sum(r["render_s"] for r in results) / sum(r["elapsed"] for r in results)
    return {
        "mode": mode,
        "processes": processes,
        "envs_per_process": envs_per_process,
        "frames": frames,
        "elapsed": elapsed,
        "fps": frames / elapsed,
        "fps_per_process": frames / elapsed / processes,
        "render_share": render_share,
        "gl": results[0].get("gl", {}),
    }


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def _label(mode: str) -> str:
    return {"physics": "physics only", "renderer": "mujoco.Renderer (1 env/process)", "tiled": "TiledRenderer"}[mode]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64, help="square frame side in pixels (default 64)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="P (default: os.cpu_count())")
    parser.add_argument(
        "--envs-per-process", type=int, nargs="+", default=[16], help="E for TiledRenderer, one or more (default 16)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed warm-up seconds per process (default 1)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to measure")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--antialias", action="store_true", help="render with EnvConfig.antialias (4x MSAA)")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.image_size < 8 or min(args.envs_per_process) < 1 or args.seconds <= 0:
        parser.error("--processes >= 1, --image-size >= 8, --envs-per-process >= 1 and --seconds > 0 are required")

    ctx = mp.get_context("spawn")
    probe_queue = ctx.Queue()
    probe = ctx.Process(target=_probe_worker, args=(probe_queue,), daemon=True)
    probe.start()
    gl = probe_queue.get()
    probe.join()

    import mujoco

    from envs.two_drawers import EnvConfig

    env_cfg = EnvConfig()
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (sys.argv[1:] if argv is None else argv)))
    env_vars = " ".join(f"{k}={os.environ[k]}" for k in _ENV_VARS if k in os.environ)
    print(f"command: `{env_vars} {command}`".replace("` ", "`"))
    print(
        f"machine: {platform.node()} | {platform.processor() or platform.machine()} | os.cpu_count()={os.cpu_count()}"
        f" | Python {platform.python_version()} | mujoco {mujoco.__version__} | {_load()} at start"
    )
    if "error" in gl:
        print(f"GL: unavailable ({gl['error']})")
    else:
        print(f"GL: {gl.get('vendor', '?')} | {gl.get('renderer', '?')} | {gl.get('version', '?')}")
    print(
        f"env: {args.image_size} px{' anti-aliased' if args.antialias else ''}, action_repeat={env_cfg.action_repeat}"
        f" x frame_skip={env_cfg.frame_skip} physics"
        f" steps per frame, episode_length={env_cfg.episode_length} (+ reset), scripted DrawerOpener actions;"
        f" {args.seconds:g} s timed after {args.warmup:g} s warm-up per measurement"
    )
    print(flush=True)

    plan: list[tuple[str, int, int]] = []
    for mode in args.modes:
        sizes = args.envs_per_process if mode == "tiled" else [1]
        for envs_per_process in sizes:
            for processes in dict.fromkeys([1, args.processes]):
                plan.append((mode, processes, envs_per_process))

    header = "| measurement | processes | envs/process | frames/s (total) | frames/s per process | time rendering |"
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|", flush=True)
    results = []
    for mode, processes, envs_per_process in plan:
        res = run_measurement(ctx, mode, processes, envs_per_process, args.image_size, args.seconds, args.warmup,
                              args.antialias)
        if "error" in res:
            print(f"| {_label(mode)} | {processes} | {envs_per_process} | error: {res['error']} | | |", flush=True)
            results.append({"mode": mode, "processes": processes, "envs_per_process": envs_per_process, **res})
            continue
        share = "-" if mode == "physics" else f"{100 * res['render_share']:.0f}%"
        print(
            f"| {_label(mode)} | {processes} | {envs_per_process} | {res['fps']:,.0f} | {res['fps_per_process']:,.0f}"
            f" | {share} |",
            flush=True,
        )
        results.append(res)
    rendered = [r for r in results if r.get("mode") in ("renderer", "tiled") and "fps" in r]
    if rendered:
        best = max(rendered, key=lambda r: r["fps"])
        print(
            f"\nbest rendered: {best['fps']:,.0f} frames/s ({_label(best['mode'])}, {best['processes']} process(es)"
            f" x {best['envs_per_process']} env(s)); targets: >= 80 frames/s on 2 CPU cores, >= 8,000 on a GPU machine"
        )
    print(f"{_load()} at end (other processes on this machine skew the numbers)")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, "gl": gl, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
