"""The other side of the policy node, for tests and benchmarks: feeds camera and goal, collects actions.

`PolicyProbe` is a plain rclpy node in the caller's process. It publishes `camera/image` and the goal
topics (camera reliable, keep last 1: what our sim and replay nodes publish, and what the policy's
best-effort subscription accepts; goals latched), records every PolicyAction and DiagnosticArray with its
receipt time, and sets the policy node's parameters through AsyncParameterClient (what
`ros2 param set` uses). Waits are on conditions with timeouts, never fixed sleeps.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray

from cfgrl_ros.msg import PolicyAction
from cfgrl_ros.nodes.processes import NodeProcess

CAMERA_PUB_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
LATCHED_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
RECORD_QOS = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
POLICY_NODE_MODULE = "cfgrl_ros.nodes.policy_node"


@dataclasses.dataclass
class Received:
    message: PolicyAction
    monotonic: float  # receipt time (this process)
    wall_ns: int  # receipt time on the system clock, comparable with image stamps set by this probe


def image_message(pixels: np.ndarray, encoding: str = "rgb8", stamp: Time | None = None,
                  step: int | None = None) -> Image:
    """(H, W, C) uint8 -> Image with bytes data (assigning an ndarray is ~350x slower in rclpy)."""
    height, width = pixels.shape[:2]
    row_bytes = width * (pixels.shape[2] if pixels.ndim == 3 else 1)
    message = Image(height=height, width=width, encoding=encoding, is_bigendian=0,
                    step=row_bytes if step is None else step)
    message.header.stamp = stamp or Time()
    message.header.frame_id = "camera"
    message.data = np.ascontiguousarray(pixels).tobytes()
    return message


def stamp_of(wall_ns: int) -> Time:
    return Time(sec=wall_ns // 10**9, nanosec=wall_ns % 10**9)


def ns_of(stamp: Time) -> int:
    return stamp.sec * 10**9 + stamp.nanosec


def diagnostic_values(array: DiagnosticArray, status_name: str) -> dict[str, str] | None:
    """One status's level, message and key-values from a DiagnosticArray (None when it is not in it)."""
    for status in array.status:
        if status.name == status_name:
            return {"level": int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else status.level,
                    "message": status.message, **{kv.key: kv.value for kv in status.values}}
    return None


