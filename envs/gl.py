"""Select headless EGL rendering before MuJoCo is imported (works with Mesa on CPU and NVIDIA EGL)."""

import os


def select_headless_gl() -> None:
    """Default ``MUJOCO_GL`` (and PyOpenGL's platform) to EGL unless the user chose otherwise."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
