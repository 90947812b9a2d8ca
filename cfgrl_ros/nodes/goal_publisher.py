#!/usr/bin/env python3
"""cfgrl_goal: give the policy node its goal, as a latched message on goal/image or goal/vector.

    cfgrl_goal --image goal.png                  # a goal image from a file
    cfgrl_goal --snapshot [--save goal.png]      # the next camera/image frame becomes the goal
    cfgrl_goal --vector -0.1,0.2,0.3             # an oracle goal vector

The goal is published reliable and transient-local, as the node subscribes, and the command stays up
(Ctrl-C ends it) so that a node started later still receives it; `--once` exits as soon as every
subscriber present has acknowledged it (the node keeps a goal it has received). Inputs are checked
before anything is published: an unreadable image or a non-finite vector is an error, not a goal.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import rclpy
from rclpy.duration import Duration
from rclpy.event_handler import PublisherEventCallbacks, qos_policy_name_from_kind
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray

from cfgrl_ros.image import ImageError, image_to_rgb
from cfgrl_ros.nodes import bridge

NODE_NAME = "cfgrl_goal"


class GoalError(ValueError):
    """A goal that must not be published: unreadable, empty or non-finite."""


def read_goal_image(path: Path) -> np.ndarray:
    """(H, W, 3) RGB uint8 from an image file (PNG, JPEG, ...)."""
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR; None for a missing or undecodable file
    if pixels is None:
        raise GoalError(f"{path}: not a readable image file")
    return np.ascontiguousarray(pixels[:, :, ::-1])


def parse_goal_vector(text: str) -> np.ndarray:
    try:  # an empty entry ("1,,2") is a typo, not a shorter vector
        values = np.array([float(x) for x in text.split(",")], dtype=np.float32)
    except ValueError:
        raise GoalError(f"--vector takes comma-separated numbers, got {text!r}") from None
    if values.size == 0 or not np.isfinite(values).all():
        raise GoalError(f"--vector must hold finite numbers, got {text!r}")
    return values


class GoalPublisher(Node):
    def __init__(self, goal_image: np.ndarray | None, goal_vector: np.ndarray | None, save: Path | None = None):
        super().__init__(NODE_NAME)
        topic = bridge.GOAL_VECTOR_TOPIC if goal_vector is not None else bridge.GOAL_IMAGE_TOPIC
        message_type = Float32MultiArray if goal_vector is not None else Image
        self.matched = 0  # subscribers ever matched: one that took the goal and left still counts
        events = PublisherEventCallbacks(matched=self._on_matched, incompatible_qos=self._on_incompatible_qos)
        self.publisher = self.create_publisher(message_type, topic, bridge.LATCHED_QOS, event_callbacks=events)
        self.published = False
        self._save = save
        if goal_vector is not None:
            self._publish(bridge.vector_message(goal_vector), f"goal vector {goal_vector.tolist()}")
        elif goal_image is not None:
            self._publish(self._image(goal_image), f"goal image {goal_image.shape[1]}x{goal_image.shape[0]}")
        else:  # a snapshot: best-effort, as camera drivers publish
            self._camera = self.create_subscription(Image, bridge.CAMERA_TOPIC, self._on_camera,
                                                    qos_profile_sensor_data)
            self.get_logger().info(f"waiting for a frame on {self.resolve_topic_name(bridge.CAMERA_TOPIC)}")

    def _image(self, pixels: np.ndarray) -> Image:
        return bridge.rgb_image(pixels, self.get_clock().now().to_msg(), "goal")

    def _on_camera(self, message: Image) -> None:
        if self.published:
            return
        try:
            pixels = image_to_rgb(message).copy()
        except ImageError as error:  # a bad frame is not a goal: wait for the next one
            self.get_logger().error(f"camera frame refused as a goal: {error}", throttle_duration_sec=1.0)
            return
        if self._save is not None and not cv2.imwrite(str(self._save), pixels[:, :, ::-1]):
            self.get_logger().error(f"could not write the snapshot to {self._save}; publishing it anyway")
        self._publish(self._image(pixels), f"camera snapshot {pixels.shape[1]}x{pixels.shape[0]}"
                      + (f", saved to {self._save}" if self._save else ""))
        self.destroy_subscription(self._camera)

    def _publish(self, message, what: str) -> None:
        self.publisher.publish(message)
        self.published = True
        self.get_logger().info(f"published the {what} on {self.publisher.topic_name} (latched)")

    def _on_matched(self, info) -> None:
        self.matched = max(self.matched, info.total_count)

    def _on_incompatible_qos(self, info) -> None:  # otherwise that subscriber silently never gets the goal
        self.get_logger().error(f"a subscriber's QoS is incompatible ({qos_policy_name_from_kind(info.last_policy_kind)});"
                                " the goal is published reliable and transient-local")

    def delivered(self) -> bool:
        """Published, a subscriber matched, and every subscriber present has acknowledged it."""
        return self.published and self.matched > 0 and self.publisher.wait_for_all_acked(Duration(seconds=0.1))


def _join_vector_value(argv: list[str]) -> list[str]:
    """`--vector -0.1,0.2` as `--vector=-0.1,0.2`: argparse takes a value starting with '-' for an option."""
    joined, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--vector" and rest and not rest[0].startswith("--"):
            arg = f"--vector={rest.pop(0)}"
        joined.append(arg)
    return joined


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="cfgrl_goal", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="goal image file (PNG, JPEG, ...), for image-goal policies")
    source.add_argument("--snapshot", action="store_true", help="take the next camera/image frame as the goal image")
    source.add_argument("--vector", help="comma-separated goal vector, for oracle-goal policies")
    parser.add_argument("--save", type=Path, help="--snapshot: also write the frame to this image file")
    parser.add_argument("--once", action="store_true",
                        help="exit once a subscriber has acknowledged the goal (default: stay up, serving late joiners)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="with --once: fail after this many seconds without delivery (default: 0, never)")
    args, ros_args = parser.parse_known_args(_join_vector_value(argv))
    if args.save is not None and not args.snapshot:
        parser.error("--save goes with --snapshot")
    if args.save is not None and not args.save.resolve().parent.is_dir():
        parser.error(f"--save {args.save}: the directory does not exist")
    if args.timeout and not args.once:
        parser.error("--timeout goes with --once")
    if not (math.isfinite(args.timeout) and args.timeout >= 0):
        parser.error(f"--timeout must be a number >= 0, got {args.timeout}")
    return args, ros_args


def main(argv: list[str] | None = None) -> int:
    args, ros_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        goal_image = read_goal_image(args.image) if args.image else None
        goal_vector = parse_goal_vector(args.vector) if args.vector else None
    except GoalError as error:
        print(f"cfgrl_goal: error: {error}", file=sys.stderr)
        return 2
    rclpy.init(args=[sys.argv[0], *ros_args])
    node = GoalPublisher(goal_image, goal_vector, args.save)
    executor = SingleThreadedExecutor()  # its own, shut down before destroy_node (bridge.spin_until_shutdown)
    executor.add_node(node)
    deadline = time.monotonic() + args.timeout if args.timeout else math.inf
    code = 0
    try:
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
            if args.once and node.delivered():
                node.get_logger().info("delivered")
                break
            if time.monotonic() > deadline:
                node.get_logger().error(f"no subscriber acknowledged the goal within {args.timeout:g} s")
                code = 1
                break
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