class PolicyProbe:
    def __init__(self, target: str = "cfgrl", name: str = "cfgrl_probe", namespace: str = "",
                 remaps: dict[str, str] | None = None):
        """remaps: topic remappings of the probe itself (e.g. {"camera/image": "/robot1/cam"}), to
        match a policy node that was launched with remapped topics."""
        remap_args = [arg for old, new in (remaps or {}).items() for arg in ("-r", f"{old}:={new}")]
        self.node = Node(name, namespace=namespace, cli_args=["--ros-args", *remap_args] if remap_args else None)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.camera = self.node.create_publisher(Image, "camera/image", CAMERA_PUB_QOS)
        self.goal_image = self.node.create_publisher(Image, "goal/image", LATCHED_QOS)
        self.goal_vector = self.node.create_publisher(Float32MultiArray, "goal/vector", LATCHED_QOS)
        self.actions: list[Received] = []
        self.diagnostics: list[dict[str, str]] = []
        self.action_subscription = self.node.create_subscription(PolicyAction, "action", self._on_action, RECORD_QOS)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RECORD_QOS)
        self.parameters = AsyncParameterClient(self.node, target)
        # The policy node names its status "<fully qualified node name>: policy".
        self.status_name = f"{self.node.get_namespace().rstrip('/')}/{target}: policy"
        self.alive_checks: list[Callable[[], None]] = []  # e.g. NodeProcess.check_alive

    def _on_action(self, message: PolicyAction) -> None:
        self.actions.append(Received(message, time.monotonic(), time.time_ns()))

    def _on_diagnostics(self, array: DiagnosticArray) -> None:
        values = diagnostic_values(array, self.status_name)
        if values is not None:
            self.diagnostics.append(values)

    # ------------------------------------------------------------------ waiting
    def spin_until(self, condition: Callable[[], bool], what: str, timeout_s: float = 30.0,
                   meanwhile: Callable[[], None] | None = None, every_s: float = 0.2) -> None:
        """Spin until condition() holds; `meanwhile` runs first and then every `every_s` (e.g. to
        republish a camera frame: frames are best-effort, and a lost one must not hang a test)."""
        deadline = time.monotonic() + timeout_s
        next_call = time.monotonic()
        while not condition():
            for check in self.alive_checks:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
            if meanwhile is not None and time.monotonic() >= next_call:
                meanwhile()
                next_call = time.monotonic() + every_s
            self.executor.spin_once(timeout_sec=0.02)

    def spin_for(self, seconds: float) -> None:
        """Keep receiving for a while (used to show that something does NOT arrive)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=min(0.02, max(0.0, deadline - time.monotonic())))

    def wait_for_node(self, goal_topic: str, timeout_s: float = 120.0) -> None:
        """Until the policy node subscribes to camera and goal ("goal/image" or "goal/vector"),
        publishes actions, and its parameter services answer. Counts use this probe's resolved
        (remapped) names: count_subscribers() itself only expands names, it does not remap."""
        goal = self.goal_image if goal_topic == "goal/image" else self.goal_vector
        self.spin_until(lambda: self.node.count_subscribers(self.camera.topic_name) >= 1
                        and self.node.count_subscribers(goal.topic_name) >= 1
                        and self.node.count_publishers(self.action_subscription.topic_name) >= 1
                        and self.parameters.services_are_ready(), "the policy node", timeout_s)

    def actions_since(self, index: int) -> list[PolicyAction]:
        return [r.message for r in self.actions[index:]]

    def wait_for_action(self, predicate: Callable[[PolicyAction], bool], what: str, timeout_s: float = 30.0,
                        start: int | None = None, meanwhile: Callable[[], None] | None = None) -> PolicyAction:
        """The first action received from index `start` (default: now) on that satisfies predicate."""
        start = len(self.actions) if start is None else start
        self.spin_until(lambda: any(predicate(m) for m in self.actions_since(start)), what, timeout_s, meanwhile)
        return next(m for m in self.actions_since(start) if predicate(m))

    def next_diagnostics(self, timeout_s: float = 10.0, predicate: Callable[[dict], bool] = lambda d: True) -> dict:
        """The first diagnostics report received from now on that satisfies predicate."""
        start = len(self.diagnostics)
        self.spin_until(lambda: any(predicate(d) for d in self.diagnostics[start:]), "diagnostics", timeout_s)
        return next(d for d in self.diagnostics[start:] if predicate(d))

    # ------------------------------------------------------------------ parameters
    def set_parameters(self, timeout_s: float = 10.0, **values) -> list:
        """SetParametersResult per parameter, in order (successful, reason)."""
        future = self.parameters.set_parameters([Parameter(name, value=value) for name, value in values.items()])
        self.spin_until(future.done, f"setting {values}", timeout_s)
        return list(future.result().results)

    def get_parameters(self, *names: str, timeout_s: float = 10.0) -> dict:
        future = self.parameters.get_parameters(list(names))
        self.spin_until(future.done, f"getting {names}", timeout_s)
        return {name: parameter_value_to_python(value) for name, value in zip(names, future.result().values)}

    # ------------------------------------------------------------------ inputs
    def publish_camera(self, pixels: np.ndarray, encoding: str = "rgb8", stamp: Time | None = None,
                       step: int | None = None) -> Time:
        """Publish one frame stamped now (system clock) unless a stamp is given; returns its stamp."""
        stamp = stamp or stamp_of(time.time_ns())
        self.camera.publish(image_message(pixels, encoding, stamp, step))
        return stamp

    def publish_goal_image(self, pixels: np.ndarray) -> None:
        self.goal_image.publish(image_message(pixels, "rgb8", stamp_of(time.time_ns())))

    def publish_goal_vector(self, values) -> None:
        message = Float32MultiArray()
        message.data = [float(v) for v in values]
        self.goal_vector.publish(message)

    def destroy(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


class PolicyNodeProcess(NodeProcess):
    """The policy node in a process of its own: `python -m cfgrl_ros.nodes.policy_node` or a given
    executable (the `cfgrl_node` console script), with a params file and `-p name:=value` overrides."""

    def __init__(self, log_path: str | os.PathLike, params_file: str | os.PathLike | None = None,
                 overrides: dict | None = None, env: dict | None = None, executable: list[str] | None = None,
                 remaps: dict[str, str] | None = None):
        ros_args = ["--params-file", str(params_file)] if params_file is not None else []
        for name, target in (remaps or {}).items():
            ros_args += ["-r", f"{name}:={target}"]
        super().__init__(POLICY_NODE_MODULE, overrides or {}, log_path, env, ros_args, executable)
