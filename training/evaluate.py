"""OGBench-protocol evaluation of a CFGRL checkpoint, sweeping the guidance weight w in one run.

    cfgrl-evaluate --checkpoint runs/cube/checkpoint.safetensors --env visual-cube-single-v0 \\
        --w 0 1 1.5 2 3 4 --episodes-per-task 50 --workers 16 --device cuda
    cfgrl-evaluate --checkpoint runs/toy/checkpoint.safetensors --env pointreach --w 1 3

Protocol, as OGBench's impls/utils/evaluation.py: tasks k = 1..5 are started with
`env.reset(options=dict(task_id=k, render_goal=True))`; an episode runs until it terminates (the
env's default terminate_at_goal: the goal is reached) or is truncated at the env's registered
max_episode_steps (cube-single 200, cube-double 500, scene 750, puzzle-3x3 500; --max-steps
overrides it for short runs); success is info['success'] at its last step. The goal is
info['goal']: with goal_mode "oracle" the env is made with use_oracle_rep=True, so it is the
env's compute_oracle_observation() of the task's goal state (the paper's "-oraclerep" setting);
with goal_mode "image" it is the goal state's 64x64 observation.

Batching: every (w, task, episode) is a row. A fixed set of env slots, spread over spawned worker
processes, runs rows in lockstep: each control step is ONE engine.infer over all live slots, each
row with its own w, then every worker steps its envs; a slot whose episode ended starts the next
pending row. Slots, not rows, bound memory: one visual MuJoCo env holds ~300 MB with its renderer.

Determinism: a row's env seed and its per-step sampling noise depend only on (seed, task, episode),
never on w or on scheduling, so rows that differ only in w share start states and noise (common
random numbers: comparisons between w values are paired, hence sharper).

`summarize` and `write_report` are separate so that other evaluators (the ROS one) produce the
same JSON, CSV, Markdown table and plot from their own episode records.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco, here or in the workers

import numpy as np
import torch
from tqdm import tqdm

import cfgrl_ros
from cfgrl_ros.checkpoint import CheckpointError
from cfgrl_ros.engines import BACKENDS, Engine, EngineUnavailable, load_engine, to_numpy
from cfgrl_ros.policy import PolicyConfig
from cfgrl_ros.sim import seed_goal_setup
from training.pointreach import NUM_TASKS as POINTREACH_TASKS
from training.pointreach import PointReachBatch, PointReachConfig

POINTREACH = "pointreach"
OGBENCH_TASKS = 5
Z_95 = 1.959963984540054
DEFAULT_WS = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0)
WORKER_REPLY_TIMEOUT_S = 600.0  # an env worker silent this long is stuck (a 16-env reset on a loaded CPU takes < 60 s)
REPORT_FILES = {"json": "results.json", "csv": "results.csv", "markdown": "results.md", "plot": "success_vs_w.png"}


class EvaluationError(RuntimeError):
    """The checkpoint and the environment do not fit together, or an env worker failed; through ROS
    (training/ros_evaluate.py), also: the nodes did not come up, refused a parameter, or an episode
    did not finish in time."""


class SweepSettingsError(EvaluationError, ValueError):
    """A setting of the sweep no evaluation can run with (checked before any env starts)."""


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What a worker needs to build its envs (picklable, for spawned processes)."""

    name: str
    goal_mode: str
    image_size: int
    max_steps: int


# ---------------------------------------------------------------------------------------------
# Environments: one batch of envs per worker, addressed by index.


