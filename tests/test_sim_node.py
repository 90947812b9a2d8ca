"""The sim node over real DDS: bad actions, lockstep through the real policy node, the real-time clock.

Each test starts real node processes in its own ROS domain (ros_env) and stops them in teardown.
Waits are on conditions with timeouts, never fixed sleeps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from cfgrl_ros.sim import BadActionError, Episode, make_sim, validate_action

pytestmark = pytest.mark.requires_rclpy
REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 120.0  # node start-up on a loaded 2-core machine (torch, OGBench, DDS discovery)


# -------------------------------------------------------------------------------- ROS-free logic
def test_validate_action_refuses_bad_input_with_a_reason():
    assert validate_action([0.5, -1.0], 2).tolist() == [0.5, -1.0]
    with pytest.raises(BadActionError, match="3 values, the env takes 2"):
        validate_action([0.1, 0.2, 0.3], 2)
    with pytest.raises(BadActionError, match="NaN or inf at indices \\[1\\]"):
        validate_action([0.1, float("nan")], 2)
    with pytest.raises(BadActionError, match="NaN or inf"):
        validate_action([float("inf"), 0.0], 2)
    with pytest.raises(BadActionError, match="leaves the action bounds"):
        validate_action([4.0, 0.0], 2)


def test_episode_refuses_bad_actions_without_touching_the_env():
    sim = make_sim("pointreach", max_episode_steps=3)
    episode = Episode(sim, task_id=2, seed=5)
    before = sim.state_digest()
    for bad in ([0.1], [np.nan, 0.0], [np.inf, 0.0]):
        with pytest.raises(BadActionError):
            episode.apply(bad)
    assert sim.state_digest() == before and episode.steps == 0 and episode.bad_actions == 3
    episode.apply([1.0, 0.0])
    assert sim.state_digest() != before and episode.steps == 1
    while not episode.done:
        episode.apply([0.0, 0.0])
    assert episode.result() == {"env": "pointreach", "task_id": 2, "seed": 5, "success": False, "steps": 3,
                                "done": True, "bad_actions": 3}


# -------------------------------------------------------------------------------- over DDS
@pytest.fixture
def ros_session(ros_env):
    """rclpy in this process, in the test's own domain, and a list of processes to stop afterwards."""
    import rclpy

    rclpy.init()
    processes = []
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()
        rclpy.try_shutdown()


def start(processes, module, parameters, tmp_path, name, ros_env):
    from cfgrl_ros.nodes.processes import NodeProcess

    process = NodeProcess(module, parameters, tmp_path / f"{name}.log", {**ros_env, "MUJOCO_GL": "egl"})
    processes.append(process)
    return process


class FakePolicy:
    """The test acting as the policy node: sees frames, sends PolicyActions, watches the sim's status."""

    def __init__(self):
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from cfgrl_ros.msg import PolicyAction
        from cfgrl_ros.nodes import bridge

        self.node = Node("fake_policy")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.frames, self.statuses, self.results, self.clock = [], [], [], []
        self.node.create_subscription(Image, bridge.CAMERA_TOPIC, self.frames.append, 10)
        latched_history = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(String, bridge.STATUS_TOPIC, lambda m: self.statuses.append(json.loads(m.data)),
                                      latched_history)
        self.node.create_subscription(String, bridge.RESULT_TOPIC, lambda m: self.results.append(json.loads(m.data)),
                                      bridge.EVENTS_QOS)
        self.node.create_subscription(Clock, "/clock", self.clock.append, 10)
        self.publisher = self.node.create_publisher(PolicyAction, bridge.ACTION_TOPIC, bridge.ACTION_QOS)
        self.PolicyAction = PolicyAction

    def wait(self, condition, what: str, timeout_s: float = 60.0, processes=()) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            for process in processes:
                process.check_alive()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.executor.spin_once(timeout_sec=0.05)

    def distinct_frames(self) -> list:
        """Frames with a new stamp (the sim shows a frame again, same stamp, when no action came)."""
        seen, frames = set(), []
        for frame in self.frames:
            key = (frame.header.stamp.sec, frame.header.stamp.nanosec)
            if key not in seen:
                seen.add(key)
                frames.append(frame)
        return frames

    def send(self, action, image_stamp, w: float = 1.0) -> None:
        message = self.PolicyAction(image_stamp=image_stamp, w=w, flow_steps=16, inference_time_ms=1.0)
        message.action = [float(a) for a in action]
        self.publisher.publish(message)


