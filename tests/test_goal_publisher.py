"""cfgrl_goal over real DDS: a goal image from a file, a camera snapshot and a goal vector reach a latched
subscriber exactly as the policy node subscribes; bad goals are refused before anything is published."""

from __future__ import annotations

import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.requires_rclpy  # the command is an rclpy node, even where it only parses arguments

GOAL_MODULE = "cfgrl_ros.nodes.goal_publisher"


def start_goal(ros_env, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", GOAL_MODULE, *args, "--once", "--timeout", "60"], env=ros_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def receive(topic: str, message_type, publish_camera: np.ndarray | None = None, timeout_s: float = 60.0):
    """The first message on a latched topic, subscribed as the policy node does; optionally feeding a
    camera frame until then (for --snapshot), each time after a malformed one, which must never become
    the goal."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from cfgrl_ros.nodes import bridge

    rclpy.init()
    node = rclpy.create_node("goal_listener")
    # An executor of its own, shut down before destroy_node: with rclpy's global one (rclpy.spin_once),
    # destroy_node was seen to spin forever waiting for the node's handles to be released.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    received = []
    qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_subscription(message_type, topic, received.append, qos)
    camera = node.create_publisher(Image, "camera/image", bridge.CAMERA_QOS) if publish_camera is not None else None
    try:
        deadline = time.monotonic() + timeout_s
        while camera is not None and not camera.get_subscription_count() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)  # matched first: the malformed frame is not lost to discovery
        while not received and time.monotonic() < deadline:
            if camera is not None:
                good = bridge.rgb_image(publish_camera, node.get_clock().now().to_msg(), "camera")
                camera.publish(Image(height=good.height, width=good.width, encoding="nv21", step=good.step,
                                     data=good.data))
                camera.publish(good)
            executor.spin_once(timeout_sec=0.1)
        return received[0] if received else None
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


def finish(process: subprocess.Popen) -> str:
    try:
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    return output


def test_a_goal_image_file_reaches_the_node_latched(ros_env, tmp_path):
    from sensor_msgs.msg import Image

    from cfgrl_ros.image import image_to_rgb

    goal = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "goal.png"), goal[:, :, ::-1])  # PNG stores BGR through OpenCV
    process = start_goal(ros_env, "--image", str(tmp_path / "goal.png"))
    message = receive("goal/image", Image)
    output = finish(process)
    assert message is not None, output
    np.testing.assert_array_equal(image_to_rgb(message), goal)
    assert "published the goal image 40x48" in output and "delivered" in output


def test_a_snapshot_makes_the_next_camera_frame_the_goal(ros_env, tmp_path):
    from sensor_msgs.msg import Image

    from cfgrl_ros.image import image_to_rgb

    frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    process = start_goal(ros_env, "--snapshot", "--save", str(tmp_path / "snap.png"))
    message = receive("goal/image", Image, publish_camera=frame)
    output = finish(process)
    assert message is not None, output
    np.testing.assert_array_equal(image_to_rgb(message), frame)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "snap.png"))[:, :, ::-1], frame)
    assert "camera frame refused as a goal: unsupported encoding 'nv21'" in output


def test_a_goal_vector_reaches_the_node_latched(ros_env):
    from std_msgs.msg import Float32MultiArray

    process = start_goal(ros_env, "--vector", "-0.5,-1.25,3")  # oracle goals often start negative
    message = receive("goal/vector", Float32MultiArray)
    finish(process)
    assert message is not None and list(message.data) == [-0.5, -1.25, 3.0]


def test_bad_goals_are_refused_before_anything_is_published(tmp_path, capsys):
    from cfgrl_ros.nodes.goal_publisher import main

    (tmp_path / "not-an-image.png").write_text("hello")
    for argv, message in ((["--vector", "1,nan"], "must hold finite numbers"),
                          (["--vector", "1,x"], "comma-separated numbers"),
                          (["--vector", "1,,2"], "comma-separated numbers"),
                          (["--vector", "-1,,2"], "comma-separated numbers"),
                          (["--image", str(tmp_path / "not-an-image.png")], "not a readable image file"),
                          (["--image", str(tmp_path / "missing.png")], "not a readable image file")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    for argv, message in ((["--vector", "1", "--save", "x.png"], "--save goes with --snapshot"),
                          (["--vector", "1", "--timeout", "5"], "--timeout goes with --once"),
                          (["--snapshot", "--save", str(tmp_path / "nowhere" / "x.png")], "the directory does not exist"),
                          (["--vector", "1", "--image", "x.png"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
