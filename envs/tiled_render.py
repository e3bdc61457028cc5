"""Render many MuJoCo scenes as tiles of ONE offscreen buffer: one draw pass, one read-back.

``mujoco.Renderer`` renders one scene, then reads it back with ``glReadPixels``; every read-back is a
pipeline stall, and on a GPU it dominates (measured on an H100 with NVIDIA EGL on a similar scene:
~240 frames/s per process with one ``Renderer`` per env, against ~2,000 frames/s with 64 envs drawn as
tiles). :class:`TiledRenderer` owns one GL context and one ``MjrContext`` whose offscreen buffer holds a grid
of ``num_envs`` tiles; :meth:`TiledRenderer.render` draws every env's scene into its own viewport with
``mjr_render`` and then reads the whole grid back with a single ``mjr_readPixels``.

The frames equal those of ``mujoco.Renderer`` for the same model, data and camera (same default
``MjvOption``, same fixed camera, same projection: the projection depends on the viewport's aspect ratio only,
and a tile is offset by a whole number of pixels, so the rasteriser covers the same pixels). On Mesa llvmpipe
they are identical or differ by 1 grey level on about 0.1% of the values (position-dependent rounding); the
tolerance (<= 1% of values differ, mean absolute difference <= 0.5) is documented in ``tests/envs/test_tiled_render.py``.

Every MjData passed to :meth:`TiledRenderer.render` must belong to the renderer's model or to an identical copy
(each ``SawyerTwoDrawersEnv`` compiles its own, identical, model): meshes, textures and colours are taken from
the renderer's model.

If the grid does not fit into the GL's maximum renderbuffer / viewport size (or ``max_buffer_size``), the
tiles are drawn in several passes over the same buffer, with one read-back per pass.

GL resources are freed by :meth:`TiledRenderer.close`, or else when the renderer is garbage-collected or the
interpreter exits (``weakref.finalize`` plus an ``atexit`` hook that runs before MuJoCo's EGL display is
terminated, so nothing is printed at shutdown).
"""

from __future__ import annotations

import atexit
import math
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from envs.gl import select_headless_gl

select_headless_gl()

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["TiledRenderer", "TileLayout", "plan_layout"]


@dataclass(frozen=True)
class TileLayout:
    """How ``num_envs`` tiles of ``width x height`` pixels are placed: ``cols x rows`` tiles per pass."""

    num_envs: int
    width: int
    height: int
    cols: int
    rows: int

    @property
    def tiles_per_pass(self) -> int:
        """Tiles drawn before each read-back."""
        return self.cols * self.rows

    @property
    def passes(self) -> int:
        """Draw + read-back passes per :meth:`TiledRenderer.render` call."""
        return math.ceil(self.num_envs / self.tiles_per_pass)

    @property
    def buffer_width(self) -> int:
        """Offscreen buffer width in pixels."""
        return self.cols * self.width

    @property
    def buffer_height(self) -> int:
        """Offscreen buffer height in pixels."""
        return self.rows * self.height