def test_bad_actions_are_refused_and_do_not_corrupt_the_episode(ros_session, ros_env, tmp_path):
    from cfgrl_ros.nodes.processes import SIM_MODULE

    sim = start(ros_session, SIM_MODULE, {"env_name": "pointreach", "max_episode_steps": 3}, tmp_path, "sim", ros_env)
    policy = FakePolicy()
    policy.wait(lambda: policy.frames and policy.statuses and policy.publisher.get_subscription_count() > 0,
                "the first frame", STARTUP_S, [sim])
    first = policy.frames[-1]
    status = policy.statuses[-1]
    assert status["steps"] == 0 and status["bad_actions"] == 0

    for count, bad in enumerate(([0.1, 0.2, 0.3], [float("nan"), 0.0], [0.0, float("inf")]), start=1):
        policy.send(bad, first.header.stamp)
        policy.wait(lambda: policy.statuses[-1]["bad_actions"] == count, f"refusal {count}", processes=[sim])
        assert policy.statuses[-1]["steps"] == 0
        assert policy.statuses[-1]["state_digest"] == status["state_digest"]  # env untouched
    assert len(policy.distinct_frames()) == 1  # no new frame: the episode did not advance

    policy.send([1.0, 0.0], first.header.stamp)  # a good action still steps it
    policy.wait(lambda: len(policy.distinct_frames()) == 2 and policy.statuses[-1]["steps"] == 1, "the next frame",
                processes=[sim])
    stepped = policy.statuses[-1]
    assert stepped["steps"] == 1 and stepped["state_digest"] != status["state_digest"]
    assert bytes(policy.distinct_frames()[1].data) != bytes(first.data)

    policy.send([1.0, 0.0], first.header.stamp)  # a second answer to the old frame must not step again
    policy.wait(lambda: policy.statuses[-1]["stale_actions"] == 1, "the stale count", processes=[sim])
    assert len(policy.distinct_frames()) == 2 and policy.statuses[-1]["steps"] == 1

    for _ in range(2):
        policy.send([0.0, 1.0], policy.distinct_frames()[-1].header.stamp)
        policy.wait(lambda: policy.statuses[-1]["steps"] == stepped["steps"] + 1
                    and len(policy.distinct_frames()) == stepped["steps"] + 2 or policy.results, "a step",
                    processes=[sim])
        stepped = policy.statuses[-1]
    policy.wait(lambda: policy.results, "the episode result", processes=[sim])
    result = policy.results[0]
    assert result["steps"] == 3 and result["done"] and result["bad_actions"] == 3 and result["w_values"] == [1.0]
    log = sim.log_tail(200)
    assert log.count("refused action") == 3 and "3 values, the env takes 2" in log and "NaN or inf" in log


def test_a_reset_mid_episode_aborts_it_and_an_old_answer_never_steps_the_new_one(ros_session, ros_env, tmp_path):
    from std_srvs.srv import Trigger

    from cfgrl_ros.nodes.processes import SIM_MODULE

    sim = start(ros_session, SIM_MODULE, {"env_name": "pointreach", "max_episode_steps": 5}, tmp_path, "sim", ros_env)
    policy = FakePolicy()
    policy.wait(lambda: policy.frames and policy.publisher.get_subscription_count() > 0, "the first frame",
                STARTUP_S, [sim])
    policy.send([1.0, 0.0], policy.frames[-1].header.stamp)
    policy.wait(lambda: len(policy.distinct_frames()) == 2, "the second frame", processes=[sim])
    on_display = policy.distinct_frames()[-1]

    client = policy.node.create_client(Trigger, "reset")
    policy.wait(client.service_is_ready, "the reset service", processes=[sim])
    future = client.call_async(Trigger.Request())
    policy.wait(future.done, "the reset", processes=[sim])
    assert future.result().success, future.result().message
    policy.wait(lambda: policy.results and len(policy.distinct_frames()) == 3, "the aborted result and a new frame",
                processes=[sim])
    assert policy.results[0]["aborted"] and policy.results[0]["steps"] == 1 and policy.results[0]["episode"] == 1
    new_first = policy.distinct_frames()[-1]
    assert new_first.header.stamp != on_display.header.stamp

    policy.send([0.0, 1.0], on_display.header.stamp)  # the policy's answer to the old episode's frame, late
    policy.wait(lambda: policy.statuses and policy.statuses[-1]["stale_actions"] == 1, "the stale count",
                processes=[sim])
    assert policy.statuses[-1]["episode"] == 2 and policy.statuses[-1]["steps"] == 0  # the new episode untouched


