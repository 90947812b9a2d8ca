#!/usr/bin/env python3
"""cfgrl_recorder: writes the policy node's inputs and outputs to a rosbag2 mcap bag.

Raw (CDR) subscriptions, so messages are stored exactly as they travelled, stamped with their
receive time, like `ros2 bag record`. The camera is subscribed reliable by default (our sim and
replay nodes publish reliable, and no frame is lost); a camera driver publishing best-effort (sensor
QoS) needs `--camera-qos best_effort`, and an incompatible publisher is reported in the log. A camera
that streams only image_transport's compressed images: `--camera-transport compressed` records
camera/image/compressed instead.

Demonstrations: `--teleop-topic joy --teleop-type joy` also records a teleoperation command topic
(sensor_msgs/Joy or std_msgs/Float32MultiArray), which cfgrl-bags-to-dataset turns into training data.

Run: python -m cfgrl_ros.nodes.recorder --out run1_bag  (Ctrl-C ends the recording). A killed recorder
leaves a bag no reader opens (no metadata.yaml, no MCAP summary); `--recover run1_bag` copies every
chunk it finished (all but the last ~1 MiB of messages) into a new bag, run1_bag-recovered.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

import rclpy
from rclpy.event_handler import SubscriptionEventCallbacks, qos_policy_name_from_kind
from rclpy.exceptions import InvalidTopicNameException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.validate_topic_name import validate_topic_name
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from sensor_msgs.msg import CompressedImage, Image, Joy
from std_msgs.msg import Float32MultiArray, String

from cfgrl_ros import bags
from cfgrl_ros.msg import PolicyAction
from cfgrl_ros.node_params import CAMERA_TRANSPORTS
from cfgrl_ros.nodes import bridge

DEEP_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
CAMERA_QOS = {"reliable": DEEP_QOS,
              "best_effort": QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT,
                                        history=HistoryPolicy.KEEP_LAST)}
# topic -> (rclpy type, bag type name, QoS)
RECORDED_TOPICS = {
    bridge.CAMERA_TOPIC: (Image, bags.IMAGE_TYPE, DEEP_QOS),
    bridge.GOAL_IMAGE_TOPIC: (Image, bags.IMAGE_TYPE, bridge.LATCHED_QOS),
    bridge.GOAL_VECTOR_TOPIC: (Float32MultiArray, bags.VECTOR_TYPE, bridge.LATCHED_QOS),
    bridge.ACTION_TOPIC: (PolicyAction, bags.POLICY_ACTION_TYPE, DEEP_QOS),
    bridge.RESULT_TOPIC: (String, bags.STRING_TYPE, bridge.EVENTS_QOS),
}

CAMERA_TOPICS = (bridge.CAMERA_TOPIC, bridge.COMPRESSED_CAMERA_TOPIC)  # --camera-transport raw or compressed

# --teleop-type -> (rclpy type, bag type name): demonstration commands for cfgrl-bags-to-dataset.
TELEOP_TYPES = {"joy": (Joy, bags.JOY_TYPE), "float32multiarray": (Float32MultiArray, bags.VECTOR_TYPE)}


def bag_qos(profile: QoSProfile) -> Qos:
    """An rclpy QoS profile as a bag's offered_qos_profiles entry (the enums share rmw's values)."""
    unspecified = QosTime(sec=0, nsec=0)  # rmw's "default" deadline, lifespan and lease
    return Qos(history=QosHistory(int(profile.history)), depth=profile.depth,
               reliability=QosReliability(int(profile.reliability)), durability=QosDurability(int(profile.durability)),
               deadline=unspecified, lifespan=unspecified, liveliness=QosLiveliness.SYSTEM_DEFAULT,
               liveliness_lease_duration=unspecified, avoid_ros_namespace_conventions=False)


class TopicRecorder(Node):
    """Each topic recorded with the QoS it is subscribed with, which is also what its bag offers on playback."""

    def __init__(self, bag_path: str, topics: dict = RECORDED_TOPICS, name: str = "cfgrl_recorder",
                 camera_qos: str = "reliable"):
        super().__init__(name)
        self.writer = bags.BagWriter(bag_path)
        try:
            for topic, (msg_class, type_name, qos) in topics.items():
                qos = CAMERA_QOS[camera_qos] if topic in CAMERA_TOPICS else qos
                self.create_subscription(msg_class, topic, self._writer_for(topic, type_name, qos), qos, raw=True,
                                         event_callbacks=self._qos_events(topic))
        except BaseException:  # e.g. an invalid topic name: no empty bag is left to block the next --out
            self.writer.close()
            shutil.rmtree(bag_path, ignore_errors=True)
            raise
        self.get_logger().info(f"recording {', '.join(topics)} to {bag_path}")

    def _qos_events(self, topic: str) -> SubscriptionEventCallbacks:
        def incompatible(info) -> None:  # otherwise the topic is silently missing from the bag
            hint = " (a best-effort camera? use --camera-qos best_effort)" if topic in CAMERA_TOPICS else ""
            self.get_logger().error(f"{self.resolve_topic_name(topic)}: a publisher's QoS is incompatible "
                                    f"({qos_policy_name_from_kind(info.last_policy_kind)}); not recorded{hint}")
        return SubscriptionEventCallbacks(incompatible_qos=incompatible)

    def _writer_for(self, topic: str, type_name: str, qos: QoSProfile):
        resolved = self.resolve_topic_name(topic)  # absolute, as `ros2 bag record` stores it
        offered = bag_qos(qos)

        def write(data: bytes) -> None:
            self.writer.write_cdr(resolved, type_name, self.get_clock().now().nanoseconds, data, offered)
        return write

    def close(self) -> None:
        self.writer.close()
        if self.context.ok():
            self.get_logger().info(f"bag closed: {self.writer.counts}")
        else:  # after Ctrl-C the logger can no longer reach /rosout
            print(f"[{self.get_name()}] bag closed: {self.writer.counts}", file=sys.stderr)


def stop_between_messages() -> None:
    """Ctrl-C as SIGTERM: rclpy shuts the context down and spin returns between callbacks. Python's
    KeyboardInterrupt, which rclpy would also raise, can land in the middle of a bag write."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # before rclpy.init, which keeps no Python handler to chain


