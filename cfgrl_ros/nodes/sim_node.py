#!/usr/bin/env python3
"""cfgrl_sim: an OGBench visual task (or the toy pointreach) bridged to the policy node's topics.

Publishes camera/image (rgb8), the task's goal latched on goal/image and goal/vector, results on
episode/result and its state on sim/status (std_msgs/String, JSON); consumes `action` (PolicyAction).
Service `reset` (std_srvs/Trigger) starts an episode with the parameters task_id and seed; a reset
mid-episode first publishes that episode's result with "aborted": true, and the new episode's first
frame gets a new stamp, so an answer to the old episode's frame can never step the new one.
The sim owns /clock: it refuses use_sim_time itself (its timers would wait on their own clock).

Clocks (parameter `clock`):
- lockstep: one env step per action. An action counts only if its image_stamp is the stamp of the
  frame on display, so duplicates and late actions cannot step the env twice. Frame k+1 is published
  only after action k is applied. /clock carries sim time (step * control period) for use_sim_time;
  if no usable action arrives within resend_timeout_s the frame is published again (a lost frame or
  a refused action must not stall the episode).
- realtime: a timer at control_rate_hz steps the env with the newest action; a tick without a new
  action repeats the previous one and counts a miss.
A bad action (wrong length, NaN/inf, out of bounds) is logged as an error, counted and not applied.
"""

from __future__ import annotations

import json
import sys
import time

import rclpy
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.duration import Duration
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import Trigger

from cfgrl_ros.msg import PolicyAction
from cfgrl_ros.node_params import ParamSpec, any_string, boolean, finite_in, int_in, one_of, validate_changes
from cfgrl_ros.nodes import bridge
from cfgrl_ros.sim import ActionLatch, BadActionError, Episode, SimConfigError, check_task_id, make_sim

CLOCKS = ("lockstep", "realtime")
SIM_TIME_START_NS = 1_000_000_000  # sim time 0 means "no clock yet" to use_sim_time nodes

# Every parameter, validated like the policy node's (node_params.py): a bad value is refused with a reason.
PARAMETERS = (
    ParamSpec("env_name", "visual-cube-single-v0", "OGBench visual task id, or pointreach.", any_string, "start"),
    ParamSpec("task_id", 1, "Task for the next reset (1 to the env's task count).", int_in(1, 10_000), "live"),
    ParamSpec("seed", 0, "Env seed for the next reset (0 to 2**32 - 1, numpy's seed range).", int_in(0, 2**32 - 1), "live"),
    ParamSpec("max_episode_steps", 0, "Steps per episode; 0: the env's own limit.", int_in(0, 10**7), "start"),
    ParamSpec("clock", "lockstep", "lockstep: one env step per action; realtime: a timer steps the env.",
              one_of(CLOCKS), "start"),
    ParamSpec("control_rate_hz", 10.0, "realtime: env steps per second.", finite_in(0.1, 1000.0), "start"),
    ParamSpec("resend_timeout_s", 2.0, "lockstep: publish the frame again after this long without a usable action.",
              finite_in(0.01, 3600.0), "live"),
    ParamSpec("auto_reset", False, "Start the next episode (seed + 1, after 2**32 - 1: 0) when one ends.", boolean,
              "live"),
    ParamSpec("autostart", True, "Start an episode at start-up.", boolean, "start"),
    ParamSpec("shadow_size", 0, "Shadow-map size; 0: the env's own.", int_in(0, 16384), "start"),
    ParamSpec("image_size", 0, "pointreach only: camera size; 0: 64.", int_in(0, 1024), "start"),
    ParamSpec("frame_id", "camera", "frame_id of the camera images.", any_string, "live"),
)
SPECS = {spec.name: spec for spec in PARAMETERS}


