"""Generate OGBench visual manipulation datasets locally (`cfgrl-generate`).

Same recipe as OGBench's data_gen_scripts/generate_manipspace.py: the package's own scripted oracles
(PlanOracle for 'play', MarkovOracle + Gaussian and random actions for 'noisy'), 1001-step episodes,
a new target whenever the oracle finishes, `num_episodes // 10` extra validation episodes. Output is
OGBench's file format (`<name>.npz`, `<name>-val.npz`) plus `oracle_reps` for `-oraclerep` training.

Workers write one shard per chunk of episodes (atomically), so an interrupted run resumes where it
stopped; a shard's seed depends only on (seed, shard index), so the output is byte-identical for a seed
whatever the worker count or interruptions. Shards are streamed into the two standard files, which are
then validated. The merge runs in a thread of the parent while the workers still produce, taking each
shard as soon as it and those before it exist, so it need not follow production (~4,400 rows/s on one core).

Rendering (`--render-mode`): 'env' renders each step inside the env, as OGBench does. 'replay' rolls
out physics only, records what the env's renderer would have drawn (kinematic qpos, mocap poses, model
colours), then renders those states in batches: many frames per GL call, one readback per batch.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import queue
import sys
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

os.environ.setdefault('MUJOCO_GL', 'egl')  # must precede the first mujoco import; respects a user's choice

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from training.oracle_goals import oracle_goal_dim, oracle_goals  # noqa: E402

FRAME_SIZE = 64
CAMERA = 'front_pixels'
DEFAULT_EPISODE_LENGTH = 1001  # OGBench: max_episode_steps=1001
PLAY_NOISE, PLAY_NOISE_SMOOTHING = 0.1, 0.5
MARKOV_MIN_NORM = 0.4
NOISY_MAX_ACTION_NOISE = 0.1  # per-episode noise scale xi ~ U(0, 0.1)


@dataclasses.dataclass(frozen=True)
class EnvInfo:
    env_id: str
    nq: int
    nv: int
    num_buttons: int  # 0: the env keeps no button states
    p_random_action_noisy: float  # OGBench's commands.sh: 0.1 for cube/scene, 0.2 for puzzle


ENVS = {
    'cube-single': EnvInfo('visual-cube-single-v0', nq=21, nv=20, num_buttons=0, p_random_action_noisy=0.1),
    'cube-double': EnvInfo('visual-cube-double-v0', nq=28, nv=26, num_buttons=0, p_random_action_noisy=0.1),
    'scene': EnvInfo('visual-scene-v0', nq=25, nv=24, num_buttons=2, p_random_action_noisy=0.1),
    'puzzle-3x3': EnvInfo('visual-puzzle-3x3-v0', nq=23, nv=23, num_buttons=9, p_random_action_noisy=0.2),
}
VARIANTS = ('play', 'noisy')
RENDER_MODES = ('env', 'replay')


class GenerationError(RuntimeError):
    """The run cannot proceed (bad settings, a shard directory made with other settings, ...)."""


class CorruptShardError(GenerationError):
    """A shard file is truncated, corrupt or does not match the run's settings."""


class DatasetValidationError(GenerationError):
    """A merged dataset file fails validation."""


class ReplayError(GenerationError):
    """The env's drawn state cannot be recovered for replay rendering."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Everything that determines the dataset's content (worker count and paths do not)."""

    env: str
    variant: str
    num_episodes: int = 1000
    num_val_episodes: int = 100
    episode_length: int = DEFAULT_EPISODE_LENGTH
    seed: int = 0
    shadow_size: int = 4096
    render_mode: str = 'env'
    render_tiles: int = 16  # replay: frames per GL readback = render_tiles**2; any value matches 'env' exactly
    shard_episodes: int = 10

    def __post_init__(self):
        if self.env not in ENVS:
            raise GenerationError(f'unknown env {self.env!r}; choose from {sorted(ENVS)}')
        if self.variant not in VARIANTS:
            raise GenerationError(f'unknown variant {self.variant!r}; choose from {VARIANTS}')
        if self.render_mode not in RENDER_MODES:
            raise GenerationError(f'unknown render mode {self.render_mode!r}; choose from {RENDER_MODES}')
        if self.num_episodes < 1 or self.num_val_episodes < 0:
            raise GenerationError('need num_episodes >= 1 and num_val_episodes >= 0')
        if min(self.episode_length - 1, self.shard_episodes, self.shadow_size, self.render_tiles) < 1:
            raise GenerationError('need episode_length >= 2 and shard_episodes, shadow_size, render_tiles >= 1')

    @property
    def dataset_name(self) -> str:
        return f'visual-{self.env}-{self.variant}-v0'

    @property
    def env_info(self) -> EnvInfo:
        return ENVS[self.env]


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int  # global: train shards first, then validation shards
    split: str  # 'train' or 'val'
    num_episodes: int

    @property
    def filename(self) -> str:
        return f'shard-{self.index:05d}-{self.split}.npz'


