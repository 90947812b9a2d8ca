"""cfgrl_ros/msg/PolicyAction: field contract, CDR round trip, and pub/sub between two processes.

Run as a script (`python tests/test_messages.py publish TOPIC`) it is the publisher process.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.requires_rclpy

# 1/3 and 0.1 are not float32-exact: they show the float64 -> float32 rounding on the way in.
ACTION = [0.1, -0.5, 1.0 / 3.0, 1.0]
DISCOVERY_TIMEOUT_S = 20.0  # discovery usually takes <0.3 s, sometimes ~2.6 s on a loaded machine


def make_policy_action():
    from cfgrl_ros.msg import PolicyAction

    msg = PolicyAction()
    msg.header.stamp.sec = 1_700_000_123
    msg.header.stamp.nanosec = 456_789_012
    msg.header.frame_id = "base_link"
    msg.image_stamp.sec = 1_700_000_122
    msg.image_stamp.nanosec = 999_000_001
    msg.action = ACTION
    msg.w = 3.0
    msg.flow_steps = 16
    msg.inference_time_ms = 4.25
    return msg


def test_fields_match_the_interface_contract():
    from cfgrl_ros.msg import PolicyAction

    assert PolicyAction.get_fields_and_field_types() == {
        "header": "std_msgs/Header",
        "image_stamp": "builtin_interfaces/Time",
        "action": "sequence<float>",
        "w": "float",
        "flow_steps": "uint16",
        "inference_time_ms": "float",
    }


def test_serialize_round_trip_keeps_every_field_and_float32_action():
    from rclpy.serialization import deserialize_message, serialize_message
    from cfgrl_ros.msg import PolicyAction

    sent = make_policy_action()
    received = deserialize_message(serialize_message(sent), PolicyAction)

    assert received == sent
    assert (received.header.stamp.sec, received.header.stamp.nanosec) == (1_700_000_123, 456_789_012)
    assert received.header.frame_id == "base_link"
    assert (received.image_stamp.sec, received.image_stamp.nanosec) == (1_700_000_122, 999_000_001)
    assert (received.w, received.flow_steps, received.inference_time_ms) == (3.0, 16, 4.25)
    # float32 on the wire: values come back as the float32 nearest to what was set, not float64.
    action = np.frombuffer(received.action, dtype=np.float32)
    np.testing.assert_array_equal(action, np.array(ACTION, dtype=np.float32))
    assert received.action[2] != 1.0 / 3.0


def test_action_accepts_float32_bytes_buffer():
    """Nodes fill `action` from a float32 array without a per-element conversion."""
    from rclpy.serialization import deserialize_message, serialize_message
    from cfgrl_ros.msg import PolicyAction

    values = np.linspace(-1.0, 1.0, 7, dtype=np.float32)
    msg = PolicyAction()
    msg.action.frombytes(values.tobytes())
    received = deserialize_message(serialize_message(msg), PolicyAction)
    np.testing.assert_array_equal(np.frombuffer(received.action, dtype=np.float32), values)


def test_publish_subscribe_between_two_processes(ros_env):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from cfgrl_ros.msg import PolicyAction

    topic = "/cfgrl_test/policy_action"
    context = rclpy.Context()
    rclpy.init(context=context)
    publisher = None
    try:
        node = rclpy.create_node("policy_action_listener", context=context)
        received = []
        node.create_subscription(PolicyAction, topic, received.append, 10)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        publisher = subprocess.Popen(
            [sys.executable, __file__, "publish", topic], env=ros_env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while not received and time.monotonic() < deadline and publisher.poll() is None:
            executor.spin_once(timeout_sec=0.05)

        output, _ = publisher.communicate(timeout=DISCOVERY_TIMEOUT_S)  # closes its stdin: it exits
        assert publisher.returncode == 0, f"publisher failed:\n{output}"
        assert received, f"no PolicyAction within {DISCOVERY_TIMEOUT_S} s; publisher said:\n{output}"
        assert received[0] == make_policy_action()
        types = dict(node.get_topic_names_and_types())
        assert types[topic] == ["cfgrl_ros/msg/PolicyAction"]
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
            publisher.wait()
        context.try_shutdown()


def publish_once(topic: str) -> int:
    """Publisher process: waits for the subscriber, publishes one message, and stays up (Fast DDS
    resends reliable data from its own threads) until the test closes our stdin."""
    import rclpy
    from cfgrl_ros.msg import PolicyAction

    rclpy.init()
    try:
        node = rclpy.create_node("policy_action_talker")
        publisher = node.create_publisher(PolicyAction, topic, 10)  # reliable, volatile
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while publisher.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                print(f"no subscriber on {topic} within {DISCOVERY_TIMEOUT_S} s")
                return 1
            time.sleep(0.01)  # polling the graph; discovery runs in Fast DDS's own threads
        publisher.publish(make_policy_action())
        sys.stdin.read()
        return 0
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] != ["publish"] or len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} publish TOPIC")
    sys.exit(publish_once(sys.argv[2]))
