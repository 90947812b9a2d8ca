"""PointReach: a tiny, fast 2-D reaching task with rendered images, for testing CFGRL in CI time.

A dot moves in the unit square; the action (2-D, in [-1, 1]) is its velocity, `max_speed` per
step at full deflection, and walls clip the position. Observations are images of the dot alone on a
plain background (the goal is never drawn), rendered with numpy for a whole batch at once. The
oracle goal representation is the position, centred and scaled (dim 2, like OGBench's maze
"-oraclerep" goals, the agent's x-y); an image goal is the rendering of the goal position.

Evaluation mirrors OGBench: 5 fixed tasks (start, goal), a small seeded perturbation of the start,
`terminated` once the dot is within `goal_radius` of the goal, `truncated` at `max_episode_steps`,
success = info['success'] at the episode's last step. training/evaluate.py runs it through the same
code path as the OGBench envs (PointReachBatch has the env workers' reset/step interface).

The demonstrations are deliberately suboptimal: a dot wandering between random waypoints with a
pull of 0.5 toward the current one under action noise of std 1.0. Goal-conditioned BC (w=1) learns
only a weak pull toward a hindsight goal and is too slow to arrive within 30 steps; guidance (w>1)
amplifies the pull. Measured (16x16 images, 3000 training steps, seeds 0-3, 200 episodes per w;
tests/test_central_claim.py): success w=0 / w=1 / w=3 = 0% / 13-24% / 28-69% with the current
null-goal initialisation (the reference's, since 2026-12-03); 0% / 10-23% / 61-73% before. The position scaling matters: with raw [0, 1]
goals the network learned the goal pathway far more slowly.

    python -m training.pointreach --out data/pointreach.npz --image-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

BACKGROUND = np.array([32, 32, 48], dtype=np.float32)
DOT_COLOUR = np.array([255, 170, 40], dtype=np.float32)
ORACLE_SCALE = 4.0

# (start, goal) pairs, each about 0.6-0.7 apart, in different directions and regions.
TASKS = (
    ((0.20, 0.20), (0.70, 0.65)),
    ((0.80, 0.25), (0.30, 0.70)),
    ((0.50, 0.15), (0.50, 0.80)),
    ((0.15, 0.55), (0.80, 0.45)),
    ((0.75, 0.80), (0.25, 0.30)),
)
NUM_TASKS = len(TASKS)


@dataclasses.dataclass(frozen=True)
class PointReachConfig:
    image_size: int = 64
    max_speed: float = 0.04  # position change per step at |action| = 1, per axis
    dot_radius: float = 0.10
    goal_radius: float = 0.08
    max_episode_steps: int = 30
    start_jitter: float = 0.02  # OGBench perturbs evaluation starts slightly too

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {self.max_episode_steps}")


def render(positions: np.ndarray, image_size: int, dot_radius: float = 0.10) -> np.ndarray:
    """(B, 2) positions in [0,1]^2 -> (B, S, S, 3) uint8 images of an antialiased dot; y points up."""
    positions = np.asarray(positions, dtype=np.float32)
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    dx = centres[None, None, :] - positions[:, 0, None, None]
    dy = centres[::-1][None, :, None] - positions[:, 1, None, None]  # row 0 is the top
    # Fraction of each pixel the disk covers, linear over one pixel at its edge: sub-pixel positions
    # stay visible even in a 16x16 image.
    coverage = np.clip((dot_radius - np.sqrt(dx * dx + dy * dy)) * image_size + 0.5, 0.0, 1.0)
    images = BACKGROUND + coverage[..., None] * (DOT_COLOUR - BACKGROUND)
    return np.rint(images).astype(np.uint8)


def oracle_representation(positions: np.ndarray) -> np.ndarray:
    """The oracle goal vector of a state: its position, centred and scaled to about [-2, 2] the way
    OGBench scales cube positions ((xyz - centre) * 10), so that it is O(1) like the network's other inputs."""
    return ((np.asarray(positions, dtype=np.float32) - 0.5) * ORACLE_SCALE).astype(np.float32)


def move(positions: np.ndarray, actions: np.ndarray, max_speed: float) -> np.ndarray:
    """One step of the dynamics: velocity control, clipped to the unit square."""
    return np.clip(positions + max_speed * np.clip(actions, -1.0, 1.0), 0.0, 1.0)