class OGBenchBatch:
    """OGBench gymnasium envs with PointReachBatch's interface: reset/step the envs at `indices`."""

    def __init__(self, spec: EnvSpec, num_envs: int):
        import gymnasium
        import ogbench  # noqa: F401  (registers the OGBench env ids with gymnasium)

        self.envs = [gymnasium.make(spec.name, use_oracle_rep=spec.goal_mode == "oracle",
                                    max_episode_steps=spec.max_steps) for _ in range(num_envs)]
        self.goal_dtype = np.float32 if spec.goal_mode == "oracle" else np.uint8
        self.action_dim = int(self.envs[0].action_space.shape[0])

    def reset(self, indices: np.ndarray, task_ids: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        observations, goals = [], []
        for index, task_id, seed in zip(indices, task_ids, seeds):
            env = self.envs[index]
            seed_goal_setup(env, int(seed))  # the goal set-up's random arm moves, seeded too
            observation, info = env.reset(seed=int(seed), options=dict(task_id=int(task_id), render_goal=True))
            observations.append(observation)
            goals.append(np.asarray(info["goal"], dtype=self.goal_dtype))
        return np.stack(observations), np.stack(goals)

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        observations, successes, dones = [], [], []
        for index, action in zip(indices, actions):
            observation, _, terminated, truncated, info = self.envs[index].step(action)
            observations.append(observation)
            successes.append(bool(info["success"]))
            dones.append(terminated or truncated)
        return np.stack(observations), np.array(successes), np.array(dones)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def make_env_batch(spec: EnvSpec, num_envs: int) -> OGBenchBatch | PointReachBatch:
    if spec.name == POINTREACH:
        config = PointReachConfig(image_size=spec.image_size, max_episode_steps=spec.max_steps)
        return PointReachBatch(num_envs, spec.goal_mode, config)
    return OGBenchBatch(spec, num_envs)


def episode_limit(env_name: str) -> int:
    """The env's own episode length: OGBench's registered max_episode_steps, or PointReach's."""
    if env_name == POINTREACH:
        return PointReachConfig.max_episode_steps
    import gymnasium
    import ogbench  # noqa: F401

    try:
        limit = gymnasium.spec(env_name).max_episode_steps
    except gymnasium.error.Error as error:
        raise EvaluationError(f"unknown env {env_name!r} ({error}); use an OGBench env id such as "
                              f"visual-cube-single-v0, or '{POINTREACH}'") from error
    if not limit:
        raise EvaluationError(f"{env_name} registers no max_episode_steps; pass max_steps")
    return limit


def num_env_tasks(env_name: str) -> int:
    return POINTREACH_TASKS if env_name == POINTREACH else OGBENCH_TASKS


def _worker_main(connection: Any, spec: EnvSpec, num_envs: int) -> None:
    """Worker process: build the envs, then answer (command, args) messages until 'close'."""
    try:
        batch = make_env_batch(spec, num_envs)
        connection.send(("ok", batch.action_dim))
    except Exception:  # report instead of dying silently: the parent raises it with the traceback
        connection.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            command, args = connection.recv()
            if command == "close":
                break
            try:
                connection.send(("ok", getattr(batch, command)(*args)))
            except Exception:
                connection.send(("error", traceback.format_exc()))
    finally:
        batch.close()


class EnvPool:
    """`num_slots` envs, in this process (workers=0) or split into contiguous ranges over spawned workers.

    reset(slots, task_ids, seeds) and step(slots, actions) act on the given slots only and return
    arrays in the same order; each worker steps its own envs while the others step theirs.
    """

    def __init__(self, spec: EnvSpec, num_slots: int, workers: int):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.local = make_env_batch(spec, num_slots) if workers == 0 else None
        self.action_dim = self.local.action_dim if self.local is not None else 0
        ranges = np.array_split(np.arange(num_slots), max(1, min(workers, num_slots)))
        self.starts = np.array([r[0] for r in ranges])
        self.connections, self.processes = [], []
        if self.local is not None:
            return
        context = mp.get_context("spawn")  # fork would copy torch threads and EGL state
        try:
            for slots in ranges:
                parent, child = context.Pipe()
                process = context.Process(target=_worker_main, args=(child, spec, len(slots)), daemon=True)
                process.start()
                child.close()
                self.connections.append(parent)
                self.processes.append(process)
            for worker in range(len(self.connections)):
                self.action_dim = self._receive(worker)  # each worker reports once its envs are built
        except BaseException:
            self.close()
            raise

    def reset(self, slots: np.ndarray, task_ids: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._call("reset", slots, task_ids, seeds)

    def step(self, slots: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._call("step", slots, actions)

    def _call(self, command: str, slots: np.ndarray, *per_slot: np.ndarray) -> tuple[np.ndarray, ...]:
        slots = np.asarray(slots, dtype=np.int64)
        if self.local is not None:
            return getattr(self.local, command)(slots, *per_slot)
        owners = np.searchsorted(self.starts, slots, side="right") - 1
        groups = [(worker, owners == worker) for worker in np.unique(owners)]
        for worker, mask in groups:  # send everything first so that the workers run in parallel
            local = slots[mask] - self.starts[worker]
            self.connections[worker].send((command, (local, *(np.asarray(a)[mask] for a in per_slot))))
        parts = [(mask, self._receive(worker)) for worker, mask in groups]
        outputs = []
        for position in range(len(parts[0][1])):
            first = parts[0][1][position]
            out = np.empty((len(slots), *first.shape[1:]), dtype=first.dtype)
            for mask, result in parts:
                out[mask] = result[position]
            outputs.append(out)
        return tuple(outputs)

    def _receive(self, worker: int) -> Any:
        connection, process = self.connections[worker], self.processes[worker]
        waited = 0.0
        while not connection.poll(1.0):  # a worker stuck in native code (EGL, MuJoCo) must not hang the sweep
            waited += 1.0
            if not process.is_alive():
                break  # recv() below reports the death
            if waited >= WORKER_REPLY_TIMEOUT_S:
                raise EvaluationError(f"env worker {worker} sent nothing for {WORKER_REPLY_TIMEOUT_S:g} s: stuck "
                                      "(in rendering or physics?)")
        try:
            status, payload = connection.recv()
        except EOFError as error:
            self.processes[worker].join(timeout=5)
            code = self.processes[worker].exitcode
            raise EvaluationError(f"env worker {worker} died (exit code {code})") from error
        if status == "error":
            raise EvaluationError(f"env worker {worker} failed:\n{payload}")
        return payload

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        for connection in self.connections:
            try:
                connection.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 30.0  # for all workers together, not 30 s each
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The lockstep sweep.


ENV_STREAM, NOISE_STREAM = 0, 1  # independent seed streams derived from the one --seed


def derived_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def episode_seed(seed: int, task: int, episode: int) -> int:
    """Env seed of one (task, episode), shared by every w."""
    return derived_seed(seed, ENV_STREAM, task, episode)


def sampling_noise(seed: int, tasks: Sequence[int], episodes: int, max_steps: int, action_dim: int) -> torch.Tensor:
    """(len(tasks), episodes, max_steps, action_dim) initial flow noise; each task's block depends only on its id."""
    blocks = []
    for task in tasks:
        generator = torch.Generator().manual_seed(derived_seed(seed, NOISE_STREAM, task))
        blocks.append(torch.randn(episodes, max_steps, action_dim, generator=generator))
    return torch.stack(blocks)


def default_workers(env_name: str) -> int:
    """PointReach is vectorised numpy: it runs in this process. OGBench envs get one worker per core."""
    return 0 if env_name == POINTREACH else min(os.cpu_count() or 1, 16)


def default_envs_per_worker(env_name: str, num_rows: int) -> int:
    """All rows at once for PointReach; 4 MuJoCo envs (~1.2 GB with renderers) per OGBench worker."""
    return num_rows if env_name == POINTREACH else 4


def check_env_fits(observations: np.ndarray, goals: np.ndarray, action_dim: int, config: PolicyConfig,
                   env_name: str) -> None:
    """EvaluationError unless the env's observations, goals and actions have the checkpoint's shapes."""
    if action_dim != config.action_dim:
        raise EvaluationError(f"{env_name} takes {action_dim}-d actions, but the checkpoint gives "
                              f"{config.action_dim}-d ones (was it trained on another env?)")
    expected = (config.image_size, config.image_size, 3)
    if observations.dtype != np.uint8 or observations.shape[1:] != expected:
        raise EvaluationError(f"{env_name} gives observations {observations.dtype} {observations.shape[1:]}, "
                              f"but the checkpoint expects uint8 {expected}")
    goal_shape = (config.goal_dim,) if config.goal_mode == "oracle" else expected
    if goals.shape[1:] != goal_shape:
        raise EvaluationError(f"{env_name} gives {config.goal_mode} goals of shape {goals.shape[1:]}, but the "
                              f"checkpoint expects {goal_shape} (was it trained on another env?)")


def check_checkpoint_fits_env(config: PolicyConfig, spec: EnvSpec) -> None:
    """check_env_fits on one reset of one env, for evaluators that run the envs elsewhere (the ROS nodes)."""
    batch = make_env_batch(spec, 1)
    try:
        observations, goals = batch.reset(np.array([0]), np.array([1]), np.array([0], np.uint64))
        check_env_fits(observations, goals, batch.action_dim, config, spec.name)
    finally:
        batch.close()


class LockstepSweep:
    """Runs rows (w, task, episode) on the pool's env slots in lockstep; a freed slot takes the next row."""

    def __init__(self, engine: Engine, pool: EnvPool, num_slots: int, rows: list[tuple[float, int, int]],
                 tasks: list[int], seed: int, flow_steps: int, max_steps: int, env_name: str):
        self.engine, self.pool, self.rows, self.seed = engine, pool, rows, seed
        self.flow_steps, self.max_steps, self.env_name = flow_steps, max_steps, env_name
        self.row_w = torch.tensor([w for w, _, _ in rows], dtype=torch.float32)
        self.row_task_index = torch.tensor([tasks.index(task) for _, task, _ in rows])
        self.row_episode = torch.tensor([episode for _, _, episode in rows])
        episodes_per_task = max(episode for _, _, episode in rows) + 1
        self.noise = sampling_noise(seed, tasks, episodes_per_task, max_steps, engine.config.action_dim)
        self.slot_row = np.full(num_slots, -1)  # -1: idle
        self.slot_step = np.zeros(num_slots, dtype=np.int64)
        self.observations: np.ndarray | None = None
        self.goals: np.ndarray | None = None
        self.next_row, self.env_steps = 0, 0
        self.episodes: list[dict] = []

    def start_rows(self, slots: np.ndarray) -> None:
        slots = slots[: len(self.rows) - self.next_row]
        if len(slots) == 0:
            return
        new_rows = np.arange(self.next_row, self.next_row + len(slots))
        self.next_row += len(slots)
        task_ids = np.array([self.rows[r][1] for r in new_rows])
        seeds = np.array([episode_seed(self.seed, self.rows[r][1], self.rows[r][2]) for r in new_rows], np.uint64)
        observations, goals = self.pool.reset(slots, task_ids, seeds)
        if self.observations is None:
            check_env_fits(observations, goals, self.pool.action_dim, self.engine.config, self.env_name)
            self.observations = np.empty((len(self.slot_row), *observations.shape[1:]), observations.dtype)
            self.goals = np.empty((len(self.slot_row), *goals.shape[1:]), goals.dtype)
        self.observations[slots], self.goals[slots] = observations, goals
        self.slot_row[slots], self.slot_step[slots] = new_rows, 0

    def step(self) -> int:
        """One control step of every live slot: one batched inference, then the env steps; returns episodes ended."""
        live = np.flatnonzero(self.slot_row >= 0)
        rows = torch.from_numpy(self.slot_row[live])
        noise = self.noise[self.row_task_index[rows], self.row_episode[rows], torch.from_numpy(self.slot_step[live])]
        actions = self.engine.infer(torch.from_numpy(self.observations[live]), torch.from_numpy(self.goals[live]),
                                    self.row_w[rows], noise, self.flow_steps)
        actions = to_numpy(actions)
        if not np.isfinite(actions).all():  # garbage into the simulator would score as plain failures
            raise EvaluationError(f"the policy gave non-finite actions on {self.env_name} (engine {self.engine.name}); "
                                  "an fp16 overflow or a diverged checkpoint?")
        observations, successes, dones = self.pool.step(live, actions)
        self.observations[live] = observations
        self.slot_step[live] += 1
        self.env_steps += len(live)
        if (self.slot_step[live][~dones] >= self.max_steps).any():
            raise EvaluationError(f"{self.env_name} did not end an episode after max_steps={self.max_steps} steps")
        finished = live[dones]
        for slot, success in zip(finished, successes[dones]):
            w, task, episode = self.rows[self.slot_row[slot]]
            self.episodes.append(dict(w=w, task=task, episode=episode, success=bool(success),
                                      steps=int(self.slot_step[slot])))
        self.slot_row[finished] = -1
        self.start_rows(finished)
        return len(finished)

    @property
    def live(self) -> int:
        return int((self.slot_row >= 0).sum())


def check_sweep(env_name: str, ws: Sequence[float], tasks: Sequence[int], episodes_per_task: int, flow_steps: int,
                seed: int, workers: int | None, envs_per_worker: int | None, max_steps: int | None) -> None:
    """Refuse settings that cannot give a valid sweep, before the policy or any env is touched."""
    problems = []
    if not ws or not all(math.isfinite(w) for w in ws):
        problems.append(f"w must be finite numbers, got {list(ws)}")
    elif len({float(w) for w in ws}) != len(ws):  # one w twice runs the same episodes twice: 2N "trials"
        problems.append(f"w values must be distinct, got {list(ws)}")
    if not tasks or len(set(tasks)) != len(tasks) or not all(1 <= t <= num_env_tasks(env_name) for t in tasks):
        problems.append(f"tasks must be distinct ids in 1..{num_env_tasks(env_name)}, got {list(tasks)}")
    for name, value, low in (("episodes_per_task", episodes_per_task, 1), ("flow_steps", flow_steps, 1),
                             ("seed", seed, 0), ("workers", workers, 0), ("envs_per_worker", envs_per_worker, 1),
                             ("max_steps", max_steps, 1)):
        if value is not None and value < low:
            problems.append(f"{name} must be >= {low}, got {value}")
    if problems:
        raise SweepSettingsError("; ".join(problems))


def evaluate(
    engine: Engine,
    env_name: str,
    ws: Sequence[float] = DEFAULT_WS,
    *,
    episodes_per_task: int = 50,
    tasks: Sequence[int] = (1, 2, 3, 4, 5),
    workers: int | None = None,
    envs_per_worker: int | None = None,
    flow_steps: int = 16,
    seed: int = 0,
    max_steps: int | None = None,
    checkpoint: str = "",
    progress: bool = True,
    partial_path: str | os.PathLike | None = None,
) -> dict:
    """Run every (w, task, episode) of the sweep and return `summarize`'s results dict.

    Interrupted (Ctrl-C, or `timeout`'s SIGINT), it first writes what it has to `partial_path` if
    given (see `partial_results`), then raises KeyboardInterrupt again.
    """
    ws = [float(w) for w in ws]
    tasks = [int(task) for task in tasks]
    check_sweep(env_name, ws, tasks, episodes_per_task, flow_steps, seed, workers, envs_per_worker, max_steps)
    max_steps = max_steps or episode_limit(env_name)
    spec = EnvSpec(env_name, engine.config.goal_mode, engine.config.image_size, max_steps)
    # Episode-major order: the first rows to finish cover every task and w.
    rows = [(w, task, episode) for episode in range(episodes_per_task) for task in tasks for w in ws]
    workers = default_workers(env_name) if workers is None else workers
    per_worker = envs_per_worker or default_envs_per_worker(env_name, len(rows))
    num_slots = min(len(rows), max(1, workers) * per_worker)

    start = time.perf_counter()
    with EnvPool(spec, num_slots, workers) as pool, \
            tqdm(total=len(rows), desc=f"eval {env_name}", unit="episode", disable=not progress) as bar:
        sweep = LockstepSweep(engine, pool, num_slots, rows, tasks, seed, flow_steps, max_steps, env_name)
        sweep.start_rows(np.arange(num_slots))
        stepping_start = time.perf_counter()  # env steps/s counts the loop, not the workers' start-up
        try:
            while sweep.live:
                bar.update(sweep.step())
                rate = sweep.env_steps / (time.perf_counter() - stepping_start)
                bar.set_postfix(live=sweep.live, env_steps_s=f"{rate:.1f}")
        except KeyboardInterrupt:
            if partial_path is not None:
                Path(partial_path).parent.mkdir(parents=True, exist_ok=True)
                Path(partial_path).write_text(json.dumps(partial_results(sweep.episodes, ws, tasks), indent=1))
            raise
    now = time.perf_counter()
    episodes = sorted(sweep.episodes, key=lambda e: (e["w"], e["task"], e["episode"]))
    return summarize(
        episodes, env=env_name, checkpoint=str(checkpoint), goal_mode=engine.config.goal_mode,
        backend=engine.name, device=str(engine.device), flow_steps=flow_steps, seed=seed,
        episodes_per_task=episodes_per_task, max_steps=max_steps, workers=workers, env_slots=num_slots,
        wall_time_s=round(now - start, 3), env_steps=sweep.env_steps,
        env_steps_per_s=round(sweep.env_steps / (now - stepping_start), 2),
    )


def partial_results(episodes: Sequence[Mapping[str, Any]], ws: Sequence[float], tasks: Sequence[int]) -> dict:
    """Success per w over the complete episode rounds of an interrupted sweep.

    Only rounds k in which every (w, task) episode k finished count: successful episodes end early, so
    all finished episodes would overstate success. Rounds run in order, so the first ones complete first.
    """
    done = {(e["w"], e["task"], e["episode"]): e["success"] for e in episodes}
    rounds = 0
    while all((w, task, rounds) in done for w in ws for task in tasks):
        rounds += 1
    per_w = {}
    for w in ws:
        successes = sum(done[(w, task, k)] for task in tasks for k in range(rounds))
        per_w[f"{w:g}"] = proportion(int(successes), rounds * len(tasks)) if rounds else None
    return {"partial": True, "complete_rounds": rounds, "episodes_finished": len(episodes),
            "episodes_per_w": rounds * len(tasks), "overall": per_w}


# ---------------------------------------------------------------------------------------------
# Statistics and the report.


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sound at 0 and n successes, unlike Wald's)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def proportion(successes: int, trials: int) -> dict:
    low, high = wilson_interval(successes, trials)
    return {"successes": successes, "episodes": trials, "rate": successes / trials, "ci95": [low, high]}


def summarize(episodes: Sequence[Mapping[str, Any]], **metadata: Any) -> dict:
    """Results dict from episode records {w, task, episode, success, ...}; metadata is copied in.

    Per w and task: successes, episodes, rate, Wilson 95% CI. Overall: OGBench's score, the mean of
    the task rates, with the Wilson CI of all its episodes pooled, which is the same proportion
    because every cell must have as many episodes.
    """
    if not episodes:
        raise ValueError("no episodes to summarize")
    ws = sorted({float(e["w"]) for e in episodes})
    tasks = sorted({int(e["task"]) for e in episodes})
    results = []
    for w in ws:
        per_task = []
        for task in tasks:
            outcomes = [bool(e["success"]) for e in episodes if float(e["w"]) == w and int(e["task"]) == task]
            if not outcomes:
                raise ValueError(f"no episodes for w={w}, task {task}: every w needs every task")
            per_task.append({"task": task, **proportion(sum(outcomes), len(outcomes))})
        if len({t["episodes"] for t in per_task}) > 1:
            raise ValueError(f"w={w}: unequal episodes per task {[t['episodes'] for t in per_task]}: the pooled "
                             "interval would not be the interval of the mean of the task rates")
        pooled = proportion(sum(t["successes"] for t in per_task), sum(t["episodes"] for t in per_task))
        pooled["rate"] = float(np.mean([t["rate"] for t in per_task]))
        results.append({"w": w, "tasks": per_task, "overall": pooled})
    return {**metadata, "ws": ws, "tasks": tasks, "results": results, "episodes": [dict(e) for e in episodes]}


def format_cell(stats: Mapping[str, Any]) -> str:
    low, high = stats["ci95"]
    return f"{100 * stats['rate']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown_table(results: Mapping[str, Any]) -> str:
    tasks = results["tasks"]
    header = ["w", *(f"task {t}" for t in tasks), "overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in results["results"]:
        cells = [f"{row['w']:g}", *(format_cell(t) for t in row["tasks"]), format_cell(row["overall"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_report_dir(checkpoint: str | os.PathLike, kind: str, env_name: str) -> Path:
    """<checkpoint dir>/<kind>-<env>, or runs/<stem>/<kind>-<env> here for a checkpoint shipped in the package
    (the embedded default): reports and logs never land inside the installed package."""
    path = Path(checkpoint).resolve()
    if path.is_relative_to(Path(cfgrl_ros.__file__).resolve().parent):
        return Path("runs") / path.stem / f"{kind}-{env_name}"
    return Path(checkpoint).parent / f"{kind}-{env_name}"


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.csv, results.md and success_vs_w.png into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    with open(paths["csv"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["w", "task", "successes", "episodes", "rate", "ci95_low", "ci95_high"])
        for row in results["results"]:
            for task, stats in [*((t["task"], t) for t in row["tasks"]), ("overall", row["overall"])]:
                writer.writerow([row["w"], task, stats["successes"], stats["episodes"], f"{stats['rate']:.6f}",
                                 f"{stats['ci95'][0]:.6f}", f"{stats['ci95'][1]:.6f}"])
    title = f"Success rate (%) against guidance weight w: {results.get('env', '?')}"
    episodes = results["results"][0]["tasks"][0]["episodes"]
    notes = (f"{episodes} episodes per task and w; 95% Wilson intervals in brackets; overall = mean over tasks."
             + (f" Checkpoint: `{results['checkpoint']}`." if results.get("checkpoint") else ""))
    paths["markdown"].write_text(f"# {title}\n\n{notes}\n\n{markdown_table(results)}\n")
    plot_success(results, paths["plot"], title)
    return paths


def plot_success(results: Mapping[str, Any], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg when saving

    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    axes = figure.subplots()
    ws = np.array([row["w"] for row in results["results"]])
    for index, task in enumerate(results["tasks"]):
        rates = [100 * row["tasks"][index]["rate"] for row in results["results"]]
        axes.plot(ws, rates, marker=".", linewidth=0.8, alpha=0.45, label=f"task {task}")
    overall = results["results"]
    rates = np.array([100 * row["overall"]["rate"] for row in overall])
    bounds = np.array([[100 * b for b in row["overall"]["ci95"]] for row in overall])
    errors = np.clip(np.stack([rates - bounds[:, 0], bounds[:, 1] - rates]), 0, None)
    axes.errorbar(ws, rates, yerr=errors, color="black", marker="o", capsize=4, linewidth=2, label="overall (95% CI)")
    axes.set(xlabel="guidance weight w", ylabel="success rate (%)", ylim=(-2, 102), title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfgrl-evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a cfgrl_ros .safetensors checkpoint")
    parser.add_argument("--env", required=True, help=f"OGBench env id (visual-cube-single-v0, ...) or '{POINTREACH}'")
    parser.add_argument("--w", type=float, nargs="+", default=list(DEFAULT_WS),
                        help=f"guidance weights to sweep (default: {' '.join(f'{w:g}' for w in DEFAULT_WS)})")
    parser.add_argument("--episodes-per-task", type=int, default=50, help="episodes per task and w (default: 50)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="OGBench evaluation task ids (default: 1 2 3 4 5)")
    parser.add_argument("--workers", type=int, default=None,
                        help="env worker processes (0: in this process); default: one per core (at most 16) "
                             "for OGBench, 0 for pointreach")
    parser.add_argument("--envs-per-worker", type=int, default=None,
                        help="live envs per worker; default 4 for OGBench, every row for pointreach")
    parser.add_argument("--backend", default="torch",
                        help=f"inference engine: {', '.join((*BACKENDS, 'auto'))} (default: torch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda where there is one, else cpu)")
    parser.add_argument("--flow-steps", type=int, default=16, help="Euler steps per action (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the envs' resets and the sampling noise (default: 0)")
    parser.add_argument("--max-steps", type=int, default=None, help="episode limit override (short CI runs)")
    parser.add_argument("--out-dir", default=None,
                        help="default: <checkpoint dir>/eval-<env> (runs/<name>/eval-<env> for the embedded policy)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir or default_report_dir(args.checkpoint, "eval", args.env))
    try:
        check_sweep(args.env, args.w, args.tasks, args.episodes_per_task, args.flow_steps, args.seed, args.workers,
                    args.envs_per_worker, args.max_steps)
        if args.backend not in (*BACKENDS, "auto"):
            raise EvaluationError(f"--backend {args.backend!r}: choose from {', '.join((*BACKENDS, 'auto'))}")
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            raise EvaluationError(f"--device {args.device!r} is not a torch device ({error})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EvaluationError(f"--device {args.device}: no CUDA device here (use --device cpu)")
        out_dir.mkdir(parents=True, exist_ok=True)  # before the sweep: a report that cannot be written is lost work
        engine = load_engine(args.checkpoint, args.backend, args.device, flow_steps=args.flow_steps)
        results = evaluate(
            engine, args.env, args.w, episodes_per_task=args.episodes_per_task, tasks=args.tasks,
            workers=args.workers, envs_per_worker=args.envs_per_worker, flow_steps=args.flow_steps, seed=args.seed,
            max_steps=args.max_steps, checkpoint=args.checkpoint,
        )
        paths = write_report(results, out_dir)
    except (EvaluationError, CheckpointError, EngineUnavailable, OSError) as error:
        raise SystemExit(f"cfgrl-evaluate: error: {error}") from None
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
