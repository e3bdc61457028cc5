"""The ``lightning`` command: it starts, lists the subcommands and selects headless EGL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from helpers import lightning_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """Subprocess environment that can import the repo's packages even when it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run(command: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_help():
    result = run(lightning_command(), "--help")
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_fit_help_from_python_selects_egl():
    """``main()`` from Python (no console script needed); importing the CLI defaults MUJOCO_GL to egl."""
    env = _env()
    env.pop("MUJOCO_GL", None)
    env.pop("PYOPENGL_PLATFORM", None)
    code = (
        "import os, sys\n"
        "from lightning_modules.cli import main\n"
        "assert os.environ['MUJOCO_GL'] == 'egl' and os.environ['PYOPENGL_PLATFORM'] == 'egl', os.environ\n"
        "sys.argv = ['lightning', 'fit', '--help']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--data", "--trainer", "--config"):
        assert option in result.stdout
