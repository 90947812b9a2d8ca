"""Simulated tasks for the ROS bridge, without ROS: OGBench visual manipulation envs and the toy pointreach.

The sim node (cfgrl_ros/nodes/sim_node.py) is a thin ROS shell around `Episode`: it publishes what
`Episode` returns and feeds it the actions it receives. Everything that decides what happens to an
action (validation, stepping, success, the end of an episode) lives here, so it is tested without DDS.

Episodes follow OGBench's evaluation protocol: `env.reset(seed=..., options=dict(task_id=k,
render_goal=True))`, the goal image is info['goal_rendered'], the oracle goal vector info['goal']
(the env is made with use_oracle_rep=True), the episode ends on success (terminate_at_goal) or at the
time limit, and success is info['success'] at the last step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from typing import Protocol

import numpy as np

POINTREACH = "pointreach"
# OGBench builds a new float32 Box from float64 bounds on every action_space access: harmless noise.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")


def seed_goal_setup(env, seed: int) -> None:
    """Make an OGBench env's goal set-up reproducible from `seed`.

    On a reset with a task, the manipulation envs move the arm with `self.action_space.sample()`,
    but their `action_space` is a property that builds a new, unseeded Box on every access, so the
    rendered goal image changes from run to run (measured: up to 79 levels). Give this env instance
    one Box, seeded here before each reset (a per-instance subclass overriding the property).
    """
    unwrapped = env.unwrapped
    if "_seeded_action_space" not in vars(unwrapped):
        space = unwrapped.action_space
        base = type(unwrapped)
        unwrapped.__class__ = type(base.__name__, (base,), {"action_space": property(lambda self: self._seeded_action_space)})
        unwrapped._seeded_action_space = space
    unwrapped._seeded_action_space.seed(int(seed))


class BadActionError(ValueError):
    """An action the sim refuses to apply: wrong length, NaN/inf, or outside the action bounds."""


class SimConfigError(ValueError):
    """An unknown environment, task id or episode length."""


@dataclasses.dataclass(frozen=True)
class EpisodeStart:
    image: np.ndarray  # (H, W, 3) uint8, the first camera frame
    goal_image: np.ndarray  # (H, W, 3) uint8
    goal_vector: np.ndarray  # (G,) float32, OGBench's oracle goal representation
    task_id: int
    seed: int


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    image: np.ndarray
    success: bool
    done: bool


class SimEnv(Protocol):
    """What `Episode` needs from a task. Images are (H, W, 3) uint8, actions float in [-1, 1]."""

    env_name: str
    action_dim: int
    num_tasks: int
    max_episode_steps: int
    control_period_s: float

    def reset(self, task_id: int, seed: int) -> EpisodeStart: ...

    def step(self, action: np.ndarray) -> StepOutcome: ...

    def state_digest(self) -> str:
        """A hash of the full simulator state: equal digests mean an untouched episode."""

    def close(self) -> None:
        """Release the simulator (renderers, GL contexts)."""


class OGBenchSim:
    """An OGBench visual manipulation env (visual-cube-*, visual-scene, visual-puzzle-*)."""

    def __init__(self, env_name: str, max_episode_steps: int | None = None, shadow_size: int = 0):
        os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the first mujoco import
        import gymnasium
        import ogbench  # noqa: F401  (registers the envs)

        if not env_name.startswith("visual-") or env_name not in gymnasium.registry:
            raise SimConfigError(f"{env_name!r} is not an OGBench visual env id (e.g. visual-cube-single-v0)")
        kwargs = {} if max_episode_steps is None else {"max_episode_steps": _positive(max_episode_steps)}
        self.env = gymnasium.make(env_name, use_oracle_rep=True, **kwargs)
        self.env_name = env_name
        self.action_dim = int(self.env.action_space.shape[0])
        self.max_episode_steps = int(self.env.spec.max_episode_steps)
        unwrapped = self.env.unwrapped
        self.num_tasks = len(unwrapped.task_infos)
        self.control_period_s = float(unwrapped.control_timestep())
        self._shadow_size = shadow_size

    def reset(self, task_id: int, seed: int) -> EpisodeStart:
        check_task_id(task_id, self.num_tasks)
        seed_goal_setup(self.env, seed)
        image, info = self.env.reset(seed=seed, options=dict(task_id=task_id, render_goal=True))
        if self._shadow_size:
            # The renderer exists only after the first reset; rebuild it with the smaller shadow map
            # (faster on llvmpipe; what it changes in the images: docs/benchmarks.md) and redo this reset.
            self._apply_shadow_size(self._shadow_size)
            self._shadow_size = 0
            seed_goal_setup(self.env, seed)
            image, info = self.env.reset(seed=seed, options=dict(task_id=task_id, render_goal=True))
        return EpisodeStart(image, info["goal_rendered"], np.asarray(info["goal"], np.float32), task_id, seed)

    def step(self, action: np.ndarray) -> StepOutcome:
        image, _, terminated, truncated, info = self.env.step(action)
        return StepOutcome(image, bool(info["success"]), bool(terminated or truncated))

    def state_digest(self) -> str:
        data = self.env.unwrapped._data
        # ctrl is left out: every step overwrites it from the action (and reset leaves it unseeded).
        return _digest(data.qpos, data.qvel, data.act, data.mocap_pos, data.mocap_quat)

    def close(self) -> None:
        """The env and its renderer's GL context."""
        self.env.close()

    def _apply_shadow_size(self, size: int) -> None:
        unwrapped = self.env.unwrapped
        unwrapped._model.vis.quality.shadowsize = int(size)
        if unwrapped._renderer is not None:
            unwrapped._renderer.close()
        unwrapped._initialize_renderer()


