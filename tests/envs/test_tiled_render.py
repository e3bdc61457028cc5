"""``TiledRenderer`` frames equal ``mujoco.Renderer`` frames (same model, data, camera), in several passes too.

Tolerance: the tiles are drawn at whole-pixel offsets with the same projection, so the frames should be
identical; a rasteriser may still resolve a few edge pixels differently depending on where in the buffer a
triangle lies (Mesa llvmpipe: at most a handful of pixels off by 1 grey level at 32 px). We accept at most 1% of
the values differing and a mean absolute difference below 0.5 grey levels, which catches any wrong tile order,
flip, camera or aspect ratio (those change the mean difference by several grey levels, see the last assertion).
"""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from envs.scene import SCENE_CAMERA
from envs.tiled_render import TiledRenderer, plan_layout
from envs.two_drawers import SawyerTwoDrawersEnv

SIZE = 32
MAX_DIFFERING_FRACTION = 0.01
MAX_MEAN_ABS_DIFF = 0.5


def _assert_close(reference: np.ndarray, frame: np.ndarray) -> None:
    diff = np.abs(reference.astype(np.int16) - frame.astype(np.int16))
    assert (diff > 0).mean() <= MAX_DIFFERING_FRACTION, f"{(diff > 0).mean():.4f} of the values differ"
    assert diff.mean() <= MAX_MEAN_ABS_DIFF, f"mean abs difference {diff.mean():.3f}"


@pytest.fixture(scope="module")
def scenes():
    """Three envs in different states: hand moved differently, left / right / no drawer pulled open."""
    envs = [SawyerTwoDrawersEnv(obs_mode="state", image_size=SIZE) for _ in range(3)]
    moves = [np.array([-1.0, -0.5, 0.5, 1.0]), np.array([1.0, 0.0, -0.5, -1.0]), np.array([0.0, -1.0, 0.2, 1.0])]
    openings = [(0.12, 0.0), (0.0, 0.10), (0.0, 0.0)]
    for i, env in enumerate(envs):
        env.reset(seed=i, options={"task": i % 2})
        for _ in range(4 + 4 * i):
            env.step(moves[i])
        env.data.qpos[env._slides] = -np.asarray(openings[i])  # pull the drawers out (slide joints are negative)
        mujoco.mj_forward(env.model, env.data)
    references = np.stack([env.render() for env in envs])  # mujoco.Renderer, one per env
    yield envs, references
    for env in envs:
        env.close()


def test_tiles_match_mujoco_renderer(scenes):
    envs, references = scenes
    with TiledRenderer(envs[0].model, SIZE, len(envs), camera=SCENE_CAMERA) as renderer:
        frames = renderer.render([env.data for env in envs])
    assert frames.shape == (3, SIZE, SIZE, 3) and frames.dtype == np.uint8
    for reference, frame in zip(references, frames):
        _assert_close(reference, frame)
    # the three states really look different, so a swapped or repeated tile would fail the check above
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert np.abs(references[i].astype(np.int16) - references[j]).mean() > 5 * MAX_MEAN_ABS_DIFF


def test_several_passes_and_out_argument(scenes):
    envs, references = scenes
    order = [0, 1, 2, 1, 0]
    datas = [envs[i].data for i in order]
    # a 64 x 64 px buffer holds 2 x 2 tiles: 5 envs need 2 passes, the second one partial
    with TiledRenderer(envs[0].model, SIZE, len(datas), max_buffer_size=2 * SIZE) as renderer:
        assert renderer.layout.passes == 2
        out = np.zeros((len(datas), SIZE, SIZE, 3), np.uint8)
        assert renderer.render(datas, out=out) is out
    for i, frame in zip(order, out):
        _assert_close(references[i], frame)
    # one tile per pass
    with TiledRenderer(envs[0].model, SIZE, 3, max_buffer_size=SIZE + SIZE // 2) as renderer:
        assert renderer.layout.passes == 3
        frames = renderer.render([env.data for env in envs])
    for reference, frame in zip(references, frames):
        _assert_close(reference, frame)


def test_rectangular_tiles(scenes):
    envs, _ = scenes
    with TiledRenderer(envs[0].model, (24, 40), 3) as renderer:
        frames = renderer.render([env.data for env in envs])
    with mujoco.Renderer(envs[0].model, 24, 40) as reference_renderer:
        for env, frame in zip(envs, frames):
            reference_renderer.update_scene(env.data, camera=SCENE_CAMERA)
            _assert_close(reference_renderer.render(), frame)


def test_wrong_number_of_datas_and_out_shape(scenes):
    envs, _ = scenes
    with TiledRenderer(envs[0].model, SIZE, 3) as renderer:
        with pytest.raises(ValueError, match="expected 3 MjData"):
            renderer.render([env.data for env in envs[:2]])
        with pytest.raises(ValueError, match="out must be uint8"):
            renderer.render([env.data for env in envs], out=np.zeros((3, SIZE, SIZE, 4), np.uint8))


def test_close_then_render_raises(scenes):
    envs, _ = scenes
    renderer = TiledRenderer(envs[0].model, SIZE, 1)
    renderer.render([envs[0].data])
    renderer.close()
    renderer.close()  # idempotent
    assert renderer.closed
    with pytest.raises(RuntimeError, match="after close"):
        renderer.render([envs[0].data])


def test_bad_arguments(scenes):
    envs, _ = scenes
    model = envs[0].model
    with pytest.raises(ValueError, match="does not exist"):
        TiledRenderer(model, SIZE, 1, camera="nope")
    with pytest.raises(ValueError, match="num_envs"):
        TiledRenderer(model, SIZE, 0)
    offwidth = model.vis.global_.offwidth
    with TiledRenderer(model, SIZE, 64):
        pass
    assert model.vis.global_.offwidth == offwidth  # the model's buffer size is restored


def test_plan_layout():
    lay = plan_layout(64, 64, 64, 16384, 16384)
    assert (lay.cols, lay.rows, lay.passes, lay.buffer_width) == (8, 8, 1, 512)
    lay = plan_layout(10, 64, 64, 128, 128)
    assert (lay.tiles_per_pass, lay.passes) == (4, 3)
    with pytest.raises(ValueError):
        plan_layout(1, 256, 256, 128, 128)


def test_antialiased_tiles_match_mujoco_renderer():
    """``EnvConfig.antialias``: MSAA frames differ from aliased ones (edges blend) and tiles still match the Renderer."""
    envs = [SawyerTwoDrawersEnv(obs_mode="state", image_size=SIZE, antialias=aa) for aa in (False, True, True)]
    try:
        for i, env in enumerate(envs):
            env.reset(seed=0)
            env.step(np.array([0.3, 0.0, 0.0, 0.0]) if i == 2 else np.zeros(4))
        aliased, smooth, moved = (env.render() for env in envs)
        assert envs[1].config.to_dict()["antialias"] is True and "antialias" not in envs[0].config.to_dict()
        assert (aliased != smooth).any(-1).mean() > 0.02  # the edges of every object are blended
        with TiledRenderer(envs[1].model, SIZE, 2, camera=SCENE_CAMERA) as renderer:
            frames = renderer.render([envs[1].data, envs[2].data])
        _assert_close(smooth, frames[0])
        _assert_close(moved, frames[1])
    finally:
        for env in envs:
            env.close()
