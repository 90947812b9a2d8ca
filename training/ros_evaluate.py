"""Closed-loop evaluation through ROS: the real policy node and the sim node, over real DDS.

Starts `cfgrl` (policy_node, trigger=image, use_sim_time) and `cfgrl_sim` (sim_node, lockstep) as
processes, then for each w: sets w on the policy node through its parameter service, and runs
`episodes` episodes per task, choosing each episode's task and seed through the sim node's
parameters and starting it with its `reset` service. Results come back on episode/result. The
episode seeds are the direct evaluator's (training/evaluate.py), so both evaluate the same episodes;
the policy's action noise is drawn by the node (seeded once), so per-episode outcomes can differ
while success rates agree within sampling noise (tests/test_ros_evaluate.py checks that).

    python -m training.ros_evaluate --policy ckpt.safetensors --env visual-cube-single-v0 \\
        --w 1 3 --tasks 1 2 3 4 5 --episodes-per-task 5 --out-dir runs/ros_eval
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from std_msgs.msg import String
from std_srvs.srv import Trigger
from tqdm import tqdm

from cfgrl_ros.checkpoint import CheckpointError, load_checkpoint
from cfgrl_ros.nodes import bridge
from cfgrl_ros.nodes.processes import POLICY_MODULE, SIM_MODULE, NodeProcess
from cfgrl_ros.ros_domain import isolate_process
from cfgrl_ros.sim import paired_policy_parameters
# One EvaluationError for both evaluators: the env checks here are the direct evaluator's own.
from training.evaluate import (
    POINTREACH,
    EnvSpec,
    EvaluationError,
    check_checkpoint_fits_env,
    check_sweep,
    default_report_dir,
    episode_limit,
    episode_seed,
    markdown_table,
    summarize,
    write_report,
)

SIM_NODE, POLICY_NODE = "cfgrl_sim", "cfgrl"


class SimSession:
    """A client node that drives the sim node and the policy node through their ROS interfaces."""

    def __init__(self, name: str = "cfgrl_ros_evaluate"):
        self.node = Node(name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.results: list[dict] = []
        self.node.create_subscription(String, bridge.RESULT_TOPIC, self._on_result, bridge.EVENTS_QOS)
        self.reset_client = self.node.create_client(Trigger, "reset")
        self.sim_params = AsyncParameterClient(self.node, SIM_NODE)
        self.policy_params = AsyncParameterClient(self.node, POLICY_NODE)

    def _on_result(self, message: String) -> None:
        self.results.append(json.loads(message.data))

    def spin_until(self, condition, timeout_s: float, what: str, processes: tuple[NodeProcess, ...] = ()) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            for process in processes:
                process.check_alive()
            if time.monotonic() > deadline:
                raise EvaluationError(f"timed out after {timeout_s:g} s waiting for {what}")
            self.executor.spin_once(timeout_sec=0.05)

    def wait_ready(self, timeout_s: float, processes: tuple[NodeProcess, ...] = ()) -> None:
        """Both nodes up: the sim's reset service, both parameter services, an active policy."""
        self.spin_until(self.reset_client.service_is_ready, timeout_s, "the sim node's reset service", processes)
        self.spin_until(lambda: self.sim_params.services_are_ready() and self.policy_params.services_are_ready(),
                        timeout_s, "the parameter services of cfgrl_sim and cfgrl", processes)
        # The policy subscribes to the camera only once active (configured, policy loaded).
        self.spin_until(lambda: self.node.count_subscribers(bridge.CAMERA_TOPIC) > 0
                        and self.node.count_publishers(bridge.ACTION_TOPIC) > 0,
                        timeout_s, "an active policy node on camera/image -> action", processes)

    def set_parameters(self, client: AsyncParameterClient, node_name: str, values: dict, timeout_s: float = 10.0) -> None:
        future = client.set_parameters([Parameter(name, value=value) for name, value in values.items()])
        self.spin_until(future.done, timeout_s, f"{node_name} to set {values}")
        refused = [f"{name}: {r.reason}" for name, r in zip(values, future.result().results) if not r.successful]
        if refused:
            raise EvaluationError(f"{node_name} refused {refused}")

    def set_w(self, w: float) -> None:
        self.set_parameters(self.policy_params, POLICY_NODE, {"w": float(w)})

    def run_episode(self, task_id: int, seed: int, timeout_s: float,
                    processes: tuple[NodeProcess, ...] = ()) -> dict:
        """One episode on the sim; returns its episode/result."""
        self.set_parameters(self.sim_params, SIM_NODE, {"task_id": int(task_id), "seed": int(seed)})
        future = self.reset_client.call_async(Trigger.Request())
        self.spin_until(future.done, timeout_s, f"the sim to reset (task {task_id}, seed {seed})", processes)
        response = future.result()
        if not response.success:
            raise EvaluationError(f"reset refused: {response.message}")
        episode = json.loads(response.message)["episode"]
        self.spin_until(lambda: any(r["episode"] == episode for r in self.results), timeout_s,
                        f"the end of episode {episode} (task {task_id}, seed {seed})", processes)
        return next(r for r in self.results if r["episode"] == episode)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def policy_parameters(policy: str, seed: int, flow_steps: int, cpu_threads: int = 1) -> dict:
    """Policy node settings for lockstep: one action per frame, on sim time, never a stale stop."""
    return {**paired_policy_parameters("lockstep", 0.0), "policy": policy, "backend": "torch", "seed": seed,
            "flow_steps": flow_steps, "cpu_threads": cpu_threads}