class PointReachSim:
    """The toy 2-D PointReach task (training/pointreach.py), one episode at a time."""

    env_name = POINTREACH
    action_dim = 2
    control_period_s = 0.05  # nominal, like OGBench's manipulation envs: only /clock uses it

    def __init__(self, max_episode_steps: int | None = None, image_size: int | None = None):
        from training import pointreach

        config = pointreach.PointReachConfig()
        if max_episode_steps is not None:
            config = dataclasses.replace(config, max_episode_steps=_positive(max_episode_steps))
        if image_size is not None:
            config = dataclasses.replace(config, image_size=int(image_size))
        self.batch = pointreach.PointReachBatch(1, "oracle", config)
        self.num_tasks = pointreach.NUM_TASKS
        self.max_episode_steps = config.max_episode_steps

    def reset(self, task_id: int, seed: int) -> EpisodeStart:
        check_task_id(task_id, self.num_tasks)
        images, goals = self.batch.reset([0], [task_id], [seed])
        return EpisodeStart(images[0], self.batch.render(goals)[0], goals[0].astype(np.float32), task_id, seed)

    def step(self, action: np.ndarray) -> StepOutcome:
        images, successes, dones = self.batch.step([0], np.asarray(action, np.float32)[None])
        return StepOutcome(images[0], bool(successes[0]), bool(dones[0]))

    def state_digest(self) -> str:
        return _digest(self.batch.positions, self.batch.goals, self.batch.steps)

    def close(self) -> None:
        """Nothing to release: numpy arrays only."""


def make_sim(env_name: str, max_episode_steps: int | None = None, shadow_size: int = 0,
             image_size: int | None = None) -> SimEnv:
    """The sim for an OGBench visual env id, or for 'pointreach' (training/pointreach.py).

    image_size: PointReach renders at any size (as the direct evaluator does at the policy's size);
    OGBench's visual envs render 64x64 only.
    """
    if env_name == POINTREACH:
        return PointReachSim(max_episode_steps, image_size)
    if image_size not in (None, 64):
        raise SimConfigError(f"{env_name} renders 64x64 images; image_size {image_size} is for pointreach only")
    return OGBenchSim(env_name, max_episode_steps, shadow_size)


def check_task_id(task_id: int, num_tasks: int) -> int:
    if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or not 1 <= task_id <= num_tasks:
        raise SimConfigError(f"task_id must be an integer in [1, {num_tasks}], got {task_id!r}")
    return int(task_id)


def validate_action(action, action_dim: int) -> np.ndarray:
    """The action as float64 (action_dim,), or BadActionError saying what is wrong with it."""
    values = np.asarray(action, dtype=np.float64).reshape(-1)
    if values.shape != (action_dim,):
        raise BadActionError(f"action has {values.size} values, the env takes {action_dim}")
    if not np.all(np.isfinite(values)):
        raise BadActionError(f"action contains NaN or inf at indices {np.flatnonzero(~np.isfinite(values)).tolist()}")
    # The policy clips to [-1, 1]; anything well outside is a bug upstream, not a command to obey.
    if np.any(np.abs(values) > 1.0 + 1e-5):
        raise BadActionError(f"action {np.round(values, 4).tolist()} leaves the action bounds [-1, 1]")
    return np.clip(values, -1.0, 1.0)