def plan_shards(cfg: GenerationConfig) -> list[Shard]:
    """Train episodes in chunks of shard_episodes, then validation episodes likewise."""
    shards = []
    for split, total in (('train', cfg.num_episodes), ('val', cfg.num_val_episodes)):
        for start in range(0, total, cfg.shard_episodes):
            shards.append(Shard(len(shards), split, min(cfg.shard_episodes, total - start)))
    return shards


def dataset_schema(cfg: GenerationConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row shape and dtype of every array, in file order (OGBench's keys plus oracle_reps)."""
    info = cfg.env_info
    schema = {
        'observations': ((FRAME_SIZE, FRAME_SIZE, 3), np.dtype(np.uint8)),
        'actions': ((5,), np.dtype(np.float32)),
        'terminals': ((), np.dtype(bool)),
        'qpos': ((info.nq,), np.dtype(np.float32)),
        'qvel': ((info.nv,), np.dtype(np.float32)),
    }
    if info.num_buttons:
        schema['button_states'] = ((info.num_buttons,), np.dtype(np.int64))
    schema['oracle_reps'] = ((oracle_goal_dim(cfg.env),), np.dtype(np.float32))
    return schema


# ----------------------------------------------------------------------------------------------------
# Environment and oracles, as OGBench's generator sets them up.


def make_env(cfg: GenerationConfig):
    # Known noise from dependencies: glfw has no display (we render with EGL), gymnasium casts OGBench's bounds.
    warnings.filterwarnings('ignore', message='.*DISPLAY environment variable is missing')
    warnings.filterwarnings('ignore', message='.*precision lowered by casting')
    import gymnasium

    import ogbench.manipspace  # noqa: F401  (registers the envs)

    return gymnasium.make(
        cfg.env_info.env_id,
        terminate_at_goal=False,
        mode='data_collection',
        max_episode_steps=cfg.episode_length,
        disable_env_checker=True,
    )


def make_oracles(env, cfg: GenerationConfig) -> dict:
    """The oracle per target task, with OGBench's generator settings."""
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
    from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    plan = dict(env=env, noise=PLAY_NOISE, noise_smoothing=PLAY_NOISE_SMOOTHING)
    markov = dict(env=env, min_norm=MARKOV_MIN_NORM)
    if cfg.env.startswith('cube-'):
        if cfg.variant == 'play':
            return {'cube': CubePlanOracle(**plan)}
        return {'cube': CubeMarkovOracle(**markov)}
    if cfg.env == 'scene':
        if cfg.variant == 'play':
            return {
                'cube': CubePlanOracle(**plan),
                'button': ButtonPlanOracle(**plan),
                'drawer': DrawerPlanOracle(**plan),
                'window': WindowPlanOracle(**plan),
            }
        return {
            'cube': CubeMarkovOracle(**markov, max_step=100),
            'button': ButtonMarkovOracle(**markov),
            'drawer': DrawerMarkovOracle(**markov),
            'window': WindowMarkovOracle(**markov),
        }
    if cfg.variant == 'play':
        return {'button': ButtonPlanOracle(**plan, gripper_always_closed=True)}
    return {'button': ButtonMarkovOracle(**markov, gripper_always_closed=True)}


def stack_probability(env: str, rng: np.random.Generator) -> float:
    """Per-episode probability of stacking a new cube target (OGBench's generator)."""
    if env == 'cube-single':
        return 0.0
    if env == 'cube-double':
        return rng.uniform(0.0, 0.25)
    return 0.5


def scene_episode_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's check: the cube stays visible (not too far right, not far left unless in the drawer)."""
    xyz = qpos[:, 14:17]
    too_far_right = (xyz[:, 1] >= 0.29).any()
    too_far_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_far_right or too_far_left)


@contextlib.contextmanager
def global_numpy_seed(seed: int):
    """OGBench's oracles draw from NumPy's global RNG: seed it for one shard, then restore it."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def shard_seeds(seed: int, shard_index: int) -> tuple[int, int, np.random.Generator]:
    """(env seed, oracle seed, own RNG) from (seed, shard index) only."""
    env_ss, oracle_ss, rng_ss = np.random.SeedSequence([seed, shard_index]).spawn(3)
    return int(env_ss.generate_state(1)[0]), int(oracle_ss.generate_state(1)[0]), np.random.default_rng(rng_ss)


# ----------------------------------------------------------------------------------------------------
# Replay rendering: record what the env would draw, render it later in batches.

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
        raise ReplayError('the env drew a state that is neither its qpos nor one step behind; use --render-mode env')


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


def set_env_shadow_size(env, shadow_size: int) -> None:
    """Set the shadow-map size of an env's own renderer (it is created at the first render)."""
    unwrapped = env.unwrapped
    if unwrapped.model.vis.quality.shadowsize == shadow_size:
        return
    unwrapped.model.vis.quality.shadowsize = shadow_size
    if unwrapped._renderer is not None:  # the GL context sized its shadow buffer at creation
        unwrapped._renderer.close()
        unwrapped._renderer = None


# ----------------------------------------------------------------------------------------------------
# One shard: rollouts with OGBench's loop, observations rendered by the env or replayed.


class ShardCollector:
    """Owns one env (and, for replay, one batch renderer) and produces shards with it."""

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.env = make_env(cfg)
        self.env.reset(seed=0)  # compiles the model; each shard reseeds the env
        unwrapped = self.env.unwrapped
        self.renderer = None
        if cfg.render_mode == 'replay':
            blank = np.zeros((FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
            unwrapped.get_pixel_observation = lambda: blank  # physics-only rollout: skip the env's render
            self.renderer = BatchRenderer(unwrapped.model, cfg.shadow_size, cfg.render_tiles)
        else:
            set_env_shadow_size(self.env, cfg.shadow_size)

    def collect(self, shard: Shard, report: Callable[[int], None]) -> tuple[dict[str, np.ndarray], int]:
        """Arrays for the shard's episodes, and the number of rejected (unhealthy) scene episodes."""
        env_seed, oracle_seed, rng = shard_seeds(self.cfg.seed, shard.index)
        replay = self.renderer is not None
        episodes, retries = [], 0
        with global_numpy_seed(oracle_seed):
            oracles = make_oracles(self.env, self.cfg)
            self.env.reset(seed=env_seed)
            while len(episodes) < shard.num_episodes:
                episode = self._episode(oracles, rng, report=None if replay else report)
                if self.cfg.env == 'scene' and not scene_episode_is_healthy(episode['qpos']):
                    retries += 1
                    if not replay:
                        report(-self.cfg.episode_length)
                    continue
                episodes.append(episode)
        arrays = {key: np.concatenate([ep[key] for ep in episodes]) for key in episodes[0] if key != 'frames'}
        if replay:
            arrays['observations'] = self._render([f for ep in episodes for f in ep['frames']], report)
        return self._finish(arrays), retries

    def _episode(self, oracles: dict, rng: np.random.Generator, report: Callable[[int], None] | None) -> dict:
        cfg, env, unwrapped = self.cfg, self.env, self.env.unwrapped
        replay = self.renderer is not None
        recorder = FrameRecorder(unwrapped.model) if replay else None
        noisy = cfg.variant == 'noisy'
        p_random = cfg.env_info.p_random_action_noisy if noisy else 0.0

        ob, info = env.reset()
        p_stack = stack_probability(cfg.env, rng)
        xi = rng.uniform(0, NOISY_MAX_ACTION_NOISE) if noisy else 0.0
        agent = oracles[info['privileged/target_task']]
        agent.reset(ob, info)

        def capture(ob):  # the frame the env just rendered, or what it would have drawn
            return recorder.snapshot(unwrapped.model, unwrapped.data) if replay else ob

        frame = capture(ob)
        rows = {key: [] for key in ('frames', 'actions', 'qpos', 'qvel', 'button_states')}
        for step in range(cfg.episode_length):
            rows['frames'].append(frame)
            if rng.uniform() < p_random:
                action = rng.uniform(-1, 1, size=5)
            else:
                action = np.array(agent.select_action(ob, info))
                if noisy:
                    action = action + rng.normal(0, [xi, xi, xi, xi * 3, xi * 10], action.shape)
            action = np.clip(action, -1, 1)
            ob, _, _, truncated, info = env.step(action)
            if truncated != (step == cfg.episode_length - 1):
                raise GenerationError(f'env truncated at step {step}, expected {cfg.episode_length - 1}')
            frame = capture(ob)  # before a new target changes the scene, as the env rendered it
            if agent.done:  # the oracle finished its target: set a new one (OGBench's play/noisy loop)
                unwrapped.set_new_target(return_info=False, p_stack=p_stack)
                target_info = unwrapped.get_reset_info()
                agent = oracles[target_info['privileged/target_task']]
                agent.reset(ob, target_info)
            rows['actions'].append(action)
            rows['qpos'].append(info['prev_qpos'])
            rows['qvel'].append(info['prev_qvel'])
            if 'prev_button_states' in info:
                rows['button_states'].append(info['prev_button_states'])
            if report is not None:
                report(1)
        frames = rows.pop('frames')
        episode = {key: np.array(value) for key, value in rows.items() if value}
        if replay:
            episode['frames'] = frames  # rendered once the shard's rollouts are done
        else:
            episode['observations'] = np.array(frames, dtype=np.uint8)
        return episode

    def _render(self, frames: list[FrameState], report: Callable[[int], None]) -> np.ndarray:
        images = np.empty((len(frames), FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
        batch = self.renderer.batch_size
        for start in range(0, len(frames), batch):
            chunk = frames[start : start + batch]
            self.renderer.render(chunk, images[start : start + len(chunk)])
            report(len(chunk))
        return images

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
        self.env.close()

    def _finish(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add terminals and oracle goals; cast to OGBench's dtypes; order as the schema."""
        length = self.cfg.episode_length
        num_rows = len(arrays['actions'])
        arrays['terminals'] = (np.arange(num_rows) % length) == length - 1
        arrays['oracle_reps'] = oracle_goals(self.cfg.env, arrays['qpos'], arrays.get('button_states'))
        schema = dataset_schema(self.cfg)
        return {key: arrays[key].astype(dtype, copy=False) for key, (_, dtype) in schema.items()}


# ----------------------------------------------------------------------------------------------------
# Shard files: atomic writes, validation, parallel production.


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
    with open(tmp, 'wb') as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)  # a shard either exists complete or not at all


def load_shard(path: Path, cfg: GenerationConfig, shard: Shard) -> dict[str, np.ndarray]:
    """Read and fully check one shard; CorruptShardError names the file on any problem."""
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise CorruptShardError(f'shard {path} is corrupt or truncated ({type(err).__name__}: {err})') from err
    try:
        check_arrays(arrays, cfg, shard.num_episodes)
    except DatasetValidationError as err:
        raise CorruptShardError(f'shard {path} is invalid: {err}') from err
    return arrays


def check_arrays(arrays: dict[str, np.ndarray], cfg: GenerationConfig, num_episodes: int) -> None:
    """Keys, shapes, dtypes, episode boundaries and finiteness."""
    schema = dataset_schema(cfg)
    num_rows = num_episodes * cfg.episode_length
    if set(arrays) != set(schema):
        raise DatasetValidationError(f'keys {sorted(arrays)} != expected {sorted(schema)}')
    for key, (row_shape, dtype) in schema.items():
        check_shape_dtype(key, arrays[key].shape, arrays[key].dtype, (num_rows, *row_shape), dtype)
        if dtype.kind == 'f' and not np.isfinite(arrays[key]).all():
            raise DatasetValidationError(f'{key} has non-finite values')
    check_terminals(arrays['terminals'], cfg.episode_length)


def check_shape_dtype(key: str, shape: tuple, dtype: np.dtype, want_shape: tuple, want_dtype: np.dtype) -> None:
    if tuple(shape) != tuple(want_shape) or np.dtype(dtype) != want_dtype:
        raise DatasetValidationError(f'{key}: got {dtype} {tuple(shape)}, expected {want_dtype} {tuple(want_shape)}')


def check_terminals(terminals: np.ndarray, episode_length: int, first_row: int = 0) -> None:
    """Terminals are True exactly on each episode's last row (rows counted from first_row)."""
    expected = ((np.arange(len(terminals)) + first_row) % episode_length) == episode_length - 1
    if not np.array_equal(terminals, expected):
        row = first_row + int(np.flatnonzero(terminals != expected)[0])
        raise DatasetValidationError(
            f'terminals must be True exactly on every {episode_length}-th row; first mismatch at row {row}'
        )


_WORKER: dict = {}


def _init_worker(progress_queue) -> None:
    _WORKER['queue'] = progress_queue


def _produce_shard(cfg: GenerationConfig, shard: Shard, shard_dir: Path, report: Callable[[int], None]) -> int:
    collector = _WORKER.get('collector')
    if collector is None or collector.cfg != cfg:
        collector = _WORKER['collector'] = ShardCollector(cfg)
    arrays, retries = collector.collect(shard, report)
    write_shard(shard_dir / shard.filename, arrays)
    return retries


def _produce_shard_in_worker(cfg: GenerationConfig, shard: Shard, shard_dir: Path) -> int:
    progress_queue = _WORKER['queue']
    return _produce_shard(cfg, shard, shard_dir, progress_queue.put)


def produce_shards(cfg: GenerationConfig, shards: list[Shard], shard_dir: Path, workers: int) -> int:
    """Produce the given shards with a tqdm bar; returns the number of rejected scene episodes."""
    total = sum(s.num_episodes for s in shards) * cfg.episode_length
    bar = tqdm(total=total, unit='transition', unit_scale=True, desc=f'{cfg.dataset_name} ({cfg.render_mode})')
    with bar:
        if workers <= 1:
            return sum(_produce_shard(cfg, shard, shard_dir, bar.update) for shard in shards)
        import multiprocessing

        context = multiprocessing.get_context('spawn')  # fresh processes: one GL context each, no forked state
        progress_queue = context.Queue()
        with context.Pool(min(workers, len(shards)), initializer=_init_worker, initargs=(progress_queue,)) as pool:
            results = [pool.apply_async(_produce_shard_in_worker, (cfg, shard, shard_dir)) for shard in shards]
            while not all(result.ready() for result in results):
                for result in results:
                    if result.ready() and not result.successful():
                        result.get()  # re-raises the worker's exception; the pool is terminated on exit
                with contextlib.suppress(queue.Empty):
                    bar.update(progress_queue.get(timeout=0.2))
            retries = sum(result.get() for result in results)
            while not progress_queue.empty():
                bar.update(progress_queue.get())
        return retries


# ----------------------------------------------------------------------------------------------------
# Streaming npz writer and readers (deterministic bytes: fixed zip timestamps).

ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def write_npz_streaming(
    path: Path, entries: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], Iterable[np.ndarray]]]]
) -> None:
    """Write an np.load-compatible compressed npz whose arrays arrive in chunks (never whole in memory)."""
    tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
    try:
        _write_npz_entries(tmp, entries)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_npz_entries(
    tmp: Path, entries: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], Iterable[np.ndarray]]]]
) -> None:
    with zipfile.ZipFile(tmp, 'w', allowZip64=True) as archive:
        for key, (shape, dtype, chunks) in entries.items():
            info = zipfile.ZipInfo(f'{key}.npy', date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, 'w', force_zip64=True) as f:
                header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False, 'shape': shape}
                np.lib.format.write_array_header_1_0(f, header)
                written = 0
                for chunk in chunks():
                    chunk = np.ascontiguousarray(chunk)
                    if chunk.dtype != dtype or chunk.shape[1:] != shape[1:]:
                        raise GenerationError(f'{key}: chunk {chunk.dtype} {chunk.shape} does not fit {dtype} {shape}')
                    f.write(chunk.data)
                    written += len(chunk)
                if written != shape[0]:
                    raise GenerationError(f'{key}: wrote {written} rows, header says {shape[0]}')