def test_auto_reset_starts_the_next_seed_and_wraps_at_the_last_one(ros_session, ros_env, tmp_path):
    from cfgrl_ros.nodes.processes import SIM_MODULE

    last_seed = 2**32 - 1  # seed + 1 would be refused, and the same episode replayed
    sim = start(ros_session, SIM_MODULE, {"env_name": "pointreach", "max_episode_steps": 1, "auto_reset": True,
                                          "seed": last_seed - 1}, tmp_path, "sim", ros_env)
    policy = FakePolicy()
    policy.wait(lambda: policy.frames and policy.publisher.get_subscription_count() > 0, "the first frame",
                STARTUP_S, [sim])
    for episode in (1, 2, 3):  # one step each: every action ends an episode and starts the next
        policy.wait(lambda: len(policy.distinct_frames()) == episode, f"episode {episode}'s frame", processes=[sim])
        policy.send([1.0, 0.0], policy.distinct_frames()[-1].header.stamp)
        policy.wait(lambda: len(policy.results) == episode, f"episode {episode}'s result", processes=[sim])
    assert [r["seed"] for r in policy.results] == [last_seed - 1, last_seed, 0]


def test_lockstep_episode_through_the_real_policy_node(ros_session, ros_env, tmp_path):
    """A short visual-cube episode, one step per action of the real node, with /clock for sim time."""
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient
    from std_srvs.srv import Trigger

    from cfgrl_ros.nodes.processes import POLICY_MODULE, SIM_MODULE
    from training.ros_evaluate import policy_parameters, sim_parameters

    checkpoint = tiny_checkpoint(tmp_path, action_dim=5, goal_dim=3)
    steps = 3
    sim = start(ros_session, SIM_MODULE, sim_parameters("visual-cube-single-v0", steps), tmp_path, "sim", ros_env)
    node = start(ros_session, POLICY_MODULE, policy_parameters(str(checkpoint), seed=0, flow_steps=4),
                 tmp_path, "policy", ros_env)
    policy_side = FakePolicy()  # here only a watcher: it sends nothing
    reset = policy_side.node.create_client(Trigger, "reset")
    params = AsyncParameterClient(policy_side.node, "cfgrl")
    policy_side.wait(lambda: reset.service_is_ready() and params.services_are_ready()
                     and policy_side.node.count_subscribers("camera/image") >= 2, "both nodes", STARTUP_S, [sim, node])

    future = params.set_parameters([Parameter("w", value=2)])  # an integer, as users type it
    policy_side.wait(future.done, "w to be set", processes=[node])
    assert future.result().results[0].successful

    future = reset.call_async(Trigger.Request())
    policy_side.wait(lambda: policy_side.results, "the episode result", 120.0, [sim, node])
    result = policy_side.results[0]
    assert future.result().success
    assert result["env"] == "visual-cube-single-v0" and result["task_id"] == 1
    assert result["steps"] == steps and result["done"] and result["bad_actions"] == 0
    assert result["w_values"] == [2.0]
    frames = policy_side.distinct_frames()
    assert len(frames) == steps  # frames 0..steps-1; the last step ends the episode
    assert all(f.encoding == "rgb8" and (f.height, f.width) == (64, 64) for f in frames)
    # Sim time: one control period (0.05 s) per step, and every frame stamped with the clock of its step.
    stamps = [f.header.stamp.sec * 10**9 + f.header.stamp.nanosec for f in frames]
    assert np.diff(stamps).tolist() == [50_000_000] * (steps - 1)
    policy_side.wait(lambda: policy_side.clock and policy_side.clock[-1].clock.sec * 10**9
                     + policy_side.clock[-1].clock.nanosec == stamps[0] + steps * 50_000_000, "the last /clock")


