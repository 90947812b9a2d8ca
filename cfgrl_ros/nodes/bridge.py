"""What the sim, replay and recorder nodes share: the policy node's topics, their QoS, message conversions.

QoS matches the policy node: it subscribes to the camera best-effort keep-last-1 and to the goals
reliable transient-local, and publishes actions reliable keep-last-1. Our publishers are reliable
(a reliable publisher serves best-effort and reliable subscribers alike, so a recorder gets every frame).
"""

from __future__ import annotations

import json
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rclpy.executors import Executor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray, MultiArrayDimension, String

CAMERA_TOPIC = "camera/image"
COMPRESSED_CAMERA_TOPIC = f"{CAMERA_TOPIC}/compressed"  # image_transport's name for the compressed stream
GOAL_IMAGE_TOPIC = "goal/image"
GOAL_VECTOR_TOPIC = "goal/vector"
ACTION_TOPIC = "action"
RESULT_TOPIC = "episode/result"
STATUS_TOPIC = "sim/status"

CAMERA_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
ACTION_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
EVENTS_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)


def spin_until_shutdown(executor: Executor) -> None:
    """Spin until the context shuts down (Ctrl-C, SIGTERM). Polled: an executor waiting without a timeout
    was seen to sleep through the SIGINT shutdown. Shut the executor down before destroying its nodes:
    rclpy's global executor (rclpy.spin) was seen to hang destroy_node."""
    while rclpy.ok():
        executor.spin_once(timeout_sec=0.1)


def rgb_image(pixels: np.ndarray, stamp: Time, frame_id: str) -> Image:
    """(H, W, 3) uint8 -> rgb8 Image. Assigning bytes, not the array, is ~350x faster in rclpy."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {pixels.dtype} {pixels.shape}")
    message = Image(height=pixels.shape[0], width=pixels.shape[1], encoding="rgb8", is_bigendian=0,
                    step=pixels.shape[1] * 3)
    message.header.stamp, message.header.frame_id = stamp, frame_id
    message.data = np.ascontiguousarray(pixels).tobytes()
    return message


def vector_message(values: np.ndarray) -> Float32MultiArray:
    message = Float32MultiArray()
    message.layout.dim = [MultiArrayDimension(label="goal", size=len(values), stride=len(values))]
    message.data = np.asarray(values, dtype=np.float32).tolist()
    return message


def json_message(payload: dict) -> String:
    return String(data=json.dumps(payload, sort_keys=True))


def stamp_from_ns(nanoseconds: int) -> Time:
    return Time(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)


def stamp_to_ns(stamp: Time) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def goal_links_ready(node, goal_publishers) -> bool:
    """True when every policy node (camera subscriber and action publisher) has a goal subscription
    and every discovered goal subscription is matched to our goal publishers.

    A goal published before that match reaches the policy after the first frame, which the policy
    then drops (no goal yet): publishers wait for this before the first frame of an episode. Camera
    viewers (no action publisher) do not count.
    """
    def nodes(infos) -> set:
        return {(info.node_namespace, info.node_name) for info in infos}

    def subscribers(topic: str) -> list:
        return node.get_subscriptions_info_by_topic(node.resolve_topic_name(topic))

    policies = nodes(subscribers(CAMERA_TOPIC)) & nodes(
        node.get_publishers_info_by_topic(node.resolve_topic_name(ACTION_TOPIC)))
    goal_infos = subscribers(GOAL_IMAGE_TOPIC) + subscribers(GOAL_VECTOR_TOPIC)
    matched = sum(publisher.get_subscription_count() for publisher in goal_publishers)
    return policies <= nodes(goal_infos) and matched >= len(goal_infos)


def wait_for_goal_links(node, goal_publishers, timeout_s: float) -> bool:
    """Poll `goal_links_ready` (discovery runs on DDS threads, no spinning needed) up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not goal_links_ready(node, goal_publishers):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