def read_npz_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(f'{key}.npy') as f:
        return _read_header(f)


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise DatasetValidationError(f'unsupported .npy format version {version}')
    shape, fortran_order, dtype = read_header[version](f)
    if fortran_order:
        raise DatasetValidationError('Fortran-ordered arrays are not supported')
    return shape, dtype


def iter_npz_rows(archive: zipfile.ZipFile, key: str, rows_per_chunk: int = 4096) -> Iterator[np.ndarray]:
    """Stream an array out of an npz in row chunks (decompressing as it goes; the CRC is checked at the end)."""
    with archive.open(f'{key}.npy') as f:
        shape, dtype = _read_header(f)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        remaining = shape[0]
        while remaining:
            n = min(rows_per_chunk, remaining)
            buffer = f.read(n * row_bytes)
            if len(buffer) != n * row_bytes:
                raise DatasetValidationError(f'{key}: data ends {remaining} rows early')
            yield np.frombuffer(buffer, dtype=dtype).reshape(n, *shape[1:])
            remaining -= n
        if f.read(1):
            raise DatasetValidationError(f'{key}: data continues past the {shape[0]} rows in its header')


def merge_shards(
    cfg: GenerationConfig,
    shards: list[Shard],
    shard_dir: Path,
    out_path: Path,
    wait_for: Callable[[Path], None] | None = None,
) -> None:
    """Stream the shards' arrays, key by key, into one OGBench-format file; wait_for(path), if given, returns
    once that shard exists (shards appear atomically, so an existing one is complete)."""
    schema = dataset_schema(cfg)
    num_rows = sum(s.num_episodes for s in shards) * cfg.episode_length

    def chunks_of(key):
        def chunks():
            for shard in shards:
                path = shard_dir / shard.filename
                if wait_for is not None:
                    wait_for(path)
                try:
                    with np.load(path) as npz:
                        yield npz[key]
                except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
                    raise CorruptShardError(f'shard {path} is corrupt or truncated ({err})') from err

        return chunks

    entries = {key: ((num_rows, *row_shape), dtype, chunks_of(key)) for key, (row_shape, dtype) in schema.items()}
    write_npz_streaming(out_path, entries)


