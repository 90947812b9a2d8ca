"""Replay rendering for dataset generation (`cfgrl-generate --render-mode replay`).

Rollouts run physics only; FrameRecorder snapshots what the env's renderer would have drawn at each
observation (kinematic qpos, mocap poses, model colours), and BatchRenderer draws those states later,
many frames per offscreen buffer and one readback per batch. The images are the env's own, bit for
bit, for any batch size (tests/test_generate_dataset.py; training/bench_render.py measures it).
"""

import copy
import dataclasses
import math
import os

os.environ.setdefault('MUJOCO_GL', 'egl')  # before mujoco is first imported (in the classes below)

import numpy as np  # noqa: E402

FRAME_SIZE = 64  # OGBench's visual envs: 64x64 RGB
CAMERA = 'front_pixels'


class ReplayRenderError(RuntimeError):
    """The env's drawn state cannot be recovered for replay rendering."""


VISUAL_MODEL_FIELDS = ('geom_rgba', 'mat_rgba', 'site_rgba', 'site_pos')


@dataclasses.dataclass
class FrameState:
    """What the env's renderer reads at one observation: poses and the (shared, rarely changing) colours."""

    qpos: np.ndarray
    mocap_pos: np.ndarray
    mocap_quat: np.ndarray
    visuals: tuple


class FrameRecorder:
    """Snapshots the drawn state of a live env instead of rendering it."""

    def __init__(self, model):
        import mujoco

        self._scratch = mujoco.MjData(model)
        self._visuals = None

    def snapshot(self, model, data) -> FrameState:
        visuals = tuple(getattr(model, name) for name in VISUAL_MODEL_FIELDS)
        if self._visuals is None or not all(np.array_equal(a, b) for a, b in zip(visuals, self._visuals)):
            self._visuals = tuple(v.copy() for v in visuals)
        qpos = self._drawn_qpos(model, data)
        return FrameState(qpos, data.mocap_pos.copy(), data.mocap_quat.copy(), self._visuals)

    def _drawn_qpos(self, model, data) -> np.ndarray:
        """The qpos whose kinematics data holds now.

        Envs render right after mj_step, whose kinematics predate its last integration: unless the env ran
        mj_forward afterwards (scene and puzzle do, cube does not), the drawn pose is one physics step
        behind data.qpos. Integrating back by one step recovers it; we check the kinematics match.
        """
        import mujoco

        behind = data.qpos.copy()
        mujoco.mj_integratePos(model, behind, data.qvel, -model.opt.timestep)
        for candidate in (data.qpos, behind):
            self._scratch.qpos[:] = candidate
            self._scratch.mocap_pos[:] = data.mocap_pos
            self._scratch.mocap_quat[:] = data.mocap_quat
            mujoco.mj_kinematics(model, self._scratch)
            if np.allclose(self._scratch.xpos, data.xpos, rtol=0, atol=1e-9) and np.allclose(
                self._scratch.xquat, data.xquat, rtol=0, atol=1e-9
            ):
                return candidate.copy()
        raise ReplayRenderError('the env drew a state that is neither its qpos nor one step behind; use --render-mode env')