def test_realtime_clock_counts_missed_ticks(ros_session, ros_env, tmp_path):
    from cfgrl_ros.nodes.processes import SIM_MODULE

    from std_srvs.srv import Trigger

    from cfgrl_ros.nodes import bridge

    # No autostart: a 0.3 s episode would end before a slow discovery matched our result subscription.
    parameters = {"env_name": "pointreach", "max_episode_steps": 6, "clock": "realtime", "control_rate_hz": 20.0,
                  "autostart": False}
    sim = start(ros_session, SIM_MODULE, parameters, tmp_path, "sim", ros_env)
    policy = FakePolicy()
    client = policy.node.create_client(Trigger, "reset")
    policy.wait(lambda: client.service_is_ready() and policy.node.count_publishers(bridge.RESULT_TOPIC) >= 1,
                "the sim's reset service and result topic", STARTUP_S, [sim])
    future = client.call_async(Trigger.Request())
    policy.wait(future.done, "the reset", processes=[sim])
    assert future.result().success, future.result().message
    policy.wait(lambda: policy.results, "the episode to run out", processes=[sim])
    result = policy.results[0]
    assert result["clock"] == "realtime" and result["steps"] == 6
    assert result["missed_ticks"] == 6  # nobody sent an action: every tick repeated the last (zero) one
    assert not policy.clock  # no /clock in real time


def tiny_checkpoint(tmp_path, action_dim: int, goal_dim: int):
    import torch

    from cfgrl_ros.checkpoint import save_checkpoint
    from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig

    torch.manual_seed(0)
    config = PolicyConfig(action_dim=action_dim, goal_dim=goal_dim, encoder_channels=(4, 4, 4), encoder_dim=16,
                          hidden_dims=(32, 32))
    return save_checkpoint(tmp_path / "tiny.safetensors", CFGRLPolicy(config))


def sim_parameter_client(process, name: str):
    """(client, executor) for cfgrl_sim's parameter services, once they are up."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter_client import AsyncParameterClient

    executor = SingleThreadedExecutor()
    executor.add_node(Node(name))
    client = AsyncParameterClient(executor.get_nodes()[0], "cfgrl_sim")
    deadline = time.monotonic() + STARTUP_S
    while not client.services_are_ready():
        process.check_alive()
        assert time.monotonic() < deadline, "sim node parameter services"
        executor.spin_once(timeout_sec=0.05)
    return client, executor


def test_params_file_lists_every_sim_parameter(ros_session, ros_env, tmp_path):
    """config/sim.yaml and the node's declared parameters are the same set, and the file loads."""
    import yaml

    from cfgrl_ros.nodes.processes import SIM_MODULE, NodeProcess

    config_path = REPO_ROOT / "config" / "sim.yaml"
    in_file = yaml.safe_load(config_path.read_text())["/**/cfgrl_sim"]["ros__parameters"]
    process = NodeProcess(SIM_MODULE, {}, tmp_path / "sim.log", {**ros_env, "MUJOCO_GL": "egl"},
                          ros_args=["--params-file", str(config_path), "-p", "env_name:=pointreach",
                                    "-p", "autostart:=false"])
    ros_session.append(process)
    client, executor = sim_parameter_client(process, "param_lister")
    future = client.list_parameters()
    executor.spin_until_future_complete(future, timeout_sec=30)
    declared = set(future.result().result.names) - {"use_sim_time", "start_type_description_service"}
    assert declared == set(in_file)


def test_bad_parameters_are_refused_with_a_reason(ros_session, ros_env, tmp_path):
    """A value the sim cannot run with is refused (at start-up: exit 2 with the reason; live: the set fails),
    never a crash or a stalled episode."""
    from rclpy.parameter import Parameter

    from cfgrl_ros.nodes.processes import SIM_MODULE

    refused = start(ros_session, SIM_MODULE, {"env_name": "pointreach", "control_rate_hz": 0}, tmp_path, "zero",
                    ros_env)
    assert refused.process.wait(STARTUP_S) == 2
    assert "control_rate_hz must be finite and within [0.1, 1000], got 0" in refused.log()
    on_sim_time = start(ros_session, SIM_MODULE, {"env_name": "pointreach", "use_sim_time": True}, tmp_path,
                        "sim_time", ros_env)
    assert on_sim_time.process.wait(STARTUP_S) == 2
    assert "cannot run on use_sim_time" in on_sim_time.log()

    # An integer rate is a rate (no type error), and live changes are validated.
    sim = start(ros_session, SIM_MODULE, {"env_name": "pointreach", "control_rate_hz": 10, "autostart": False},
                tmp_path, "sim", ros_env)
    client, executor = sim_parameter_client(sim, "param_setter")

    def set_parameter(name, value):
        future = client.set_parameters([Parameter(name, value=value)])
        executor.spin_until_future_complete(future, timeout_sec=30)
        return future.result().results[0]

    for name, value, reason in (("resend_timeout_s", float("nan"), "resend_timeout_s must be finite"),
                                ("task_id", 9, "task_id"), ("auto_reset", "yes", "must be true or false"),
                                ("seed", -1, "seed must be"),
                                ("control_rate_hz", 20.0, "read-only")):
        result = set_parameter(name, value)
        assert not result.successful and reason in result.reason, (name, result.reason)
    assert set_parameter("resend_timeout_s", 1).successful  # an integer number of seconds
    assert set_parameter("task_id", 5).successful
    sim.check_alive()


