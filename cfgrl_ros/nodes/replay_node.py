#!/usr/bin/env python3
"""cfgrl_replay: plays a dataset or a bag open loop into the policy node and compares its actions.

Sources: an OGBench-format dataset (.npz) or a rosbag2 mcap bag of camera (and goal, and action)
topics; see cfgrl_ros/replay.py. Frames go out on camera/image, goals latched on goal/image and
goal/vector, each frame stamped with the publish time; the policy's actions are matched back to
frames by image_stamp. Rates:
  --rate recorded   the recorded timing (bag record times, or --dataset-hz for datasets), / --speed
  --rate 15         a fixed rate in Hz
  --rate lockstep   the next frame only after the action for this one (run the policy with
                    trigger:=image): deterministic, as fast as the policy allows
The report (replay_report.md/.json in --out) compares replayed with recorded actions: MSE, per-dim
MSE and MAE, mean cosine. --record BAG writes what went over the wire (inputs and actions) to mcap.

Run: cfgrl_replay_node --source run1_bag --rate lockstep --out replay_out
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray

from cfgrl_ros.msg import PolicyAction
from cfgrl_ros.nodes import bridge
from cfgrl_ros.nodes.recorder import TopicRecorder, stop_between_messages
from cfgrl_ros.bags import BagError
from cfgrl_ros.replay import ReplayError, ReplayFrame, bag_frames, compare_actions, dataset_frames, write_replay_report
from training.data import DatasetError

MAX_UNANSWERED_IN_A_ROW = 3  # lockstep: frames without an action before the replay gives up

class ReplayNode(Node):
    def __init__(self, executor: SingleThreadedExecutor, recorder: TopicRecorder | None = None,
                 frame_id: str = "camera"):
        super().__init__("cfgrl_replay")
        self.executor = executor
        self.recorder = recorder
        self.frame_id = frame_id
        self.camera_pub = self.create_publisher(Image, bridge.CAMERA_TOPIC, bridge.CAMERA_QOS)
        self.goal_image_pub = self.create_publisher(Image, bridge.GOAL_IMAGE_TOPIC, bridge.LATCHED_QOS)
        self.goal_vector_pub = self.create_publisher(Float32MultiArray, bridge.GOAL_VECTOR_TOPIC, bridge.LATCHED_QOS)
        self.create_subscription(PolicyAction, bridge.ACTION_TOPIC, self._on_action, bridge.ACTION_QOS)
        self.frame_of_stamp: dict[int, int] = {}
        self.stamp_of_frame: dict[int, int] = {}
        self.sent_at: dict[int, float] = {}
        self.actions: dict[int, np.ndarray] = {}
        self.latency_ms: list[float] = []
        self.w_values: set[float] = set()
        self.unmatched_actions = 0
        self.resends = 0
        self._last_stamp_ns = 0

    def _on_action(self, message: PolicyAction) -> None:
        index = self.frame_of_stamp.get(bridge.stamp_to_ns(message.image_stamp))
        if index is None or message.inference_time_ms == 0.0:  # not ours, or a stale-input stop
            self.unmatched_actions += 1
            return
        if index not in self.actions:
            self.actions[index] = np.asarray(message.action, dtype=np.float32)
            self.latency_ms.append((time.monotonic() - self.sent_at[index]) * 1e3)
            self.w_values.add(round(float(message.w), 6))

    def spin_until(self, condition, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.executor.spin_once(timeout_sec=min(remaining, 0.05))
        return True

    def wait_for_policy(self, timeout_s: float) -> None:
        goal_publishers = (self.goal_image_pub, self.goal_vector_pub)
        found = self.spin_until(lambda: self.camera_pub.get_subscription_count() > 0
                                and self.count_publishers(bridge.ACTION_TOPIC) > 0
                                and bridge.goal_links_ready(self, goal_publishers), timeout_s)
        if not found:
            raise TimeoutError(f"no policy node (subscriber of {bridge.CAMERA_TOPIC} and a goal topic, publisher "
                               f"of {bridge.ACTION_TOPIC}) appeared within {timeout_s:g} s")

    def publish_goal(self, frame: ReplayFrame) -> None:
        stamp = self.get_clock().now().to_msg()
        if frame.goal_image is not None:
            self.goal_image_pub.publish(bridge.rgb_image(frame.goal_image, stamp, self.frame_id))
        if frame.goal_vector is not None:
            self.goal_vector_pub.publish(bridge.vector_message(frame.goal_vector))
        # Let the goal reach the policy before the frame that needs it.
        for publisher in (self.goal_image_pub, self.goal_vector_pub):
            publisher.wait_for_all_acked(Duration(seconds=2.0))
        if self.recorder is not None:  # and into the bag before the frame: one executor serves both
            goals = self.recorder.writer.counts
            wanted = {topic: goals.get(topic, 0) + 1 for topic, value in
                      ((self.recorder.resolve_topic_name(bridge.GOAL_IMAGE_TOPIC), frame.goal_image),
                       (self.recorder.resolve_topic_name(bridge.GOAL_VECTOR_TOPIC), frame.goal_vector))
                      if value is not None}
            self.spin_until(lambda: all(goals.get(t, 0) >= n for t, n in wanted.items()), 2.0)

    def publish_frame(self, index: int, frame: ReplayFrame) -> None:
        """Publish frame `index`, stamped now; a resent frame keeps its first stamp."""
        stamp_ns = self.stamp_of_frame.get(index)
        if stamp_ns is None:
            stamp_ns = max(self.get_clock().now().nanoseconds, self._last_stamp_ns + 1)  # unique per frame
            self._last_stamp_ns = self.stamp_of_frame[index] = stamp_ns
            self.frame_of_stamp[stamp_ns] = index
            self.sent_at[index] = time.monotonic()
        self.camera_pub.publish(bridge.rgb_image(frame.image, bridge.stamp_from_ns(stamp_ns), self.frame_id))

    def play(self, frames: list[ReplayFrame], rate: str, speed: float, action_timeout_s: float,
             resend_s: float = 2.0) -> None:
        """Lockstep stops (ReplayError) after MAX_UNANSWERED_IN_A_ROW frames without an action: a policy
        that does not act (another goal mode, stale inputs) would otherwise cost a timeout per frame."""
        start, unanswered = time.monotonic(), 0
        for index, frame in enumerate(frames):
            if frame.sets_goal:
                self.publish_goal(frame)
            due = _due_time(rate, speed, index, frame)
            if due is not None:
                self.spin_until(lambda: False, max(0.0, start + due - time.monotonic()))
            self.publish_frame(index, frame)
            if rate == "lockstep":
                unanswered = 0 if self._await_action(index, frame, action_timeout_s, resend_s) else unanswered + 1
                if unanswered == MAX_UNANSWERED_IN_A_ROW:
                    raise ReplayError(f"no action for {unanswered} frames in a row (up to frame {index}): is the policy "
                                      "acting? Check its goal mode against the source's goals and its diagnostics")
        # Open-loop rates: give the last actions time to arrive.
        self.spin_until(lambda: len(self.actions) == len(frames), action_timeout_s if rate != "lockstep" else 0.0)

    def _await_action(self, index: int, frame: ReplayFrame, timeout_s: float, resend_s: float) -> bool:
        """True when the frame's action arrived within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not self.spin_until(lambda: index in self.actions, min(resend_s, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                self.get_logger().warning(f"no action for frame {index} within {timeout_s:g} s; going on")
                return False
            # A frame lost on the best-effort camera link, or one that raced its goal: show it again.
            self.resends += 1
            self.publish_frame(index, frame)
        return True

    def report(self, frames: list[ReplayFrame], source: str, rate: str) -> dict:
        both = [i for i in range(len(frames)) if i in self.actions and frames[i].recorded_action is not None]
        comparison = None
        if both:
            comparison = compare_actions(np.stack([frames[i].recorded_action for i in both]),
                                         np.stack([self.actions[i] for i in both]))
        return {
            "source": source,
            "rate": rate,
            "frames_played": len(frames),
            "frames_with_action": len(self.actions),
            "frames_with_recorded_action": sum(f.recorded_action is not None for f in frames),
            "unmatched_actions": self.unmatched_actions,
            "resends": self.resends,
            "w_values": sorted(self.w_values),
            "latency_ms_median": float(np.median(self.latency_ms)) if self.latency_ms else math.nan,
            "comparison": comparison,
            "replayed_actions": {str(i): a.tolist() for i, a in sorted(self.actions.items())},
        }


