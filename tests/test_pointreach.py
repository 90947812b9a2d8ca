"""PointReach, the toy task of the central-claim test: rendering, dynamics, tasks and its dataset files."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import load_dataset_pair
from training.pointreach import (
    NUM_TASKS, TASKS, DemoConfig, PointReachBatch, PointReachConfig, generate_demonstrations, oracle_representation,
    render, write_dataset,
)


def test_render_draws_the_dot_where_it_is():
    images = render(np.array([[0.25, 0.75], [0.8, 0.1]]), 32)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    for image, (x, y) in zip(images, [(0.25, 0.75), (0.8, 0.1)]):
        brightness = image.astype(float).sum(-1)
        rows, cols = np.nonzero(brightness > brightness.min())
        weights = brightness[rows, cols] - brightness.min()
        # Row 0 is the top: y points up.
        assert np.average(cols + 0.5, weights=weights) / 32 == pytest.approx(x, abs=0.02)
        assert 1 - np.average(rows + 0.5, weights=weights) / 32 == pytest.approx(y, abs=0.02)


def test_render_keeps_sub_pixel_moves_visible_at_16_pixels():
    a, b = render(np.array([[0.5, 0.5], [0.51, 0.5]]), 16)
    assert not np.array_equal(a, b)


def test_batch_reaches_goals_with_straight_actions_and_truncates_otherwise():
    config = PointReachConfig(image_size=16)
    batch = PointReachBatch(2 * NUM_TASKS, "oracle", config)
    task_ids = np.tile(np.arange(1, NUM_TASKS + 1), 2)
    observations, goals = batch.reset(np.arange(2 * NUM_TASKS), task_ids, seeds=np.arange(2 * NUM_TASKS))
    assert observations.shape == (10, 16, 16, 3)
    assert np.allclose(goals, oracle_representation(np.array([TASKS[k - 1][1] for k in task_ids])))
    straight = np.arange(NUM_TASKS)  # the first five head for their goals at full speed, the rest stay
    done = np.zeros(10, bool)
    success = np.zeros(10, bool)
    for _ in range(config.max_episode_steps):
        offsets = batch.goals - batch.positions
        actions = np.zeros((10, 2), np.float32)
        actions[straight] = offsets[straight] / np.abs(offsets[straight]).max(-1, keepdims=True)
        live = np.flatnonzero(~done)
        _, successes, dones = batch.step(live, actions[live])
        success[live], done[live] = successes, dones
    assert done.all() and success[straight].all() and not success[NUM_TASKS:].any()
    assert (batch.steps[NUM_TASKS:] == config.max_episode_steps).all()


def test_image_goals_are_renderings_of_the_goal_position():
    batch = PointReachBatch(1, "image", PointReachConfig(image_size=16))
    _, goals = batch.reset([0], [3], [0])
    assert np.array_equal(goals, render(np.array([TASKS[2][1]]), 16))
    with pytest.raises(ValueError, match="task ids"):
        batch.reset([0], [NUM_TASKS + 1], [0])


def test_dataset_is_ogbench_format_and_loads(tmp_path):
    demo = DemoConfig(episodes=20, episode_length=10)
    path = write_dataset(tmp_path / "toy.npz", demo, PointReachConfig(image_size=16), seed=1)
    with np.load(path) as arrays:
        assert arrays["observations"].shape == (200, 16, 16, 3) and arrays["observations"].dtype == np.uint8
        assert arrays["actions"].dtype == np.float32 and np.abs(arrays["actions"]).max() <= 1.0
        assert arrays["terminals"].dtype == bool and np.flatnonzero(arrays["terminals"]).tolist() == list(range(9, 200, 10))
        # Hindsight goals read oracle_reps[goal_idx]: each row's own state's representation.
        assert np.allclose(arrays["oracle_reps"], oracle_representation(arrays["qpos"]))
        qpos, qvel = arrays["qpos"].reshape(20, 10, 2), arrays["qvel"].reshape(20, 10, 2)
        assert np.allclose(qpos[:, 1:], qpos[:, :-1] + qvel[:, :-1], atol=1e-6)
        assert np.array_equal(arrays["observations"][:5], render(arrays["qpos"][:5], 16))
    train, val = load_dataset_pair(path, cache_dir=tmp_path / "cache")
    assert len(train) == 200 and len(val) == 20 and train.goal_dim("oracle") == 2


def test_demonstrations_are_suboptimal_but_goal_directed():
    """The data must hold a goal signal (or GCBC learns nothing) yet be far from optimal."""
    arrays = generate_demonstrations(DemoConfig(episodes=200), PointReachConfig(image_size=8), seed=0)
    qpos = arrays["qpos"].reshape(200, 50, 2)
    actions = arrays["actions"].reshape(200, 50, 2)
    to_end = qpos[:, -1:] - qpos[:, :-1]
    directions = to_end / np.maximum(np.linalg.norm(to_end, axis=-1, keepdims=True), 1e-6)
    pull = (actions[:, :-1] * directions).sum(-1).mean()
    assert 0.1 < pull < 0.6  # some pull toward the final state, far below a straight path's ~1