def sim_parameters(env_name: str, max_episode_steps: int | None, shadow_size: int = 0, image_size: int = 0) -> dict:
    return {"env_name": env_name, "clock": "lockstep", "autostart": False,
            "max_episode_steps": int(max_episode_steps or 0), "shadow_size": shadow_size, "image_size": image_size}


def start_nodes(policy: str, env_name: str, log_dir: Path, *, seed: int = 0, flow_steps: int = 16,
                max_episode_steps: int | None = None, shadow_size: int = 0, image_size: int = 0,
                env: dict | None = None) -> tuple[NodeProcess, NodeProcess]:
    """The sim node and the policy node as processes, logging into log_dir."""
    env = dict(os.environ if env is None else env)
    env.setdefault("MUJOCO_GL", "egl")
    sim = NodeProcess(SIM_MODULE, sim_parameters(env_name, max_episode_steps, shadow_size, image_size),
                      log_dir / "sim.log", env)
    policy_node = NodeProcess(POLICY_MODULE, policy_parameters(policy, seed, flow_steps), log_dir / "policy.log", env)
    return sim, policy_node


def evaluate_through_ros(policy: str, env_name: str, ws: Sequence[float], *, episodes_per_task: int,
                         tasks: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0, flow_steps: int = 16,
                         max_steps: int | None = None, shadow_size: int = 0, episode_timeout_s: float = 900.0,
                         startup_timeout_s: float = 180.0, log_dir: str | os.PathLike | None = None,
                         env: dict | None = None, progress: bool = True) -> dict:
    """Run every (w, task, episode) through the nodes; returns training.evaluate.summarize's dict.

    Episode (task, k) uses the direct evaluator's env seed episode_seed(seed, task, k), so both
    evaluators start from the same states. The policy node's noise generator is seeded with `seed`.
    """
    check_sweep(env_name, ws, tasks, episodes_per_task, flow_steps, seed, None, None, max_steps)
    config = load_checkpoint(policy).config  # fails here, clearly, on a bad checkpoint
    max_steps = max_steps or episode_limit(env_name)
    # A policy for another env would wait forever for a goal it can use: refuse it before starting the nodes.
    check_checkpoint_fits_env(config, EnvSpec(env_name, config.goal_mode, config.image_size, max_steps))
    image_size = config.image_size if env_name == POINTREACH else 0  # the direct evaluator renders at it too
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="cfgrl_ros_eval_"))
    processes = start_nodes(policy, env_name, log_dir, seed=seed, flow_steps=flow_steps, max_episode_steps=max_steps,
                            shadow_size=shadow_size, image_size=image_size, env=env)
    own_context = not rclpy.ok()
    if own_context:
        rclpy.init()
    session = SimSession()
    episodes, env_steps, start = [], 0, time.perf_counter()
    try:
        session.wait_ready(startup_timeout_s, processes)
        rows = [(float(w), int(task), k) for w in ws for task in tasks for k in range(episodes_per_task)]
        for w, task, k in tqdm(rows, desc=f"ROS eval {env_name}", unit="episode", disable=not progress):
            if not episodes or episodes[-1]["w"] != w:
                session.set_w(w)
            env_seed = episode_seed(seed, task, k)
            result = session.run_episode(task, env_seed, episode_timeout_s, processes)
            if result["w_values"] != [round(float(np.float32(w)), 6)]:
                raise EvaluationError(f"episode (task {task}, seed {env_seed}) ran with w {result['w_values']}, "
                                      f"expected [{w}]: the parameter did not take effect")
            episodes.append(dict(w=w, task=task, episode=k, seed=env_seed, success=result["success"],
                                 steps=result["steps"], resends=result["resends"]))
            env_steps += result["steps"]
    finally:
        session.close()
        if own_context:
            rclpy.try_shutdown()
        for process in processes:
            process.stop()
    wall_time = time.perf_counter() - start
    return summarize(episodes, evaluator="ros", env=env_name, checkpoint=str(policy), goal_mode=config.goal_mode,
                     backend="torch", device="cpu", flow_steps=flow_steps, seed=seed,
                     episodes_per_task=episodes_per_task, max_steps=max_steps, wall_time_s=round(wall_time, 3),
                     env_steps=env_steps, env_steps_per_s=round(env_steps / wall_time, 2), logs=str(log_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="checkpoint (.safetensors)")
    parser.add_argument("--env", required=True, help=f"OGBench visual env id or '{POINTREACH}'")
    parser.add_argument("--w", type=float, nargs="+", default=[1.0, 3.0], help="guidance weights")
    parser.add_argument("--episodes-per-task", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flow-steps", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=None, help="episode limit override (short runs)")
    parser.add_argument("--shadow-size", type=int, default=0, help="OGBench shadow map (0: default 4096)")
    parser.add_argument("--out-dir", default=None,
                        help="report and node logs (default: <checkpoint dir>/ros-eval-<env>; "
                             "runs/<name>/ros-eval-<env> for the embedded policy)")
    parser.add_argument("--ros-domain-id", type=int, default=None,
                        help="ROS domain of the nodes (default: a free one of 30-59, claimed with a lock file)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # both nodes run on this machine: loopback-only discovery, in a domain no other run uses
        isolate_process(args.ros_domain_id)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    out_dir = Path(args.out_dir or default_report_dir(args.policy, "ros-eval", args.env))
    try:  # a bad checkpoint, env, task or w is a one-line error, not a traceback
        results = evaluate_through_ros(args.policy, args.env, args.w, episodes_per_task=args.episodes_per_task,
                                       tasks=args.tasks, seed=args.seed, flow_steps=args.flow_steps,
                                       max_steps=args.max_steps, shadow_size=args.shadow_size,
                                       log_dir=out_dir / "logs")
    except (EvaluationError, CheckpointError) as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        parser.exit(130, f"\n{parser.prog}: interrupted; the nodes were stopped (logs: {out_dir / 'logs'})\n")
    paths = write_report(results, out_dir)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f"; node logs in {results['logs']}")


if __name__ == "__main__":
    main()
