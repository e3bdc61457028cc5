"""Running the pipeline's stages: one after another, or the seeds side by side in lanes (``--jobs N``).

On a small CPU machine, N single-threaded trainings side by side get more done than one training on N threads: the
recurrent filter steps through its sequence one time step at a time and the critics are small, so a second thread
adds little to one training. ``--jobs N`` runs each seed's chain of stages (phase 1, then each method's phase 2
and final evaluation) in one of N lanes, each with ``cores // N`` torch threads (``OMP_NUM_THREADS``), its
commands' output appended to ``<out>/logs/seed_<k>.log``; stages without a seed (the data stage) run first, alone.
The stages and their results are the same as with ``--jobs 1``; only the threads per process and the order differ.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from envs.atomic import write_json_atomic

DONE = "DONE"            # written when a stage finished: its fingerprint and wall clock
STARTED = "STAGE.json"   # written when a stage starts: its fingerprint (an interrupted stage resumes only with it)
_print_lock = threading.Lock()


def pretty(argv: Sequence[str]) -> str:
    """A stage's command as a user would type it (``lightning ...``, ``python -m ...``)."""
    argv = list(argv)
    if argv[:3] == [sys.executable, "-m", "lightning_modules.cli"]:
        argv = ["lightning", *argv[3:]]
    elif argv[:2] == [sys.executable, "-m"]:
        argv = ["python", "-m", *argv[2:]]
    return shlex.join(argv)


def _say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def run_stage(stage: Any, env: dict[str, str] | None = None, log: Path | None = None) -> None:
    """Run one stage (resuming a training stage from its last.ckpt), then mark it done. ``env``: the command's
    environment (default: this one); ``log``: append its output there instead of this terminal.
    ``subprocess.CalledProcessError`` when the command fails."""
    argv = list(stage.argv)
    if stage.run_dir is not None and argv and argv[0] == sys.executable and "lightning_modules.cli" in argv:
        last = stage.run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            argv += ["--ckpt_path", str(last)]
    where = f" (output: {log})" if log is not None else ""
    _say(f"\n=== {stage.name}{where}\n$ {pretty(argv)}")
    start = time.time()
    if stage.run_dir is not None:
        write_json_atomic(stage.run_dir / STARTED, {"fingerprint": stage.fingerprint()})
    if log is None:
        subprocess.run(argv, check=True, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(f"\n=== {stage.name}\n$ {pretty(argv)}\n")
            handle.flush()
            subprocess.run(argv, check=True, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _say(f"=== {stage.name}: {time.time() - start:.0f} s")
    if stage.run_dir is not None:
        write_json_atomic(stage.run_dir / DONE, {"fingerprint": stage.fingerprint(), "seconds": round(time.time() - start, 1)})


def lanes_of(stages: Sequence[Any]) -> tuple[list[Any], dict[int, list[Any]]]:
    """The stages without a lane (run first, in order) and each lane's chain of stages, in plan order."""
    first = [s for s in stages if s.lane is None]
    chains: dict[int, list[Any]] = {}
    for stage in stages:
        if stage.lane is not None:
            chains.setdefault(stage.lane, []).append(stage)
    return first, chains


def lane_env(jobs: int) -> dict[str, str]:
    """The environment of a lane's commands: ``cores // jobs`` torch (OpenMP) threads, at least one."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_lanes(stages: Sequence[Any], jobs: int, logs: Path) -> list[str]:
    """Run the stages that are not done: the lane-less ones first, then the lanes ``jobs`` at a time. A failed
    stage stops its lane only; returns the failed stages' names (empty when everything finished)."""
    first, chains = lanes_of(stages)
    for stage in first:
        if stage.done():
            _say(f"=== {stage.name}: done already ({stage.run_dir})")
            continue
        try:
            run_stage(stage)
        except subprocess.CalledProcessError:
            return [stage.name]
    env = lane_env(jobs)
    _say(f"\n{len(chains)} lane(s), {jobs} at a time, {env['OMP_NUM_THREADS']} torch thread(s) each; output in {logs}")

    def run_chain(lane: int, chain: list[Any]) -> str | None:
        for stage in chain:
            if stage.done():
                _say(f"=== {stage.name}: done already ({stage.run_dir})")
                continue
            try:
                run_stage(stage, env=env, log=logs / f"seed_{lane}.log")
            except subprocess.CalledProcessError as err:
                _say(f"stage '{stage.name}' failed (exit {err.returncode}): see {logs / f'seed_{lane}.log'}")
                return stage.name
        return None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda item: run_chain(*item), chains.items()))
    return [name for name in results if name is not None]