class MergeStopped(GenerationError):
    """The background merge was told to stop because production failed or was interrupted."""


class BackgroundMerge:
    """merge_shards in a thread, started before the shards exist: production and merging overlap.

    Used as a context manager around production. Leaving it normally means production is over: a shard that
    is still missing then is an error, not something to wait for. Leaving it by an exception stops the merge
    (its temporary file is removed). Either way it waits for the thread and re-raises the merge's own error.
    """

    POLL_S = 0.2

    def __init__(self, cfg: GenerationConfig, shards: list[Shard], shard_dir: Path, out_path: Path):
        self._produced, self._stop = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(cfg, shards, shard_dir, out_path),
                                        name=f'merge {out_path.name}', daemon=True)

    def __enter__(self) -> 'BackgroundMerge':
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        (self._produced if exc_type is None else self._stop).set()
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def _run(self, cfg: GenerationConfig, shards: list[Shard], shard_dir: Path, out_path: Path) -> None:
        try:
            merge_shards(cfg, shards, shard_dir, out_path, wait_for=self._wait_for)
        except BaseException as err:  # handed to the main thread by __exit__
            self._error = err

    def _wait_for(self, path: Path) -> None:
        while not path.exists():
            if self._produced.is_set() and not path.exists():
                raise CorruptShardError(f'shard {path} is missing after production finished')
            if self._stop.wait(self.POLL_S):
                raise MergeStopped(f'merge into {path.parent} stopped: production did not finish')