def plan_layout(num_envs: int, width: int, height: int, max_width: int, max_height: int) -> TileLayout:
    """A near-square grid of ``num_envs`` tiles fitting into ``max_width x max_height`` (several passes if needed)."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be >= 1, got {width}x{height}")
    if width > max_width or height > max_height:
        raise ValueError(f"a {width}x{height} tile does not fit into the maximum buffer {max_width}x{max_height}")
    max_cols, max_rows = max_width // width, max_height // height
    cols = min(max_cols, math.ceil(math.sqrt(num_envs)))
    rows = min(max_rows, math.ceil(num_envs / cols))
    if cols * rows >= num_envs:  # single pass: shrink the grid to the fewest columns that still fit
        cols = math.ceil(num_envs / rows)
    return TileLayout(num_envs=num_envs, width=width, height=height, cols=cols, rows=rows)


def _gl_limits() -> tuple[int, int]:
    """``(max width, max height)`` of a renderbuffer and viewport in the current GL context."""
    from OpenGL import GL  # PyOpenGL is a dependency of mujoco's EGL / OSMesa / GLFW contexts

    max_rb = int(GL.glGetIntegerv(GL.GL_MAX_RENDERBUFFER_SIZE))
    dims = np.asarray(GL.glGetIntegerv(GL.GL_MAX_VIEWPORT_DIMS)).reshape(-1)
    return min(max_rb, int(dims[0])), min(max_rb, int(dims[-1]))


def gl_info() -> dict[str, str]:
    """Vendor, renderer and version strings of the GL context that is current now (empty if unavailable)."""
    try:
        from OpenGL import GL

        return {
            name: (GL.glGetString(getattr(GL, f"GL_{name.upper()}")) or b"").decode(errors="replace")
            for name in ("vendor", "renderer", "version")
        }
    except Exception:  # noqa: BLE001 - purely informational
        return {}


def _release(gl_context: Any, mjr_context: mujoco.MjrContext) -> None:
    """Free the MjrContext (with its GL context current), then the GL context. Never raises."""
    try:
        if gl_context is not None:
            gl_context.make_current()
        mjr_context.free()
    except Exception:  # noqa: BLE001 - best effort at teardown
        pass
    try:
        if gl_context is not None:
            gl_context.free()
    except Exception:  # noqa: BLE001
        # e.g. the EGL display is already terminated: drop the handle so GLContext.__del__ does not retry (and print).
        if hasattr(gl_context, "_context"):
            gl_context._context = None


class TiledRenderer:
    """Render ``num_envs`` MjData of one model from one camera as tiles of a single offscreen buffer.

    Args:
        model: the MjModel every rendered MjData belongs to. Its ``vis.global_.offwidth/offheight`` are set to
            the tile grid's size only while the MjrContext is created, then restored.
        image_size: tile side in pixels (an int for square tiles, or ``(height, width)``).
        num_envs: how many MjData :meth:`render` takes per call.
        camera: camera name or id (``-1``: MuJoCo's default free camera), as in ``mujoco.Renderer.update_scene``.
        max_geom: capacity of the (reused) ``MjvScene``, as in ``mujoco.Renderer``.
        max_buffer_size: upper bound on the offscreen buffer's width and height in pixels (besides the GL limit);
            if the grid does not fit, tiles are drawn in several passes.
        scene_option: visualisation options (defaults to ``mujoco.MjvOption()``, like ``mujoco.Renderer``).
    """

    def __init__(
        self,
        model: mujoco.MjModel,
        image_size: int | tuple[int, int],
        num_envs: int,
        camera: str | int = "scene",
        max_geom: int = 10000,
        max_buffer_size: int = 8192,
        scene_option: mujoco.MjvOption | None = None,
    ) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
        height, width = int(height), int(width)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if height < 1 or width < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self._model = model
        self._num_envs = int(num_envs)
        self._camera = self._make_camera(model, camera)
        self._option = scene_option if scene_option is not None else mujoco.MjvOption()
        self._scene = mujoco.MjvScene(model, maxgeom=max_geom)

        gl_context_cls = mujoco.gl_context.GLContext
        # GLContext size matters for OSMesa / GLFW only (EGL renders into the MjrContext's FBO, not a surface).
        self._gl_context = gl_context_cls(max_buffer_size, max_buffer_size) if gl_context_cls is not None else None
        self._mjr_context: mujoco.MjrContext | None = None
        try:
            if self._gl_context is not None:
                self._gl_context.make_current()
            gl_w, gl_h = _gl_limits()
            self._layout = plan_layout(
                self._num_envs, width, height, min(gl_w, max_buffer_size), min(gl_h, max_buffer_size)
            )
            vis = model.vis.global_
            saved = (vis.offwidth, vis.offheight)
            vis.offwidth, vis.offheight = self._layout.buffer_width, self._layout.buffer_height
            try:
                self._mjr_context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150.value)
            finally:
                vis.offwidth, vis.offheight = saved
            mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN.value, self._mjr_context)
        except BaseException:
            if self._mjr_context is not None:
                _release(self._gl_context, self._mjr_context)
            elif self._gl_context is not None:
                self._gl_context.free()
            raise
        self._gl_info = gl_info()
        # The finalizer holds the GL objects, never ``self``. The atexit hook is registered after MuJoCo's EGL
        # module registered ``eglTerminate`` (at its first context), so it runs first (atexit is LIFO).
        self._finalizer = weakref.finalize(self, _release, self._gl_context, self._mjr_context)
        atexit.register(self._finalizer)

        lay = self._layout
        self._viewports = [
            mujoco.MjrRect((k % lay.cols) * width, (k // lay.cols) * height, width, height)
            for k in range(lay.tiles_per_pass)
        ]
        self._buffer = np.empty((lay.buffer_height, lay.buffer_width, 3), dtype=np.uint8)

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> mujoco.MjModel:
        """The model this renderer was built for."""
        return self._model

    @property
    def num_envs(self) -> int:
        """Number of MjData per :meth:`render` call."""
        return self._num_envs

    @property
    def height(self) -> int:
        """Tile height in pixels."""
        return self._layout.height

    @property
    def width(self) -> int:
        """Tile width in pixels."""
        return self._layout.width

    @property
    def layout(self) -> TileLayout:
        """The tile grid (columns, rows, passes, buffer size)."""
        return self._layout

    @property
    def gl_info(self) -> dict[str, str]:
        """GL vendor / renderer / version strings of this renderer's context."""
        return dict(self._gl_info)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the resources were otherwise released)."""
        return not self._finalizer.alive

    # ------------------------------------------------------------------ rendering
    def render(self, datas: Sequence[mujoco.MjData], out: np.ndarray | None = None) -> np.ndarray:
        """Render one RGB frame per MjData, in order.

        Args:
            datas: exactly ``num_envs`` MjData of :attr:`model` (``mj_forward``/``mj_step`` already run on them).
            out: optional uint8 array ``[num_envs, H, W, 3]`` to write into (e.g. a slice of a dataset buffer).

        Returns:
            uint8 array ``[num_envs, H, W, 3]``, rows top-down (the orientation of ``mujoco.Renderer.render``).
        """
        if self.closed:
            raise RuntimeError("TiledRenderer.render() called after close(); create a new TiledRenderer")
        if len(datas) != self._num_envs:
            raise ValueError(f"expected {self._num_envs} MjData (num_envs), got {len(datas)}")
        lay = self._layout
        shape = (self._num_envs, lay.height, lay.width, 3)
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 with shape {shape}, got {out.dtype} {out.shape}")

        if self._gl_context is not None:
            self._gl_context.make_current()  # another renderer in this thread may have switched contexts
        con = self._mjr_context
        for start in range(0, self._num_envs, lay.tiles_per_pass):
            batch = datas[start : start + lay.tiles_per_pass]
            for k, data in enumerate(batch):
                mujoco.mjv_updateScene(
                    self._model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL.value, self._scene
                )
                mujoco.mjr_render(self._viewports[k], self._scene, con)
            used_rows = math.ceil(len(batch) / lay.cols)
            region = self._buffer[: used_rows * lay.height]  # contiguous: whole rows of the buffer
            mujoco.mjr_readPixels(region, None, mujoco.MjrRect(0, 0, lay.buffer_width, used_rows * lay.height), con)
            # region is bottom-up; tile (row r, col c) holds env r * cols + c, itself bottom-up.
            tiles = region.reshape(used_rows, lay.height, lay.cols, lay.width, 3).transpose(0, 2, 1, 3, 4)
            tiles = tiles.reshape(used_rows * lay.cols, lay.height, lay.width, 3)[: len(batch), ::-1]
            out[start : start + len(batch)] = tiles
        return out

    def close(self) -> None:
        """Free the GL context and the MjrContext. Idempotent; :meth:`render` raises afterwards."""
        if self._finalizer.alive:
            self._finalizer()
        atexit.unregister(self._finalizer)
        self._mjr_context = None
        self._gl_context = None

    def __enter__(self) -> "TiledRenderer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _make_camera(model: mujoco.MjModel, camera: str | int) -> mujoco.MjvCamera:
        """The ``MjvCamera`` ``mujoco.Renderer.update_scene`` would build for ``camera``."""
        camera_id = camera
        if isinstance(camera, str):
            camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA.value, camera)
            if camera_id == -1:
                raise ValueError(f'The camera "{camera}" does not exist.')
        if not -1 <= camera_id < model.ncam:
            raise ValueError(f"The camera id {camera_id} is out of range [-1, {model.ncam}).")
        cam = mujoco.MjvCamera()
        if camera_id == -1:
            cam.type = mujoco.mjtCamera.mjCAMERA_FREE
            mujoco.mjv_defaultFreeCamera(model, cam)
        else:
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = camera_id
        return cam