class BatchRenderer:
    """Renders frames one by one where the env draws them, copies each into a tile of an offscreen atlas, and
    reads the atlas back once per batch instead of once per frame.

    Every frame is drawn at the buffer's origin, as the env's renderer draws it: drawing straight into tiles
    away from the origin changed pixels (with llvmpipe: up to 45 levels, growing with the tile's distance).
    The copy is a sample-for-sample blit inside the multisampled buffer, so the images stay the env's own.
    Layout: row 0 of 64-pixel rows is where frames are drawn, rows 1..tiles hold the tiles.
    """

    def __init__(self, model, shadow_size: int, tiles_per_side: int, camera: str = CAMERA):
        import mujoco
        from OpenGL import GL  # PyOpenGL, a MuJoCo dependency; the blit has no MuJoCo API

        self._mj, self._gl_api = mujoco, GL
        self.model = copy.deepcopy(model)  # its colours are overwritten per frame; the env's model stays intact
        self.tiles = tiles_per_side
        width, height = FRAME_SIZE * tiles_per_side, FRAME_SIZE * (tiles_per_side + 1)
        self.model.vis.global_.offwidth = width
        self.model.vis.global_.offheight = height
        self.model.vis.quality.shadowsize = shadow_size
        self.data = mujoco.MjData(self.model)
        self._gl = mujoco.GLContext(width, height)
        self._gl.make_current()
        self._context = mujoco.MjrContext(self.model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._scene = mujoco.MjvScene(self.model, maxgeom=10000)
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = self.model.camera(camera).id
        self._atlas = np.empty((height - FRAME_SIZE, width, 3), dtype=np.uint8)
        self._visuals = None

    @property
    def batch_size(self) -> int:
        return self.tiles * self.tiles

    def render(self, frames: list[FrameState], out: np.ndarray) -> None:
        """Render up to batch_size frames into out (n, 64, 64, 3)."""
        mj = self._mj
        self._gl.make_current()
        origin = mj.MjrRect(0, 0, FRAME_SIZE, FRAME_SIZE)
        for k, frame in enumerate(frames):
            self._apply(frame)
            mj.mjv_updateScene(
                self.model, self.data, self._option, None, self._camera, mj.mjtCatBit.mjCAT_ALL, self._scene
            )
            mj.mjr_render(origin, self._scene, self._context)
            self._copy_to_tile(k)
        rows_used = math.ceil(len(frames) / self.tiles)
        region = self._atlas[: rows_used * FRAME_SIZE]
        rect = mj.MjrRect(0, FRAME_SIZE, self.tiles * FRAME_SIZE, rows_used * FRAME_SIZE)
        mj.mjr_readPixels(region, None, rect, self._context)
        for k in range(len(frames)):  # GL rows run bottom-up
            row, col = divmod(k, self.tiles)
            tile = region[row * FRAME_SIZE : (row + 1) * FRAME_SIZE, col * FRAME_SIZE : (col + 1) * FRAME_SIZE]
            out[k] = tile[::-1]

    def _copy_to_tile(self, k: int) -> None:
        """Blit the frame just drawn at the origin into tile k (all samples; the scissor box would clip it)."""
        GL = self._gl_api
        row, col = divmod(k, self.tiles)
        x, y = col * FRAME_SIZE, (row + 1) * FRAME_SIZE
        while GL.glGetError() != GL.GL_NO_ERROR:  # MuJoCo's drawing leaves GL_INVALID_VALUE set; PyOpenGL
            pass  # would pin it on our next call. Errors of the calls below still raise.
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, self._context.offFBO)
        GL.glBindFramebuffer(GL.GL_DRAW_FRAMEBUFFER, self._context.offFBO)
        GL.glDisable(GL.GL_SCISSOR_TEST)
        GL.glBlitFramebuffer(0, 0, FRAME_SIZE, FRAME_SIZE, x, y, x + FRAME_SIZE, y + FRAME_SIZE,
                             GL.GL_COLOR_BUFFER_BIT, GL.GL_NEAREST)

    def _apply(self, frame: FrameState) -> None:
        if frame.visuals is not self._visuals:
            for name, value in zip(VISUAL_MODEL_FIELDS, frame.visuals):
                getattr(self.model, name)[:] = value
            self._visuals = frame.visuals
        self.data.qpos[:] = frame.qpos
        self.data.mocap_pos[:] = frame.mocap_pos
        self.data.mocap_quat[:] = frame.mocap_quat
        self._mj.mj_kinematics(self.model, self.data)
        self._mj.mj_camlight(self.model, self.data)

    def close(self) -> None:
        self._context.free()
        self._gl.free()