def validate_dataset(path: Path, cfg: GenerationConfig, num_episodes: int) -> None:
    """Check a merged file: keys, shapes, dtypes, episode boundaries, finite values, intact compression."""
    schema = dataset_schema(cfg)
    num_rows = num_episodes * cfg.episode_length
    try:
        with zipfile.ZipFile(path) as archive:
            keys = sorted(name.removesuffix('.npy') for name in archive.namelist())
            if keys != sorted(schema):
                raise DatasetValidationError(f'keys {keys} != expected {sorted(schema)}')
            for key, (row_shape, dtype) in schema.items():
                shape, got_dtype = read_npz_header(archive, key)
                check_shape_dtype(key, shape, got_dtype, (num_rows, *row_shape), dtype)
                checked_rows = 0
                for chunk in iter_npz_rows(archive, key):
                    if dtype.kind == 'f' and not np.isfinite(chunk).all():
                        raise DatasetValidationError(f'{key} has non-finite values')
                    if key == 'terminals':
                        check_terminals(chunk, cfg.episode_length, first_row=checked_rows)
                    checked_rows += len(chunk)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetValidationError(f'{path} is corrupt or truncated ({type(err).__name__}: {err})') from err
    except DatasetValidationError as err:
        raise DatasetValidationError(f'{path}: {err}') from err