class Episode:
    """One task episode: validates and applies actions, counts steps and refused actions."""

    def __init__(self, env: SimEnv, task_id: int, seed: int):
        self.env = env
        self.start = env.reset(task_id, seed)
        self.task_id, self.seed = task_id, seed
        self.steps = 0
        self.bad_actions = 0
        self.success = False
        self.done = False
        self.image = self.start.image

    def apply(self, action) -> StepOutcome:
        """Step once with `action`. A bad action raises BadActionError and leaves the env untouched."""
        if self.done:
            raise BadActionError(f"episode (task {self.task_id}, seed {self.seed}) is over; reset first")
        values = self.validate(action)
        outcome = self.env.step(values)
        self.steps += 1
        self.success, self.done, self.image = outcome.success, outcome.done, outcome.image
        return outcome

    def validate(self, action) -> np.ndarray:
        """`validate_action`, counting the refusals."""
        try:
            return validate_action(action, self.env.action_dim)
        except BadActionError:
            self.bad_actions += 1
            raise

    def result(self) -> dict:
        return {
            "env": self.env.env_name,
            "task_id": self.task_id,
            "seed": self.seed,
            "success": self.success,
            "steps": self.steps,
            "done": self.done,
            "bad_actions": self.bad_actions,
        }


class ActionLatch:
    """Real-time clock's action hold: each tick takes the newest action, or repeats the last one (a miss)."""

    def __init__(self, action_dim: int):
        self.current = np.zeros(action_dim)
        self._fresh = False
        self.misses = 0

    def offer(self, action: np.ndarray) -> None:
        self.current, self._fresh = action, True

    def take(self) -> tuple[np.ndarray, bool]:
        """(action to apply at this tick, whether it was fresh)."""
        fresh, self._fresh = self._fresh, False
        if not fresh:
            self.misses += 1
        return self.current, fresh


def _positive(value: int) -> int:
    if int(value) < 1:
        raise SimConfigError(f"max_episode_steps must be >= 1, got {value}")
    return int(value)


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Pairing the policy node with a sim (launch/sim.launch.py and cfgrl-ros-evaluate use these).

SIM_LAUNCH_ARGUMENTS = ("env_name", "clock", "control_rate_hz", "task_id", "max_episode_steps")


def paired_policy_parameters(clock: str, control_rate_hz: float) -> dict:
    """Policy node settings that match a sim on `clock`.

    lockstep: sim time (use_sim_time), one action per image (trigger image, a 1000 Hz cap that never
    binds) and no stale-input stop, so one image gives exactly one action; sim time stands still
    while the policy thinks, hence the long image age. realtime: both on the wall clock at the rate.
    """
    if clock == "lockstep":
        return {"use_sim_time": True, "trigger": "image", "control_rate_hz": 1000.0, "stale_action": "none",
                "max_image_age_s": 3600.0}
    if clock == "realtime":
        return {"use_sim_time": False, "trigger": "timer", "control_rate_hz": float(control_rate_hz),
                "stale_action": "zero"}
    raise SimConfigError(f"clock must be lockstep or realtime, got {clock!r}")


def sim_launch_parameters(arguments: dict[str, str], sim_file: dict) -> tuple[dict, dict]:
    """(sim overrides, paired policy settings) from sim.launch.py's arguments; an empty argument keeps
    the sim params file's value (`sim_file`: its cfgrl_sim ros__parameters)."""
    kinds = {"env_name": str, "clock": str, "control_rate_hz": float, "task_id": int, "max_episode_steps": int}
    overrides = {}
    for name in SIM_LAUNCH_ARGUMENTS:
        text = arguments.get(name, "")
        if text:
            try:
                overrides[name] = kinds[name](text)
            except ValueError:
                what = "an integer" if kinds[name] is int else "a number"
                raise SimConfigError(f"launch argument {name}:={text!r} is not {what}") from None
    effective = {"clock": "lockstep", "control_rate_hz": 10.0, **sim_file, **overrides}
    return overrides, paired_policy_parameters(effective["clock"], effective["control_rate_hz"])


def params_file_section(path: str | os.PathLike, node_name: str, namespace: str = "") -> dict:
    """The ros__parameters a params file gives `node_name` in `namespace`, as rcl applies them: keys `/**`
    and `/**/name`, then `name` and `/name` in the root namespace or `/ns/name` in namespace `ns`."""
    import yaml

    with open(path) as file:
        data = yaml.safe_load(file) or {}
    ns = namespace.strip("/")
    keys = ["/**", f"/**/{node_name}", *([f"/{ns}/{node_name}"] if ns else [node_name, f"/{node_name}"])]
    values: dict = {}
    for key in keys:
        values.update((data.get(key) or {}).get("ros__parameters") or {})
    return values