class PointReachBatch:
    """A batch of evaluation envs, with the interface of the evaluator's env workers.

    Every call names the envs it acts on by index, so finished envs can start new episodes while the
    others run on. `goal_mode` "oracle" gives (n, 2) float32 goal positions, "image" goal images.
    """

    def __init__(self, num_envs: int, goal_mode: str = "oracle", config: PointReachConfig = PointReachConfig()):
        if goal_mode not in ("oracle", "image"):
            raise ValueError(f"goal_mode must be 'oracle' or 'image', got {goal_mode!r}")
        self.num_envs, self.goal_mode, self.config = num_envs, goal_mode, config
        self.action_dim = 2  # a velocity in the plane
        self.positions = np.zeros((num_envs, 2), dtype=np.float32)
        self.goals = np.zeros((num_envs, 2), dtype=np.float32)
        self.steps = np.zeros(num_envs, dtype=np.int64)

    def reset(self, indices: np.ndarray, task_ids: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start episodes of the given tasks (1..5) in envs `indices`; returns (observations, goals)."""
        indices, task_ids = np.asarray(indices, dtype=np.int64), np.asarray(task_ids, dtype=np.int64)
        if len(task_ids) and (task_ids.min() < 1 or task_ids.max() > NUM_TASKS):
            raise ValueError(f"PointReach task ids are 1..{NUM_TASKS}, got {sorted(set(task_ids.tolist()))}")
        starts = np.array([TASKS[k - 1][0] for k in task_ids], dtype=np.float32).reshape(-1, 2)
        jitter = np.array([np.random.default_rng(int(s)).uniform(-1, 1, 2) for s in seeds], np.float32).reshape(-1, 2)
        self.positions[indices] = np.clip(starts + self.config.start_jitter * jitter, 0.0, 1.0)
        self.goals[indices] = np.array([TASKS[k - 1][1] for k in task_ids], dtype=np.float32).reshape(-1, 2)
        self.steps[indices] = 0
        goal_positions = self.goals[indices]
        goals = oracle_representation(goal_positions) if self.goal_mode == "oracle" else self.render(goal_positions)
        return self.render(self.positions[indices]), goals

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step envs `indices`; returns (observations, successes, dones) for them."""
        indices = np.asarray(indices, dtype=np.int64)
        self.positions[indices] = move(self.positions[indices], np.asarray(actions, np.float32), self.config.max_speed)
        self.steps[indices] += 1
        successes = np.linalg.norm(self.positions[indices] - self.goals[indices], axis=-1) <= self.config.goal_radius
        dones = successes | (self.steps[indices] >= self.config.max_episode_steps)
        return self.render(self.positions[indices]), successes, dones

    def render(self, positions: np.ndarray) -> np.ndarray:
        return render(positions, self.config.image_size, self.config.dot_radius)

    def close(self) -> None:
        """Nothing to release (numpy arrays only); here so every env batch closes the same way."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Suboptimal demonstrations: noisy, slow wandering between random waypoints."""

    episodes: int = 800
    episode_length: int = 50
    waypoint_gain: float = 0.5  # mean action toward the current waypoint (|action| <= 1)
    action_noise: float = 1.0  # std of the Gaussian noise added to each action component
    switch_probability: float = 0.05  # per step; a waypoint is also replaced once reached
    waypoint_reached: float = 0.05


def generate_demonstrations(demo: DemoConfig, env: PointReachConfig, seed: int) -> dict[str, np.ndarray]:
    """OGBench-format arrays; oracle_reps[i] is the oracle goal representation OF row i's state."""
    rng = np.random.default_rng(seed)
    n, length = demo.episodes, demo.episode_length
    positions = rng.uniform(0.05, 0.95, (n, 2)).astype(np.float32)
    waypoints = rng.uniform(0.0, 1.0, (n, 2)).astype(np.float32)
    all_positions = np.empty((length, n, 2), np.float32)
    all_actions = np.empty((length, n, 2), np.float32)
    all_velocities = np.empty((length, n, 2), np.float32)
    for t in range(length):
        offsets = waypoints - positions
        distances = np.linalg.norm(offsets, axis=-1, keepdims=True)
        switch = (distances[:, 0] < demo.waypoint_reached) | (rng.random(n) < demo.switch_probability)
        waypoints = np.where(switch[:, None], rng.uniform(0.0, 1.0, (n, 2)), waypoints).astype(np.float32)
        offsets = waypoints - positions
        direction = offsets / np.maximum(np.linalg.norm(offsets, axis=-1, keepdims=True), 1e-6)
        actions = np.clip(demo.waypoint_gain * direction + demo.action_noise * rng.standard_normal((n, 2)), -1, 1)
        all_positions[t], all_actions[t] = positions, actions
        positions = move(positions, actions, env.max_speed).astype(np.float32)
        all_velocities[t] = positions - all_positions[t]
    # Episode-major rows, as OGBench stores them; the last row of an episode ends it.
    qpos, actions, qvel = (array.transpose(1, 0, 2).reshape(n * length, 2)
                           for array in (all_positions, all_actions, all_velocities))
    terminals = np.zeros(n * length, dtype=bool)
    terminals[length - 1 :: length] = True
    return {
        "observations": render(qpos, env.image_size, env.dot_radius),
        "actions": actions,
        "terminals": terminals,
        "qpos": qpos,
        "qvel": qvel,  # per-step displacement (walls included)
        "oracle_reps": oracle_representation(qpos),
    }


def write_dataset(path: str | Path, demo: DemoConfig = DemoConfig(), env: PointReachConfig = PointReachConfig(),
                  seed: int = 0, val_fraction: float = 0.1) -> Path:
    """Write `<name>.npz` and `<name>-val.npz` (about `val_fraction` as many episodes, another seed)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"dataset path must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    val_demo = dataclasses.replace(demo, episodes=max(1, round(demo.episodes * val_fraction)))
    np.savez_compressed(path, **generate_demonstrations(demo, env, seed))
    np.savez_compressed(path.with_name(path.stem + "-val.npz"), **generate_demonstrations(val_demo, env, seed + 1))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a suboptimal PointReach dataset in OGBench's format.")
    parser.add_argument("--out", required=True, help="<name>.npz; <name>-val.npz is written beside it")
    parser.add_argument("--episodes", type=int, default=DemoConfig.episodes)
    parser.add_argument("--episode-length", type=int, default=DemoConfig.episode_length)
    parser.add_argument("--image-size", type=int, default=PointReachConfig.image_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    demo = DemoConfig(episodes=args.episodes, episode_length=args.episode_length)
    path = write_dataset(args.out, demo, PointReachConfig(image_size=args.image_size), args.seed)
    print(f"wrote {path} and its -val split")


if __name__ == "__main__":
    main()
