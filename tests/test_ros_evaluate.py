"""The ROS evaluator agrees with the direct evaluator.

Statement: for the same checkpoint, seed and w values, the closed-loop evaluation through the real
policy node and sim node over DDS (training/ros_evaluate.py) gives success rates that agree with
training/evaluate.py within sampling noise. Both run the same episodes (env seeds
episode_seed(seed, task, k), checked), with action noise drawn independently, so per-episode outcomes
may differ; for each w the two rates must pass a two-proportion z-test at |z| < 3.

The checkpoint is a small PointReach policy trained here (16x16 images, ~1000 steps, ~30 s on 2
cores) so that success lies strictly between 0 and 1 at w=3 and the comparison can fail: w=0 (~0%)
against w=3 (~30-40%) also shows that w set through the parameter service takes effect.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from training import pointreach

pytestmark = pytest.mark.requires_rclpy
WS = (0.0, 3.0)
EPISODES_PER_TASK = 6
MAX_STEPS = 40


@pytest.fixture(scope="module")
def pointreach_checkpoint(tmp_path_factory):
    """A small PointReach policy trained with the project's flow-matching loss and batch sampler."""
    from cfgrl_ros.checkpoint import save_checkpoint
    from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig
    from training.data import GoalBatchSampler, load_dataset

    directory = tmp_path_factory.mktemp("pointreach")
    env = pointreach.PointReachConfig(image_size=16)
    path = pointreach.write_dataset(directory / "pr.npz", pointreach.DemoConfig(episodes=100), env)
    sampler = GoalBatchSampler(load_dataset(path), "oracle", 128, "cpu", seed=0, p_aug=0.0)
    torch.manual_seed(0)
    policy = CFGRLPolicy(PolicyConfig(action_dim=2, goal_dim=2, image_size=16, encoder_channels=(8, 8, 8),
                                      encoder_dim=64, hidden_dims=(128, 128)))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fastest for this size on a shared 2-core machine
    try:
        for _ in range(1000):
            loss = policy.flow_matching_loss(sampler.sample(augment=False))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return save_checkpoint(directory / "policy.safetensors", policy.eval())


def two_proportion_z(successes_a: int, successes_b: int, trials: int) -> float:
    pooled = (successes_a + successes_b) / (2 * trials)
    if pooled in (0.0, 1.0):
        return 0.0 if successes_a == successes_b else math.inf
    return (successes_a - successes_b) / (trials * math.sqrt(pooled * (1 - pooled) * 2 / trials))


def test_ros_evaluation_agrees_with_the_direct_evaluator(pointreach_checkpoint, ros_env, tmp_path):
    from cfgrl_ros.engines import load_engine
    from training.evaluate import episode_seed, evaluate, write_report
    from training.ros_evaluate import evaluate_through_ros

    direct = evaluate(load_engine(str(pointreach_checkpoint), "torch", "cpu"), "pointreach", WS,
                      episodes_per_task=EPISODES_PER_TASK, seed=0, max_steps=MAX_STEPS, progress=False)
    ros = evaluate_through_ros(str(pointreach_checkpoint), "pointreach", WS, episodes_per_task=EPISODES_PER_TASK,
                               seed=0, max_steps=MAX_STEPS, log_dir=tmp_path / "logs", env=ros_env, progress=False)

    # The same episodes: every (w, task, k) with the direct evaluator's env seed.
    assert sorted((e["w"], e["task"], e["episode"]) for e in ros["episodes"]) == \
        sorted((e["w"], e["task"], e["episode"]) for e in direct["episodes"])
    assert all(e["seed"] == episode_seed(0, e["task"], e["episode"]) for e in ros["episodes"])
    assert all(e["steps"] <= MAX_STEPS for e in ros["episodes"])

    trials = 5 * EPISODES_PER_TASK
    summary = {}
    for row_direct, row_ros in zip(direct["results"], ros["results"]):
        assert row_direct["w"] == row_ros["w"]
        a, b = row_direct["overall"]["successes"], row_ros["overall"]["successes"]
        summary[row_direct["w"]] = (a, b, two_proportion_z(a, b, trials))
    print("w: (direct successes, ROS successes, z) of", trials, summary)
    assert all(abs(z) < 3 for _, _, z in summary.values()), summary
    # The comparison has teeth: success is neither 0 nor 1 at w=3, and w=0 differs from it.
    assert 0 < summary[3.0][0] < trials and summary[0.0][0] < summary[3.0][0]

    # The ROS results produce the direct evaluator's report files and table.
    paths = write_report(ros, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["evaluator"] == "ros"
    assert "| w | task 1 | task 2 | task 3 | task 4 | task 5 | overall |" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 0


def test_command_line_mistakes_are_one_line_errors(ros_env, tmp_path, capsys):
    from training import ros_evaluate

    default_policy = Path(__file__).resolve().parents[1] / "cfgrl_ros" / "data" / "default_policy.safetensors"
    (tmp_path / "cut.safetensors").write_bytes(b"\x00" * 10)
    for argv, message in ((["--policy", str(tmp_path / "cut.safetensors"), "--env", "pointreach"], "cut.safetensors"),
                          (["--policy", str(default_policy), "--env", "pointreech"],
                           "unknown env 'pointreech'"),
                          # the embedded PointReach policy on the cube arm: refused, not a 900 s hang
                          (["--policy", str(default_policy), "--env", "visual-cube-single-v0"],
                           "takes 5-d actions, but the checkpoint gives 2-d"),
                          # the direct evaluator's sweep checks: no 2N "trials" from one w, no empty sweep
                          (["--policy", str(default_policy), "--env", "pointreach", "--w", "1", "1"],
                           "w values must be distinct"),
                          (["--policy", str(default_policy), "--env", "pointreach", "--w", "nan"],
                           "w must be finite numbers"),
                          (["--policy", str(default_policy), "--env", "pointreach", "--episodes-per-task", "0"],
                           "episodes_per_task must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            ros_evaluate.main(argv + ["--ros-domain-id", ros_env["ROS_DOMAIN_ID"]])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