def recover(bag: str, out: str) -> int:
    try:
        counts = bags.recover_bag(bag, out)
    except bags.BagError as error:
        print(f"cfgrl_recorder: {error}", file=sys.stderr)
        return 1
    print(f"recovered {sum(counts.values())} messages into {out}: {counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="cfgrl_recorder", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="new rosbag2 directory to create (with --recover: default BAG-recovered)")
    parser.add_argument("--camera-qos", choices=sorted(CAMERA_QOS), default="reliable",
                        help="reliability of the camera subscription (best_effort for a sensor-QoS camera)")
    parser.add_argument("--camera-transport", choices=CAMERA_TRANSPORTS, default="raw",
                        help=f"raw: sensor_msgs/Image on {bridge.CAMERA_TOPIC}; compressed: sensor_msgs/CompressedImage "
                             f"on {bridge.COMPRESSED_CAMERA_TOPIC} (image_transport's JPEG/PNG stream)")
    parser.add_argument("--teleop-topic", help="also record this teleoperation command topic (demonstrations)")
    parser.add_argument("--teleop-type", choices=sorted(TELEOP_TYPES), default="joy",
                        help="message type of --teleop-topic (default: joy, i.e. sensor_msgs/Joy)")
    parser.add_argument("--recover", metavar="BAG",
                        help="do not record: copy what a killed recorder left in BAG into a new bag, and exit")
    args, ros_args = parser.parse_known_args(argv)
    if args.recover:
        return recover(args.recover, args.out or args.recover.rstrip("/") + "-recovered")
    if args.out is None:
        parser.error("--out is required (the new bag directory)")
    if args.teleop_topic and bags.same_topic(args.teleop_topic) in map(bags.same_topic, RECORDED_TOPICS):
        parser.error(f"--teleop-topic {args.teleop_topic} is recorded already, as the node's own topic")
    if args.teleop_topic:
        try:
            validate_topic_name(args.teleop_topic)
        except InvalidTopicNameException as error:
            parser.error(f"--teleop-topic {args.teleop_topic!r} is not a topic name: {error}")
    if Path(args.out).exists():
        parser.error(f"{args.out} exists; rosbag2 bags are never overwritten, choose a new path")
    stop_between_messages()
    rclpy.init(args=[sys.argv[0], *ros_args])
    topics = dict(RECORDED_TOPICS)
    if args.camera_transport == "compressed":
        del topics[bridge.CAMERA_TOPIC]
        topics[bridge.COMPRESSED_CAMERA_TOPIC] = (CompressedImage, bags.COMPRESSED_IMAGE_TYPE, DEEP_QOS)
    if args.teleop_topic:
        topics[args.teleop_topic] = (*TELEOP_TYPES[args.teleop_type], DEEP_QOS)
    recorder = TopicRecorder(args.out, topics, camera_qos=args.camera_qos)
    executor = SingleThreadedExecutor()
    executor.add_node(recorder)
    try:
        bridge.spin_until_shutdown(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        recorder.close()
        executor.shutdown()
        recorder.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