def _due_time(rate: str, speed: float, index: int, frame: ReplayFrame) -> float | None:
    """Seconds after the start at which the frame is due, or None for lockstep (no schedule)."""
    if rate == "lockstep":
        return None
    if rate == "recorded":
        return frame.time_s / speed
    return index / float(rate)


def load_frames(args: argparse.Namespace) -> list[ReplayFrame]:
    source = Path(args.source)
    if source.suffix == ".npz":
        return dataset_frames(source, env_name=args.env_name, episodes=args.episodes, max_frames=args.max_frames,
                              hz=args.dataset_hz, cache_dir=args.cache_dir)
    return bag_frames(source, max_frames=args.max_frames, camera_topic=args.camera_topic,
                      goal_image_topic=args.goal_image_topic, goal_vector_topic=args.goal_vector_topic,
                      action_topic=args.action_topic)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="cfgrl_replay_node",
                                     description="Replay a dataset or bag into the policy node; compare actions.")
    parser.add_argument("--source", required=True, help="OGBench .npz dataset or rosbag2 bag directory")
    parser.add_argument("--rate", default="recorded", help="recorded (the source's timing), lockstep (each frame waits for its action) or a rate in Hz (default: recorded)")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed factor for --rate recorded (default: 1)")
    parser.add_argument("--out", default="replay_out", help="directory for replay_report.{md,json} (default: replay_out)")
    parser.add_argument("--record", default=None, help="also record inputs and actions to this new bag")
    parser.add_argument("--env-name", default=None, help="dataset env, for oracle goal vectors from qpos")
    parser.add_argument("--episodes", default=None, help="dataset episodes to play, e.g. 0,3 (default: all)")
    parser.add_argument("--max-frames", type=int, default=None, help="play at most this many frames")
    parser.add_argument("--dataset-hz", type=float, default=20.0, help="recorded rate of a dataset (default: 20, the envs' control rate)")
    parser.add_argument("--cache-dir", default=None, help="where the dataset loader may cache observations")
    parser.add_argument("--action-timeout", type=float, default=10.0, help="seconds to wait for an action (default: 10)")
    # A bag recorded in a namespace or with remaps stores resolved names, e.g. /robot1/camera/image.
    for flag, default in (("camera-topic", "camera/image"), ("goal-image-topic", "goal/image"),
                          ("goal-vector-topic", "goal/vector"), ("action-topic", "action")):
        parser.add_argument(f"--{flag}", default=default, help=f"the bag's {flag[:-6].replace('-', ' ')} topic (default: {default})")
    parser.add_argument("--policy-timeout", type=float, default=60.0, help="seconds to wait for the policy node (default: 60)")
    args, ros_args = parser.parse_known_args(argv)
    if args.rate not in ("recorded", "lockstep"):
        try:
            if not (math.isfinite(float(args.rate)) and float(args.rate) > 0):
                raise ValueError
        except ValueError:
            parser.error(f"--rate must be recorded, lockstep or a positive number of Hz, got {args.rate!r}")
    for name in ("speed", "dataset_hz", "action_timeout", "policy_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.speed != 1.0 and args.rate != "recorded":  # it would be silently ignored
        parser.error(f"--speed scales --rate recorded; with --rate {args.rate} give the rate itself")
    if args.episodes is not None:
        try:
            args.episodes = [int(e) for e in args.episodes.split(",")]
        except ValueError:
            parser.error(f"--episodes takes comma-separated episode numbers, e.g. 0,3; got {args.episodes!r}")
    if args.record is not None and Path(args.record).exists():
        parser.error(f"--record {args.record} exists; rosbag2 bags are never overwritten, choose a new path")
    return args, ros_args


def main(argv: list[str] | None = None) -> int:
    args, ros_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        frames = load_frames(args)
    except (ReplayError, BagError, DatasetError) as error:
        print(f"cfgrl_replay_node: error: {error}", file=sys.stderr)
        return 2
    stop_between_messages()  # Ctrl-C ends the replay cleanly, and never in the middle of a --record write
    rclpy.init(args=[sys.argv[0], *ros_args])
    executor = SingleThreadedExecutor()
    recorder = TopicRecorder(args.record, name="cfgrl_replay_recorder") if args.record else None
    if recorder is not None:
        executor.add_node(recorder)
    node = ReplayNode(executor, recorder)
    executor.add_node(node)
    try:
        try:
            node.wait_for_policy(args.policy_timeout)
        except TimeoutError as error:
            node.get_logger().error(str(error))
            return 1
        node.get_logger().info(f"playing {len(frames)} frames of {args.source} at rate {args.rate}")
        try:
            node.play(frames, args.rate, args.speed, args.action_timeout)
        except ReplayError as error:
            node.get_logger().error(str(error))
            return 1
        if recorder is not None:  # the last action must be in the bag before it closes
            action_topic = recorder.resolve_topic_name(bridge.ACTION_TOPIC)
            node.spin_until(lambda: recorder.writer.counts.get(action_topic, 0) >= len(node.actions), 5.0)
        report = node.report(frames, str(args.source), args.rate)
        path = write_replay_report(report, args.out)
        print(path.read_text())
    except ExternalShutdownException:
        print(f"cfgrl_replay_node: interrupted after {len(node.actions)} actions; no report written"
              + (f"; {args.record} closed" if recorder is not None else ""), file=sys.stderr)
        return 130
    finally:
        if recorder is not None:
            recorder.close()
        executor.shutdown()
        rclpy.try_shutdown()
    return 0 if node.actions else 1


if __name__ == "__main__":
    sys.exit(main())