# ----------------------------------------------------------------------------------------------------
# Preview.


def write_preview(dataset_path: Path, png_path: Path, episode_length: int, num_episodes: int = 4) -> None:
    """A grid: first, middle and last frame of the first episodes, each titled with its oracle goal vector."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    with zipfile.ZipFile(dataset_path) as archive:
        (total_rows, *_), _ = read_npz_header(archive, 'observations')
        num_episodes = min(num_episodes, total_rows // episode_length)
        wanted = num_episodes * episode_length
        frames = []
        for chunk in iter_npz_rows(archive, 'observations', rows_per_chunk=min(wanted, 4096)):
            frames.append(chunk)
            if sum(len(c) for c in frames) >= wanted:
                break
        frames = np.concatenate(frames)[:wanted]
    with np.load(dataset_path) as npz:
        goals = npz['oracle_reps'][:wanted]

    steps = (0, episode_length // 2, episode_length - 1)
    fig, axes = plt.subplots(num_episodes, len(steps), figsize=(2.6 * len(steps), 2.8 * num_episodes), squeeze=False)
    for episode in range(num_episodes):
        for col, step in enumerate(steps):
            row = episode * episode_length + step
            ax = axes[episode, col]
            ax.imshow(frames[row])
            ax.set_axis_off()
            goal = np.array2string(goals[row], precision=2, separator=',', max_line_width=36)
            ax.set_title(f'ep {episode} t={step}\ngoal {goal}', fontsize=6)
    fig.suptitle(f'{dataset_path.name}: frames and their oracle goals', fontsize=8)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The whole run.


def output_paths(cfg: GenerationConfig, out_dir: Path) -> tuple[Path, Path, Path, Path]:
    """(train file, validation file, shard directory, run record JSON)."""
    name = cfg.dataset_name
    return out_dir / f'{name}.npz', out_dir / f'{name}-val.npz', out_dir / f'{name}.shards', out_dir / f'{name}.json'


def prepare_shard_dir(cfg: GenerationConfig, shard_dir: Path) -> None:
    """Create the shard directory, or check that an existing one was made with the same settings."""
    manifest = shard_dir / 'manifest.json'
    settings = dataclasses.asdict(cfg)
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if previous != settings:
            diff = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
            raise GenerationError(
                f'{shard_dir} holds shards made with other settings {diff} (old, new); '
                'rerun with the old settings to resume, or delete the directory'
            )
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob('*.tmp-*'):  # left by a killed worker
        stale.unlink()
    manifest.write_text(json.dumps(settings, indent=1))


def pending_shards(cfg: GenerationConfig, shards: list[Shard], shard_dir: Path) -> list[Shard]:
    """Shards still to produce; a corrupt one is deleted (with a warning) and produced again."""
    pending = []
    for shard in shards:
        path = shard_dir / shard.filename
        if not path.exists():
            pending.append(shard)
            continue
        try:
            load_shard(path, cfg, shard)
        except CorruptShardError as err:
            warnings.warn(f'{err}; producing it again', stacklevel=2)
            path.unlink()
            pending.append(shard)
    return pending


def generate(
    cfg: GenerationConfig,
    out_dir: Path,
    workers: int = 1,
    keep_shards: bool = False,
    overwrite: bool = False,
    preview: Path | None = None,
) -> tuple[Path, Path]:
    """Produce (or resume) a dataset; returns the train and validation file paths."""
    train_path, val_path, shard_dir, record_path = output_paths(cfg, out_dir)
    settings = dataclasses.asdict(cfg)
    if train_path.exists() and val_path.exists() and not shard_dir.exists() and not overwrite:
        previous = json.loads(record_path.read_text())['settings'] if record_path.exists() else None
        if previous != settings:
            raise GenerationError(f'{train_path} exists and was made with other settings; pass --overwrite')
        print(f'{train_path} and {val_path.name} are already complete')
    else:
        _produce_and_merge(cfg, out_dir, workers, keep_shards)
    if preview is not None:
        write_preview(train_path, preview, cfg.episode_length)
    return train_path, val_path


def _produce_and_merge(cfg: GenerationConfig, out_dir: Path, workers: int, keep_shards: bool) -> None:
    train_path, val_path, shard_dir, record_path = output_paths(cfg, out_dir)

    start = time.time()
    shards = plan_shards(cfg)
    prepare_shard_dir(cfg, shard_dir)
    todo = pending_shards(cfg, shards, shard_dir)
    if len(todo) < len(shards):
        print(f'resuming: {len(shards) - len(todo)} of {len(shards)} shards already done')
    splits = ((train_path, 'train', cfg.num_episodes), (val_path, 'val', cfg.num_val_episodes))
    with contextlib.ExitStack() as merges:  # each split merges while its shards are still being produced
        for path, split, _ in splits:
            merges.enter_context(BackgroundMerge(cfg, [s for s in shards if s.split == split], shard_dir, path))
        retries = produce_shards(cfg, todo, shard_dir, workers) if todo else 0
        produced_seconds = time.time() - start
    for path, _, num_episodes in splits:
        validate_dataset(path, cfg, num_episodes)

    transitions = sum(s.num_episodes for s in todo) * cfg.episode_length
    record = dict(
        settings=dataclasses.asdict(cfg),
        workers=workers,
        transitions_produced=transitions,
        seconds_producing=round(produced_seconds, 1),
        transitions_per_second=round(transitions / max(produced_seconds, 1e-9), 2),
        rejected_scene_episodes=retries,
        seconds_total=round(time.time() - start, 1),
    )
    record_path.write_text(json.dumps(record, indent=1))
    if not keep_shards:
        for path in shard_dir.iterdir():
            path.unlink()
        shard_dir.rmdir()
    print(f'wrote {train_path} and {val_path.name}: {record}')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--env', required=True, choices=sorted(ENVS))
    parser.add_argument('--variant', default='play', choices=VARIANTS)
    parser.add_argument('--num-episodes', type=int, default=1000, help='training episodes (OGBench: 1000)')
    parser.add_argument('--num-val-episodes', type=int, default=None, help='default: num_episodes // 10')
    parser.add_argument('--episode-length', type=int, default=DEFAULT_EPISODE_LENGTH)
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out-dir', type=Path, default=Path('data'))
    parser.add_argument('--shadow-size', type=int, default=4096, help='model.vis.quality.shadowsize (OGBench: 4096)')
    parser.add_argument('--render-mode', default='env', choices=RENDER_MODES)
    parser.add_argument(
        '--render-tiles',
        type=int,
        default=16,
        help='replay: read back N*N frames per GL readback (each is drawn where the env draws it, then copied '
        'into its tile: the frames are the env\'s own for any N)',
    )
    parser.add_argument('--shard-episodes', type=int, default=10, help='episodes per shard (the unit of resuming)')
    parser.add_argument('--preview', type=Path, default=None, help='write a PNG grid of frames and goals here')
    parser.add_argument('--keep-shards', action='store_true', help='keep the shard directory after merging')
    parser.add_argument('--overwrite', action='store_true', help='replace finished files made with other settings')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    num_val = args.num_episodes // 10 if args.num_val_episodes is None else args.num_val_episodes
    try:
        cfg = GenerationConfig(
            env=args.env,
            variant=args.variant,
            num_episodes=args.num_episodes,
            num_val_episodes=num_val,
            episode_length=args.episode_length,
            seed=args.seed,
            shadow_size=args.shadow_size,
            render_mode=args.render_mode,
            render_tiles=args.render_tiles,
            shard_episodes=args.shard_episodes,
        )
        generate(cfg, args.out_dir, args.workers, args.keep_shards, args.overwrite, args.preview)
    except GenerationError as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