def test_sim_launch_arguments_keep_the_params_file_unless_given(tmp_path):
    """What launch/sim.launch.py passes to the nodes, without launch_ros: an empty argument keeps the sim
    params file's value, and the policy is paired with the clock that results."""
    from cfgrl_ros.sim import SimConfigError, params_file_section, sim_launch_parameters

    sim_file = params_file_section(REPO_ROOT / "config" / "sim.yaml", "cfgrl_sim")
    assert sim_file["clock"] == "lockstep" and sim_file["env_name"] == "visual-cube-single-v0"
    empty = dict.fromkeys(("env_name", "clock", "control_rate_hz", "task_id", "max_episode_steps"), "")
    overrides, policy = sim_launch_parameters(empty, sim_file)
    assert overrides == {} and policy["trigger"] == "image" and policy["use_sim_time"] is True

    realtime_file = tmp_path / "sim.yaml"
    realtime_file.write_text("cfgrl_sim:\n  ros__parameters:\n    clock: realtime\n    control_rate_hz: 15.0\n")
    overrides, policy = sim_launch_parameters({**empty, "task_id": "3"}, params_file_section(realtime_file, "cfgrl_sim"))
    assert overrides == {"task_id": 3}
    assert policy == {"use_sim_time": False, "trigger": "timer", "control_rate_hz": 15.0, "stale_action": "zero"}
    namespaced = tmp_path / "ns.yaml"  # a section for the node in its namespace (sim.launch.py namespace:=robot1)
    namespaced.write_text("/**:\n  ros__parameters:\n    clock: lockstep\n"
                          "/robot1/cfgrl_sim:\n  ros__parameters:\n    clock: realtime\n    control_rate_hz: 15.0\n"
                          "cfgrl_sim:\n  ros__parameters:\n    task_id: 4\n")
    assert params_file_section(namespaced, "cfgrl_sim", "/robot1")["clock"] == "realtime"
    assert "task_id" not in params_file_section(namespaced, "cfgrl_sim", "/robot1")  # rcl: root-namespace only
    assert params_file_section(namespaced, "cfgrl_sim") == {"clock": "lockstep", "task_id": 4}
    overrides, policy = sim_launch_parameters({**empty, "clock": "realtime", "control_rate_hz": "20"}, sim_file)
    assert overrides == {"clock": "realtime", "control_rate_hz": 20.0} and policy["control_rate_hz"] == 20.0
    with pytest.raises(SimConfigError, match="clock must be lockstep or realtime"):
        sim_launch_parameters({**empty, "clock": "fast"}, sim_file)
    with pytest.raises(SimConfigError, match="task_id:='two' is not an integer"):
        sim_launch_parameters({**empty, "task_id": "two"}, sim_file)


def test_sim_launch_file():
    """launch/sim.launch.py: valid Python everywhere; its nodes and parameters where launch_ros exists."""
    path = REPO_ROOT / "launch" / "sim.launch.py"
    compile(path.read_text(), str(path), "exec")
    pytest.importorskip("launch_ros", reason="launch and launch_ros are not on PyPI: they come with a ROS 2 install "
                                             "(apt or source), not with the PyPI wheels this venv uses")
    import importlib.util

    from launch import LaunchContext
    from launch.actions import OpaqueFunction

    spec = importlib.util.spec_from_file_location("sim_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    context = LaunchContext()
    for entity in description.entities:
        if not isinstance(entity, OpaqueFunction):
            entity.visit(context)  # declares the arguments' defaults
    opaque = next(e for e in description.entities if isinstance(e, OpaqueFunction))
    sim, policy = opaque.execute(context)
    assert sim.node_executable == "cfgrl_sim_node" and policy.node_executable == "cfgrl_node"
