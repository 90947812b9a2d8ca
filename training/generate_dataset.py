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
import dataclasses
import json
import os
import queue
import shutil
import signal
import sys
import time
import traceback
import warnings
import zipfile
from pathlib import Path
from typing import Callable

os.environ.setdefault('MUJOCO_GL', 'egl')  # must precede the first mujoco import; respects a user's choice

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from training.dataset_files import (  # noqa: E402
    BackgroundMerge,
    CorruptShardError,
    DatasetFileError,
    FileLayout,
    Schema,
    iter_npz_rows,
    load_shard,
    read_npz_header,
    validate_dataset,
    write_shard,
)
from training.oracle_goals import oracle_goal_dim, oracle_goals  # noqa: E402
from training.replay_render import FRAME_SIZE, BatchRenderer, FrameRecorder, FrameState, ReplayRenderError  # noqa: E402

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


# What a run raises for a problem it can name (settings, files, replay rendering): reported, not a traceback.
GENERATION_ERRORS = (GenerationError, DatasetFileError, ReplayRenderError)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Everything that determines the dataset's content (worker count and paths do not)."""

    env: str
    variant: str
    num_episodes: int = 1000
    num_val_episodes: int | None = None  # None: num_episodes // 10, at least 1 (OGBench: 10%)
    episode_length: int = DEFAULT_EPISODE_LENGTH
    seed: int = 0
    shadow_size: int = 4096
    render_mode: str = 'env'
    render_tiles: int = 16  # replay: frames per GL readback = render_tiles**2; any value matches 'env' exactly
    shard_episodes: int = 10

    def __post_init__(self):
        if self.num_val_episodes is None:
            object.__setattr__(self, 'num_val_episodes', max(1, self.num_episodes // 10))
        if self.env not in ENVS:
            raise GenerationError(f'unknown env {self.env!r}; choose from {sorted(ENVS)}')
        if self.variant not in VARIANTS:
            raise GenerationError(f'unknown variant {self.variant!r}; choose from {VARIANTS}')
        if self.render_mode not in RENDER_MODES:
            raise GenerationError(f'unknown render mode {self.render_mode!r}; choose from {RENDER_MODES}')
        minimums = dict(num_episodes=1, num_val_episodes=0, episode_length=2, shard_episodes=1, shadow_size=1,
                        render_tiles=1)
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value < minimum:
                flag = '--' + name.replace('_', '-')
                raise GenerationError(f'{name} ({flag}) must be >= {minimum}, got {value}')

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


def dataset_schema(cfg: GenerationConfig) -> Schema:
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


def file_layout(cfg: GenerationConfig) -> FileLayout:
    return FileLayout(dataset_schema(cfg), cfg.episode_length)


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
        self.seconds = {'rollout': 0.0, 'render': 0.0}  # wall time spent so far; replay renders after rollouts
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
            unwrapped.get_pixel_observation()  # the renderer at that size made now, not in the first shard

    def collect(self, shard: Shard, report: Callable[[int], None]) -> tuple[dict[str, np.ndarray], int]:
        """Arrays for the shard's episodes, and the number of rejected (unhealthy) scene episodes."""
        env_seed, oracle_seed, rng = shard_seeds(self.cfg.seed, shard.index)
        replay = self.renderer is not None
        episodes, retries = [], 0
        start = time.perf_counter()
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
        self.seconds['rollout'] += time.perf_counter() - start
        if replay:
            start = time.perf_counter()
            arrays['observations'] = self._render([f for ep in episodes for f in ep['frames']], report)
            self.seconds['render'] += time.perf_counter() - start
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
        # From the stored float32 qpos, as ogbench.relabel_utils.add_oracle_reps computes them: bit-identical.
        arrays['oracle_reps'] = oracle_goals(self.cfg.env, arrays['qpos'].astype(np.float32), arrays.get('button_states'))
        schema = dataset_schema(self.cfg)
        return {key: arrays[key].astype(dtype, copy=False) for key, (_, dtype) in schema.items()}


# ----------------------------------------------------------------------------------------------------
# Parallel production of the shards.


def _produce_shard(cfg: GenerationConfig, shard: Shard, shard_dir: Path, report: Callable[[int], None]) -> int:
    """Write one shard; returns its rejected scene episodes.

    A fresh env per shard: OGBench's envs keep target state across resets (scene's target button and
    block, read by the noisy oracles), so a reused env would make a shard depend on the shards before it.
    """
    collector = ShardCollector(cfg)
    try:
        arrays, retries = collector.collect(shard, report)
    finally:
        collector.close()
    write_shard(shard_dir / shard.filename, arrays)
    return retries


PROGRESS_PERIOD_S = 0.2  # a worker batches its progress reports: one message per period, not per transition


def _worker_main(cfg: GenerationConfig, shard_dir: Path, tasks, events) -> None:
    """A worker process: shards from `tasks` until the None sentinel; progress and results to `events`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    pending, last = 0, time.monotonic()

    def report(count: int) -> None:
        nonlocal pending, last
        pending += count
        if time.monotonic() - last >= PROGRESS_PERIOD_S:
            events.put(('progress', pending))
            pending, last = 0, time.monotonic()

    for shard in iter(tasks.get, None):
        try:
            retries = _produce_shard(cfg, shard, shard_dir, report)
        except BaseException as error:  # noqa: BLE001 - sent to the parent, which stops the run
            detail = '' if isinstance(error, GENERATION_ERRORS) else '\n' + traceback.format_exc()
            events.put(('error', shard.filename, f'{type(error).__name__}: {error}{detail}'))
            return
        events.put(('progress', pending))
        pending = 0
        events.put(('done', shard.filename, retries))


def produce_shards(cfg: GenerationConfig, shards: list[Shard], shard_dir: Path, workers: int) -> int:
    """Produce the given shards with a tqdm bar; returns the number of rejected scene episodes.

    Several workers: spawned processes (one GL context each, no forked state) take shards from a queue.
    A worker that fails, or dies (a driver crash, the OOM killer), stops the run with a named error;
    the shards finished so far are kept for the resumed run.
    """
    total = sum(s.num_episodes for s in shards) * cfg.episode_length
    bar = tqdm(total=total, unit='transition', unit_scale=True, desc=f'{cfg.dataset_name} ({cfg.render_mode})')
    with bar:
        if workers <= 1:
            return sum(_produce_shard(cfg, shard, shard_dir, bar.update) for shard in shards)
        import multiprocessing

        context = multiprocessing.get_context('spawn')
        tasks, events = context.Queue(), context.Queue()
        processes = [context.Process(target=_worker_main, args=(cfg, shard_dir, tasks, events), daemon=True)
                     for _ in range(min(workers, len(shards)))]
        for shard in shards:
            tasks.put(shard)
        for process in processes:
            tasks.put(None)
            process.start()
        finished: dict[str, int] = {}
        try:
            while len(finished) < len(shards):
                try:
                    kind, *payload = events.get(timeout=1.0)
                except queue.Empty:
                    _check_workers(processes)
                    continue
                if kind == 'progress':
                    bar.update(payload[0])
                elif kind == 'done':
                    finished[payload[0]] = payload[1]
                else:
                    raise GenerationError(f'{payload[0]} failed in a worker: {payload[1]}')
        finally:
            for process in processes:
                if process.is_alive() and len(finished) < len(shards):
                    process.terminate()
                process.join(timeout=30)
        return sum(finished.values())


def _check_workers(processes: list) -> None:
    """Raise when a worker ended without reporting (killed by a signal, or crashed in native code)."""
    dead = [p for p in processes if p.exitcode not in (None, 0)]
    if dead:
        codes = ', '.join(f'pid {p.pid}: exit code {p.exitcode}' for p in dead)
        raise GenerationError(f'a worker process died ({codes}); the finished shards are kept: run again to resume')
    if all(p.exitcode == 0 for p in processes):
        raise GenerationError('every worker exited with shards still unreported')


# ----------------------------------------------------------------------------------------------------
# Preview.


def preview_goal_pairs(compact: np.ndarray, episode_length: int, num_episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows at steps 0, L/3 and 2L/3 of the first episodes, and a goal row for each, drawn (seed 0) by
    the training sampler's own rule from the compact terminals."""
    import torch

    from training.data import future_goal_indices, goal_end_indices

    steps = (0, episode_length // 3, 2 * episode_length // 3)
    rows = np.array([episode * episode_length + step for episode in range(num_episodes) for step in steps])
    ends = torch.from_numpy(goal_end_indices(compact)[rows])
    return rows, future_goal_indices(torch.from_numpy(rows), ends, torch.Generator().manual_seed(0)).numpy()


def write_preview(dataset_path: Path, png_path: Path, episode_length: int, num_episodes: int = 4) -> None:
    """A grid of the first episodes: frames at three steps, each beside a goal drawn for it exactly as
    training draws goals (a uniform future row of its episode), titled with that row's oracle goal."""
    import matplotlib

    from training.data import compact_terminals

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
        oracle = npz['oracle_reps'][:wanted] if 'oracle_reps' in npz else None
        terminals, _ = compact_terminals(npz['terminals'][:wanted])

    rows, goals = preview_goal_pairs(terminals, episode_length, num_episodes)
    pairs = len(rows) // num_episodes
    fig, axes = plt.subplots(num_episodes, 2 * pairs, figsize=(4.4 * pairs, 2.5 * num_episodes), squeeze=False)
    for ax, row, goal in zip(axes.reshape(-1, 2), rows, goals):
        episode, step = divmod(int(row), episode_length)
        ax[0].imshow(frames[row])
        ax[0].set_title(f'ep {episode} t={step}', fontsize=7)
        ax[1].imshow(frames[goal])
        title = f'its goal: t={goal - episode * episode_length}'
        if oracle is not None:
            title += '\n' + np.array2string(oracle[goal], precision=2, separator=',', max_line_width=30)
        ax[1].set_title(title, fontsize=6, color='tab:green')
        for side in ax:
            side.set_axis_off()
    fig.suptitle(f'{dataset_path.name}: frames and training goals (uniform future rows; oracle goal below)',
                 fontsize=8)
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


def shard_manifest(cfg: GenerationConfig) -> dict:
    """What a shard's bytes depend on: the settings and the simulator's versions."""
    import importlib.metadata

    import mujoco

    return {'settings': dataclasses.asdict(cfg),
            'versions': {'ogbench': importlib.metadata.version('ogbench'), 'mujoco': mujoco.__version__,
                         'numpy': np.__version__}}


def prepare_shard_dir(cfg: GenerationConfig, shard_dir: Path) -> None:
    """Create the shard directory, or check that an existing one was made with the same settings and versions."""
    manifest_path = shard_dir / 'manifest.json'
    manifest = shard_manifest(cfg)
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GenerationError(f'{manifest_path} is unreadable ({err}); delete {shard_dir} to start over') from None
        flat_old, flat_new = _flatten(previous), _flatten(manifest)
        if flat_old != flat_new:
            raise GenerationError(
                f'{shard_dir} holds shards made with other settings or versions ({describe_changes(flat_old, flat_new)}); '
                'rerun with the old settings to resume, or delete the directory'
            )
    elif shard_dir.exists() and any(shard_dir.glob('shard-*.npz')):
        raise GenerationError(f'{shard_dir} holds shards but no manifest.json saying how they were made; '
                              'delete the directory to start over')
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob('*.tmp-*'):  # left by a killed worker
        stale.unlink()
    for stale in shard_dir.parent.glob(f'{cfg.dataset_name}*.npz.tmp-*'):  # left by a killed merge
        stale.unlink()
    if not manifest_path.exists():
        tmp = manifest_path.with_name(f'manifest.json.tmp-{os.getpid()}')
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path)


def describe_changes(old: dict, new: dict) -> str:
    """'key old -> new, ...' for every key whose value differs."""
    return ', '.join(f'{key} {old.get(key)!r} -> {value!r}' for key, value in new.items() if old.get(key) != value)


def _flatten(manifest: dict) -> dict:
    return {f'{section}.{key}': value for section, values in manifest.items() if isinstance(values, dict)
            for key, value in values.items()}


def pending_shards(cfg: GenerationConfig, shards: list[Shard], shard_dir: Path) -> list[Shard]:
    """Shards still to produce; a corrupt one is deleted (with a warning) and produced again."""
    pending = []
    for shard in shards:
        path = shard_dir / shard.filename
        if not path.exists():
            pending.append(shard)
            continue
        try:
            load_shard(path, file_layout(cfg), shard.num_episodes)
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
        previous = _recorded_settings(record_path)
        if previous != settings:
            changed = describe_changes(previous, settings) if previous else f'no readable {record_path.name}'
            raise GenerationError(f'{train_path} exists and was made with other settings ({changed}); '
                                  'pass --overwrite to replace it, or another --out-dir')
        print(f'{train_path} and {val_path.name} are already complete')
    else:
        _produce_and_merge(cfg, out_dir, workers, keep_shards)
    if preview is not None:
        write_preview(train_path, preview, cfg.episode_length)
        print(f'preview: {preview}')
    return train_path, val_path


def _recorded_settings(record_path: Path) -> dict | None:
    """The settings a finished run recorded; None when there is no readable record."""
    try:
        return json.loads(record_path.read_text())['settings']
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _produce_and_merge(cfg: GenerationConfig, out_dir: Path, workers: int, keep_shards: bool) -> None:
    train_path, val_path, shard_dir, record_path = output_paths(cfg, out_dir)

    start = time.time()
    shards = plan_shards(cfg)
    for trash in out_dir.glob(f'{shard_dir.name}.delete-*'):  # a finished run killed while cleaning up
        shutil.rmtree(trash, ignore_errors=True)
    prepare_shard_dir(cfg, shard_dir)
    todo = pending_shards(cfg, shards, shard_dir)
    if len(todo) < len(shards):
        print(f'resuming: {len(shards) - len(todo)} of {len(shards)} shards already done')
    layout = file_layout(cfg)
    splits = ((train_path, 'train', cfg.num_episodes), (val_path, 'val', cfg.num_val_episodes))
    with contextlib.ExitStack() as merges:  # each split merges while its shards are still being produced
        for path, split, num_episodes in splits:
            shard_paths = [shard_dir / s.filename for s in shards if s.split == split]
            merges.enter_context(BackgroundMerge(layout, shard_paths, num_episodes, path))
        retries = produce_shards(cfg, todo, shard_dir, workers) if todo else 0
        produced_seconds = time.time() - start
    for path, _, num_episodes in splits:
        validate_dataset(path, layout, num_episodes)

    transitions = sum(s.num_episodes for s in todo) * cfg.episode_length
    record = dict(
        settings=dataclasses.asdict(cfg),
        workers=workers,
        shards_already_done=len(shards) - len(todo),  # a resumed run: the figures are this run's part
        transitions_produced=transitions,
        seconds_producing=round(produced_seconds, 1),
        transitions_per_second=round(transitions / max(produced_seconds, 1e-9), 2),
        rejected_scene_episodes=retries,
        seconds_total=round(time.time() - start, 1),
    )
    if todo or _recorded_settings(record_path) != record['settings']:
        # A run killed between its record and the clean-up produced nothing now: its record stands.
        record_path.write_text(json.dumps(record, indent=1))
    else:
        record = json.loads(record_path.read_text())
    if not keep_shards:  # renamed first: a kill while deleting never leaves a half-emptied shard directory
        trash = shard_dir.with_name(f'{shard_dir.name}.delete-{os.getpid()}')
        shard_dir.rename(trash)
        shutil.rmtree(trash)
    print(f'wrote {train_path} and {val_path.name}: {record["transitions_produced"]} transitions produced in '
          f'{record["seconds_producing"]:.1f} s ({record["transitions_per_second"]} transitions/s, '
          f'{record["workers"]} worker(s)); run record {record_path.name}')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--env', required=True, choices=sorted(ENVS))
    parser.add_argument('--variant', default='play', choices=VARIANTS)
    parser.add_argument('--num-episodes', type=int, default=1000, help='training episodes (OGBench: 1000)')
    parser.add_argument('--num-val-episodes', type=int, default=None, help='default: num_episodes // 10, at least 1 (cfgrl-train needs a non-empty '
                        'validation split; 0 only for speed measurements)')
    parser.add_argument('--episode-length', type=int, default=DEFAULT_EPISODE_LENGTH)
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                        help='worker processes, one GL context each (1: in this process; default: the CPU count)')
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
    if args.workers < 1:
        sys.exit(f'cfgrl-generate: error: --workers must be >= 1, got {args.workers}')
    if args.out_dir.exists() and not args.out_dir.is_dir():
        sys.exit(f'cfgrl-generate: error: --out-dir {args.out_dir} is a file, not a directory')
    try:
        cfg = GenerationConfig(
            env=args.env,
            variant=args.variant,
            num_episodes=args.num_episodes,
            num_val_episodes=args.num_val_episodes,
            episode_length=args.episode_length,
            seed=args.seed,
            shadow_size=args.shadow_size,
            render_mode=args.render_mode,
            render_tiles=args.render_tiles,
            shard_episodes=args.shard_episodes,
        )
        generate(cfg, args.out_dir, args.workers, args.keep_shards, args.overwrite, args.preview)
    except (*GENERATION_ERRORS, OSError) as err:  # OSError: a full disk, a read-only --out-dir, ...
        sys.exit(f'cfgrl-generate: error: {err}')
    except KeyboardInterrupt:
        print(f'\ncfgrl-generate: interrupted; the finished shards are kept in {args.out_dir}: '
              'run the same command again to resume', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()