class SimNode(Node):
    def __init__(self, **kwargs):
        super().__init__("cfgrl_sim", **kwargs)
        self._declare_parameters()
        if self.get_parameter("use_sim_time").value:
            # Its timers would wait on the /clock it publishes, which only moves when they fire.
            raise SimConfigError("cfgrl_sim owns /clock and cannot run on use_sim_time; set it on the other nodes")
        self.clock_mode = self.param("clock")
        steps = self.param("max_episode_steps")
        self.sim = make_sim(self.param("env_name"), steps or None,
                            self.param("shadow_size"), self.param("image_size") or None)
        self.frame_id = self.param("frame_id")
        self.sim_time_ns = SIM_TIME_START_NS
        self.period_ns = int(round(self.sim.control_period_s * 1e9))
        self.episode: Episode | None = None
        self.episode_index = 0
        self.frame_stamp = None
        self.last_frame_wall = 0.0
        self._reset_counters()

        self.camera_pub = self.create_publisher(Image, bridge.CAMERA_TOPIC, bridge.CAMERA_QOS)
        self.goal_image_pub = self.create_publisher(Image, bridge.GOAL_IMAGE_TOPIC, bridge.LATCHED_QOS)
        self.goal_vector_pub = self.create_publisher(Float32MultiArray, bridge.GOAL_VECTOR_TOPIC, bridge.LATCHED_QOS)
        self.result_pub = self.create_publisher(String, bridge.RESULT_TOPIC, bridge.EVENTS_QOS)
        self.status_pub = self.create_publisher(String, bridge.STATUS_TOPIC, bridge.LATCHED_QOS)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if self.clock_mode == "lockstep" else None
        self.create_subscription(PolicyAction, bridge.ACTION_TOPIC, self.on_action, bridge.ACTION_QOS)
        if self.clock_mode == "lockstep":
            self.create_timer(0.1, self._resend_if_stalled)
        else:
            self.create_timer(1.0 / self.param("control_rate_hz"), self._on_tick)
        # Created last: a client that sees the service knows the env is built and the topics exist.
        self.create_service(Trigger, "reset", self.on_reset)
        self.get_logger().info(
            f"{self.sim.env_name}: {self.sim.num_tasks} tasks, action dim {self.sim.action_dim}, "
            f"{self.sim.max_episode_steps} steps per episode, clock {self.clock_mode}")
        if self.param("autostart"):
            self.start_episode()

    def _declare_parameters(self) -> None:
        self.sim = None  # the env's task count is known once it is built; task_id is checked against it then
        self.add_on_set_parameters_callback(self._check_parameters)  # before declaring: checks the params file too
        for spec in PARAMETERS:  # dynamic typing: `control_rate_hz:=10` (an integer) is accepted, not a crash
            self.declare_parameter(spec.name, spec.default, ParameterDescriptor(
                description=spec.full_description, read_only=spec.read_only, dynamic_typing=True))

    def param(self, name: str):
        value = self.get_parameter(name).value
        return float(value) if SPECS[name].is_float else value

    def _check_parameters(self, parameters) -> SetParametersResult:
        current = {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS if self.has_parameter(spec.name)}
        changes = {p.name: p.value for p in parameters}
        reason = validate_changes(changes, current, SPECS)
        if reason is None and "task_id" in changes and self.sim is not None:
            try:
                check_task_id(changes["task_id"], self.sim.num_tasks)
            except SimConfigError as error:
                reason = str(error)
        if reason is not None:
            self.get_logger().warning(f"parameter change refused: {reason}")
            return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _reset_counters(self) -> None:
        self.latch = ActionLatch(self.sim.action_dim)
        self.stale_actions = 0
        self.resends = 0
        self.overruns = 0
        self.w_values: set[float] = set()

    # Episodes ---------------------------------------------------------------------------------
    def start_episode(self) -> dict:
        task_id = self.param("task_id")
        seed = self.param("seed")
        if self.episode is not None and not self.episode.done:  # a reset mid-episode
            result = {**self.episode.result(), **self._counters(), "episode": self.episode_index, "aborted": True}
            self.result_pub.publish(bridge.json_message(result))
            self.get_logger().info(f"episode {self.episode_index} aborted by a reset after {result['steps']} steps")
        self.episode = Episode(self.sim, task_id, seed)
        # A new stamp for the new first frame: an action still in flight for the frame on display
        # (the old episode's) must not pass as the answer to the new one.
        self.sim_time_ns += self.period_ns
        self.episode_index += 1
        self._reset_counters()
        start = self.episode.start
        stamp = self._now_stamp()
        goal_publishers = (self.goal_image_pub, self.goal_vector_pub)
        if not bridge.wait_for_goal_links(self, goal_publishers, timeout_s=5.0):
            self.get_logger().warning("a policy node has no matched goal subscription yet; publishing anyway")
        self.goal_image_pub.publish(bridge.rgb_image(start.goal_image, stamp, self.frame_id))
        self.goal_vector_pub.publish(bridge.vector_message(start.goal_vector))
        # Let the goals reach their subscribers before the first frame asks for an action.
        for publisher in goal_publishers:
            publisher.wait_for_all_acked(Duration(seconds=2.0))
        self.get_logger().info(f"episode {self.episode_index}: task {task_id}, seed {seed}")
        self._publish_clock()  # use_sim_time nodes need a clock before the first frame
        self._publish_frame()
        return {"episode": self.episode_index, "task_id": task_id, "seed": seed}

    def on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            response.message = json.dumps(self.start_episode())
            response.success = True
        except Exception as error:  # noqa: BLE001 - a failed reset is reported; the node stays up
            response.success, response.message = False, f"{type(error).__name__}: {error}"
            self.get_logger().error(f"reset failed: {response.message}")
        return response

    def _finish_episode(self) -> None:
        result = {**self.episode.result(), **self._counters(), "episode": self.episode_index}
        self.result_pub.publish(bridge.json_message({**result, "aborted": False}))
        self.get_logger().info(f"episode {self.episode_index} ended: success={result['success']} "
                               f"after {result['steps']} steps")
        if self.param("auto_reset"):
            next_seed = (self.param("seed") + 1) % 2**32  # wraps inside numpy's range instead of being refused
            self.set_parameters([Parameter("seed", value=next_seed)])
            self.start_episode()

    def _counters(self) -> dict:
        return {"clock": self.clock_mode, "missed_ticks": self.latch.misses, "stale_actions": self.stale_actions,
                "resends": self.resends, "overruns": self.overruns, "w_values": sorted(self.w_values)}

    # Actions ----------------------------------------------------------------------------------
    def on_action(self, message: PolicyAction) -> None:
        if self.episode is None or self.episode.done:
            self.stale_actions += 1
            return
        if self.clock_mode == "lockstep" and (message.image_stamp != self.frame_stamp
                                              or message.inference_time_ms == 0.0):
            # An action for an earlier frame (already served), or the policy's stale-input stop
            # (inference_time_ms 0): neither is the policy's answer to the frame on display.
            self.stale_actions += 1
            self._publish_status()
            return
        try:
            action = self.episode.validate(message.action)
        except BadActionError as error:
            self.get_logger().error(f"refused action (not applied, episode {self.episode_index} unchanged): {error}")
            self._publish_status()
            return
        self.w_values.add(round(float(message.w), 6))
        if self.clock_mode == "lockstep":
            self._step(action)
        else:
            self.latch.offer(action)

    def _step(self, action) -> None:
        self.episode.apply(action)
        self.sim_time_ns += self.period_ns
        self._publish_clock()
        if self.episode.done:
            self._publish_status()
            self._finish_episode()
        else:
            self._publish_frame()

    def _on_tick(self) -> None:
        if self.episode is None or self.episode.done:
            return
        started = time.monotonic()
        action, _ = self.latch.take()
        self._step(action)
        if time.monotonic() - started > 1.0 / self.param("control_rate_hz"):
            self.overruns += 1

    # Output -----------------------------------------------------------------------------------
    def _now_stamp(self):
        if self.clock_mode == "lockstep":
            return bridge.stamp_from_ns(self.sim_time_ns)
        return self.get_clock().now().to_msg()

    def _publish_clock(self) -> None:
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=bridge.stamp_from_ns(self.sim_time_ns)))

    def _publish_frame(self) -> None:
        self.frame_stamp = self._now_stamp()
        self.camera_pub.publish(bridge.rgb_image(self.episode.image, self.frame_stamp, self.frame_id))
        self.last_frame_wall = time.monotonic()
        self._publish_status()

    def _publish_status(self) -> None:
        status = {**self.episode.result(), **self._counters(), "episode": self.episode_index,
                  "state_digest": self.sim.state_digest(), "sim_time_ns": self.sim_time_ns}
        self.status_pub.publish(bridge.json_message(status))

    def _resend_if_stalled(self) -> None:
        self._publish_clock()  # also for nodes that joined late: /clock otherwise moves only with steps
        if self.episode is None or self.episode.done:
            return
        if time.monotonic() - self.last_frame_wall > self.param("resend_timeout_s"):
            self.resends += 1
            self.camera_pub.publish(bridge.rgb_image(self.episode.image, self.frame_stamp, self.frame_id))
            self.last_frame_wall = time.monotonic()

    def destroy_node(self) -> None:
        if self.sim is not None:
            self.sim.close()
            self.sim = None
        super().destroy_node()


def main(args=None) -> int:
    rclpy.init(args=args)
    node = None
    executor = SingleThreadedExecutor()
    try:
        node = SimNode()
        executor.add_node(node)
        bridge.spin_until_shutdown(executor)
    except (ParameterException, SimConfigError) as error:  # a bad value in the params file or on the command line
        rclpy.logging.get_logger("cfgrl_sim").fatal(str(error))
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
