"""cfgrl-bags-to-dataset: real rosbag2 bags on disk become an OGBench-format dataset that ogbench,
the project's loader and cfgrl-train take; what cannot be training data is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfgrl_ros import bags
from cfgrl_ros.image import fit_to_policy
from training.bags_to_dataset import ImportBagError, ImportSettings, import_bags, main
from training.data import load_dataset_pair

PERIOD_NS = 50_000_000  # a 20 Hz camera
SETTINGS = ImportSettings(image_size=16)


def random_frames(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 24, 32, 3), dtype=np.uint8)


def teleop_bag(path, frames: np.ndarray, actions: np.ndarray, pause_after: int | None = None,
               encoding: str = "rgb8", action_topic: str = "/teleop/command") -> None:
    """Camera frames, each followed 5 ms later by a Float32MultiArray command; a 3 s pause after
    frame `pause_after`."""
    with bags.BagWriter(path) as writer:
        for i, (frame, action) in enumerate(zip(frames, actions)):
            t = 10**9 + i * PERIOD_NS + (3 * 10**9 if pause_after is not None and i > pause_after else 0)
            message = bags.image_message(frame[:, :, ::-1] if encoding == "bgr8" else frame, t)
            message.encoding = encoding
            writer.write("/camera/image", bags.IMAGE_TYPE, t, message)
            writer.write(action_topic, bags.VECTOR_TYPE, t + 5_000_000, bags.vector_message(action))


def policy_bag(path, frames: np.ndarray, actions: np.ndarray, stale_at: int, camera_stamps: bool = True) -> None:
    """What cfgrl_recorder records: frames and PolicyActions matched by image_stamp, one stale stop.
    camera_stamps False: a camera that leaves its stamps 0, which the policy node copies into image_stamp."""
    types = bags.typestore().types
    with bags.BagWriter(path) as writer:
        for i, (frame, action) in enumerate(zip(frames, actions)):
            t = 10**9 + i * PERIOD_NS
            stamp = t if camera_stamps else 0
            writer.write("/camera/image", bags.IMAGE_TYPE, t, bags.image_message(frame, stamp))
            header = types["std_msgs/msg/Header"](stamp=bags.make_stamp(t + 2000), frame_id="base_link")
            message = types[bags.POLICY_ACTION_TYPE](
                header=header, image_stamp=bags.make_stamp(stamp), action=action.astype(np.float32), w=3.0,
                flow_steps=16, inference_time_ms=0.0 if i == stale_at else 4.0)
            writer.write("/action", bags.POLICY_ACTION_TYPE, t + 3000, message)


def test_teleop_bags_become_a_dataset_that_loads_and_trains(tmp_path):
    import ogbench

    from training.train import TrainConfig, train

    rng = np.random.default_rng(0)
    frames = [random_frames(12, 1), random_frames(8, 2), random_frames(6, 3)]
    actions = [rng.uniform(-1, 1, (len(f), 3)).astype(np.float32) for f in frames]
    teleop_bag(tmp_path / "bag0", frames[0], actions[0], pause_after=4)  # two episodes: 5 + 7 rows
    teleop_bag(tmp_path / "bag1", frames[1], actions[1], encoding="bgr8")
    teleop_bag(tmp_path / "bag2", frames[2], actions[2])
    settings = ImportSettings(camera_topic="/camera/image", action_topic="teleop/command", image_size=16)
    out = tmp_path / "data" / "robot-v0.npz"
    record = import_bags([tmp_path / f"bag{i}" for i in range(3)], out, settings)

    assert record["episodes"] == [3, 1] and record["rows"] == [5 + 7 + 8, 6]
    assert record["bags"] == {str(tmp_path / "bag0"): 2, str(tmp_path / "bag1"): 1, str(tmp_path / "bag2"): 1}
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == [20, 6]
    with np.load(out) as raw:
        np.testing.assert_array_equal(raw["actions"], np.concatenate([actions[0], actions[1]]))
        assert np.flatnonzero(raw["terminals"]).tolist() == [4, 11, 19]
        expected = [fit_to_policy(f, 16) for f in (*frames[0], *frames[1])]  # as the node resizes
        np.testing.assert_array_equal(raw["observations"], np.stack(expected))
    data = ogbench.load_dataset(str(out), compact_dataset=True)
    assert data["observations"].shape == (20, 16, 16, 3) and data["valids"].sum() == 20 - 3
    train_split, val_split = load_dataset_pair(out, cache_dir=tmp_path / "cache")
    assert len(val_split) == 6 and val_split.action_dim == 3

    config = TrainConfig(dataset=str(out), out=str(tmp_path / "run"), goal_mode="image", steps=2, batch_size=4,
                         log_every=1, val_every=2, val_batches=1, save_every=2)
    assert train(config).is_file()


def test_policy_actions_pair_by_image_stamp_and_stale_stops_split_episodes(tmp_path):
    frames = random_frames(9, 4)
    actions = np.random.default_rng(5).uniform(-1, 1, (9, 2)).astype(np.float32)
    policy_bag(tmp_path / "bag", frames, actions, stale_at=4)
    record = import_bags([tmp_path / "bag"], tmp_path / "policy-v0.npz", SETTINGS)
    assert record["stale_stops"] == 1 and record["episodes"] == [1, 1] and record["rows"] == [4, 4]
    with np.load(tmp_path / "policy-v0.npz") as raw, np.load(tmp_path / "policy-v0-val.npz") as val:
        np.testing.assert_array_equal(raw["actions"], actions[:4])
        np.testing.assert_array_equal(val["actions"], actions[5:])
        np.testing.assert_array_equal(val["observations"][0], fit_to_policy(frames[5], 16))


def test_policy_actions_of_an_unstamped_camera_pair_by_receive_time(tmp_path):
    """Every frame stamped 0 would make image_stamp name them all: each action takes the newest frame instead."""
    frames = random_frames(6, 6)
    actions = np.random.default_rng(7).uniform(-1, 1, (6, 2)).astype(np.float32)
    policy_bag(tmp_path / "bag", frames, actions, stale_at=3, camera_stamps=False)
    record = import_bags([tmp_path / "bag"], tmp_path / "policy-v0.npz", SETTINGS)
    assert record["episodes"] == [1, 1] and record["rows"] == [3, 2]
    with np.load(tmp_path / "policy-v0.npz") as raw:
        np.testing.assert_array_equal(raw["observations"], np.stack([fit_to_policy(f, 16) for f in frames[:3]]))


def test_a_compressed_camera_topic_is_decoded(tmp_path):
    """A robot's bag often holds only image_transport's compressed stream: PNG frames give the same rows."""
    import cv2

    frames = random_frames(6, 8)
    actions = np.random.default_rng(9).uniform(-1, 1, (6, 2)).astype(np.float32)
    types = bags.typestore().types
    for bag in (0, 1):  # two bags, one episode each: training and validation
        with bags.BagWriter(tmp_path / f"bag{bag}") as writer:
            for i in range(3 * bag, 3 * bag + 3):
                t = 10**9 + i * PERIOD_NS
                header = types["std_msgs/msg/Header"](stamp=bags.make_stamp(t), frame_id="camera")
                image = types[bags.COMPRESSED_IMAGE_TYPE](header=header, format="rgb8; png compressed bgr8",
                                                          data=cv2.imencode(".png", frames[i][:, :, ::-1])[1])
                writer.write("/camera/image/compressed", bags.COMPRESSED_IMAGE_TYPE, t, image)
                writer.write("/teleop/command", bags.VECTOR_TYPE, t + 5_000_000, bags.vector_message(actions[i]))
    settings = ImportSettings(camera_topic="camera/image/compressed", action_topic="teleop/command", image_size=16)
    record = import_bags([tmp_path / "bag0", tmp_path / "bag1"], tmp_path / "c-v0.npz", settings)
    assert record["rows"] == [3, 3]
    with np.load(tmp_path / "c-v0.npz") as raw, np.load(tmp_path / "c-v0-val.npz") as val:
        observations = np.concatenate([raw["observations"], val["observations"]])
        np.testing.assert_array_equal(np.concatenate([raw["actions"], val["actions"]]), actions)
    np.testing.assert_array_equal(observations, np.stack([fit_to_policy(f, 16) for f in frames]))


def test_joystick_axes_are_actions(tmp_path):
    types = bags.typestore().types
    frames = random_frames(8, 10)
    axes = np.random.default_rng(10).uniform(-1, 1, (8, 4)).astype(np.float32)
    with bags.BagWriter(tmp_path / "bag") as writer:
        for i in range(8):
            t = 10**9 + i * PERIOD_NS + (2 * 10**9 if i >= 4 else 0)  # a pause: two episodes
            writer.write("/camera/image", bags.IMAGE_TYPE, t, bags.image_message(frames[i], t))
            header = types["std_msgs/msg/Header"](stamp=bags.make_stamp(t), frame_id="joy")
            joy = types["sensor_msgs/msg/Joy"](header=header, axes=axes[i], buttons=np.zeros(2, np.int32))
            writer.write("/joy", "sensor_msgs/msg/Joy", t + 1_000_000, joy)
    record = import_bags([tmp_path / "bag"], tmp_path / "joy-v0.npz", ImportSettings(action_topic="joy", image_size=16))
    assert record["episodes"] == [1, 1] and record["action_dim"] == 4
    with np.load(tmp_path / "joy-v0.npz") as raw:
        np.testing.assert_array_equal(raw["actions"], axes[:4])


def test_stamped_commands_pair_by_stamp_whatever_the_receive_order(tmp_path):
    """A recorder that got command i before frame i (a delayed camera callback) still pairs them by the
    header stamps; with unstamped frames it can only go by receive time, and pairs command i with frame i-1."""
    types = bags.typestore().types
    frames = random_frames(6, 12)
    axes = np.linspace(-1, 1, 12, dtype=np.float32).reshape(6, 2)

    def write(path, stamp_frames: bool) -> None:
        with bags.BagWriter(path) as writer:
            for i in range(6):
                t = 10**9 + i * PERIOD_NS
                header = types["std_msgs/msg/Header"](stamp=bags.make_stamp(t + 1_000_000), frame_id="joy")
                joy = types["sensor_msgs/msg/Joy"](header=header, axes=axes[i], buttons=np.zeros(0, np.int32))
                writer.write("/joy", bags.JOY_TYPE, t + 2_000_000, joy)  # received first
                writer.write("/camera/image", bags.IMAGE_TYPE, t + 3_000_000,
                             bags.image_message(frames[i], t if stamp_frames else 0))

    write(tmp_path / "stamped", True)
    write(tmp_path / "unstamped", False)
    settings = ImportSettings(action_topic="joy", image_size=16, min_episode_length=2)
    # (frame, command) rows; unstamped, command 0 comes before any frame and is left out.
    for name, pairs in (("stamped", [(i, i) for i in range(6)]), ("unstamped", [(i - 1, i) for i in range(1, 6)])):
        import_bags([tmp_path / name, tmp_path / "stamped"], tmp_path / f"{name}-v0.npz", settings)
        with np.load(tmp_path / f"{name}-v0.npz") as raw:
            np.testing.assert_array_equal(raw["observations"], np.stack([fit_to_policy(frames[f], 16) for f, _ in pairs]))
            np.testing.assert_array_equal(raw["actions"], axes[[a for _, a in pairs]])


def test_actions_without_a_fresh_frame_end_the_episode(tmp_path):
    frames = random_frames(6, 6)
    actions = np.random.default_rng(6).uniform(-1, 1, (7, 2)).astype(np.float32)
    with bags.BagWriter(tmp_path / "bag") as writer:
        for i in range(6):
            t = 10**9 + i * PERIOD_NS
            if i != 3:  # frame 3 is lost: command 3 is paired with frame 2, 55 ms old (fresh: under 0.5 s)
                writer.write("/camera/image", bags.IMAGE_TYPE, t, bags.image_message(frames[i], t))
            writer.write("/action", bags.VECTOR_TYPE, t + 5_000_000, bags.vector_message(actions[i]))
        # 0.65 s after the newest frame, yet within the episode gap: no fresh frame, the episode ends before it.
        writer.write("/action", bags.VECTOR_TYPE, 10**9 + 5 * PERIOD_NS + 650_000_000, bags.vector_message(actions[6]))
    teleop_bag(tmp_path / "second", random_frames(3, 7), actions[:3], action_topic="/action")
    settings = ImportSettings(action_topic="action", image_size=16)
    record = import_bags([tmp_path / "bag", tmp_path / "second"], tmp_path / "d-v0.npz", settings)
    assert record["without_frame"] == 1 and record["episodes"] == [1, 1] and record["rows"] == [6, 3]
    with np.load(tmp_path / "d-v0.npz") as raw:
        np.testing.assert_array_equal(raw["actions"], actions[:6])
        np.testing.assert_array_equal(raw["observations"][3], fit_to_policy(frames[2], 16))


@pytest.mark.parametrize("bad_action, message", [(np.array([0.5, np.nan]), "must be finite"),
                                                 (np.array([0.5, 1.5]), "within \\[-1, 1\\]")])
def test_actions_that_cannot_be_trained_on_are_refused(tmp_path, bad_action, message):
    actions = np.zeros((4, 2), np.float32)
    actions[2] = bad_action
    teleop_bag(tmp_path / "bag", random_frames(4, 7), actions)
    with pytest.raises(ImportBagError, match=f"bag: action at t=.* ns is .*{message}"):
        import_bags([tmp_path / "bag"], tmp_path / "d-v0.npz", ImportSettings(action_topic="teleop/command"))


def test_command_line_mistakes_are_one_line_errors(tmp_path):
    teleop_bag(tmp_path / "one", random_frames(4, 8), np.zeros((4, 2), np.float32))
    cases = [
        ([str(tmp_path / "one"), "--out", str(tmp_path / "d-v0.npz")], "no action topic 'action'"),
        ([str(tmp_path / "one"), "--action-topic", "camera/image", "--out", str(tmp_path / "d-v0.npz")],
         "holds sensor_msgs/msg/Image; actions must be one of"),
        ([str(tmp_path / "one"), "--action-topic", "teleop/command", "--out", str(tmp_path / "d-v0.npz")],
         "1 usable episode\\(s\\) in 1 bag\\(s\\).*need at least 2"),
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "d-v0.npz")], "not a rosbag2 bag"),
        ([str(tmp_path / "one"), "--out", str(tmp_path / "d.h5")], "--out must be a .npz file"),
        ([str(tmp_path / "one"), "--val-fraction", "1", "--out", str(tmp_path / "d-v0.npz")],
         "val_fraction must be within \\(0, 1\\)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert str(exit_info.value.code).startswith("cfgrl-bags-to-dataset: error: "), exit_info.value.code
        assert __import__("re").search(message, str(exit_info.value.code)), exit_info.value.code


def test_an_existing_dataset_is_replaced_only_on_request(tmp_path):
    teleop_bag(tmp_path / "bag", random_frames(8, 9), np.zeros((8, 2), np.float32), pause_after=3)
    settings = ImportSettings(action_topic="teleop/command", image_size=16)
    import_bags([tmp_path / "bag"], tmp_path / "d-v0.npz", settings)
    with pytest.raises(ImportBagError, match="exists; pass --overwrite"):
        import_bags([tmp_path / "bag"], tmp_path / "d-v0.npz", settings)
    assert import_bags([tmp_path / "bag"], tmp_path / "d-v0.npz", settings, overwrite=True)["rows"] == [4, 4]


@pytest.mark.requires_rclpy
@pytest.mark.parametrize("transport", ["raw", "compressed"])
def test_a_demonstration_recorded_over_dds_becomes_a_dataset(ros_env, tmp_path, transport):
    """cfgrl_recorder --teleop-topic records a camera and a joystick over real DDS; SIGINT closes the bag,
    and cfgrl-bags-to-dataset makes two episodes of it (a 4 s pause splits them), each command on the
    frame stamped just before it, whatever order the recorder received them in."""
    import signal
    import subprocess
    import sys

    frames = random_frames(20, 11)
    np.save(tmp_path / "frames.npy", frames)
    recorder = subprocess.Popen([sys.executable, "-m", "cfgrl_ros.nodes.recorder", "--out", str(tmp_path / "demo"),
                                 "--teleop-topic", "teleop/joy", "--teleop-type", "joy", "--camera-transport", transport],
                                env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    teleoperator = f"""
import time, cv2, numpy as np, rclpy
from rclpy.duration import Duration
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CompressedImage, Image, Joy
compressed = {transport == "compressed"}
rclpy.init()
node = rclpy.create_node("teleoperator")
camera = node.create_publisher(CompressedImage if compressed else Image,
                               "camera/image/compressed" if compressed else "camera/image", QoSProfile(depth=50))
joy = node.create_publisher(Joy, "teleop/joy", QoSProfile(depth=50))
deadline = time.monotonic() + 60
while not (camera.get_subscription_count() and joy.get_subscription_count()) and time.monotonic() < deadline:
    time.sleep(0.05)
assert camera.get_subscription_count() and joy.get_subscription_count(), "the recorder never subscribed"
time.sleep(1.0)  # past discovery: no early message lost
for i, frame in enumerate(np.load({str(tmp_path / "frames.npy")!r})):
    if i == 10:
        time.sleep(4.0)  # the operator pauses: a new episode (--episode-gap-s 2.5, room for a slow callback)
    image = (CompressedImage(format="rgb8; png compressed bgr8", data=cv2.imencode(".png", frame[:, :, ::-1])[1].tobytes())
             if compressed else Image(height=24, width=32, encoding="rgb8", step=96, data=frame.tobytes()))
    image.header.stamp = node.get_clock().now().to_msg()  # as a camera driver stamps its frames
    camera.publish(image)
    time.sleep(0.01)
    command = Joy(axes=[i / 20, -i / 20])
    command.header.stamp = node.get_clock().now().to_msg()  # as joy_node stamps its messages
    joy.publish(command)
    time.sleep(0.04)
for publisher in (camera, joy):  # reliable: every message is in the recorder before it is stopped
    assert publisher.wait_for_all_acked(Duration(seconds=30)), "the recorder did not take every message"
"""
    try:
        completed = subprocess.run([sys.executable, "-c", teleoperator], env=ros_env, capture_output=True, text=True,
                                   timeout=120)
        assert completed.returncode == 0, completed.stdout + completed.stderr
    finally:
        recorder.send_signal(signal.SIGINT)
        log = recorder.communicate(timeout=30)[0]
    assert recorder.returncode == 0, log

    record = import_bags([tmp_path / "demo"], tmp_path / "demo-v0.npz",
                         ImportSettings(camera_topic="camera/image" + ("/compressed" if transport == "compressed" else ""),
                                        action_topic="/teleop/joy", image_size=16, episode_gap_s=2.5))
    assert record["episodes"] == [1, 1] and record["rows"] == [10, 10], record
    with np.load(tmp_path / "demo-v0.npz") as raw, np.load(tmp_path / "demo-v0-val.npz") as val:
        actions = np.concatenate([raw["actions"], val["actions"]])
        np.testing.assert_allclose(actions, np.stack([np.arange(20) / 20, -np.arange(20) / 20], 1), rtol=1e-6)
        observations = np.concatenate([raw["observations"], val["observations"]])
        np.testing.assert_array_equal(observations, np.stack([fit_to_policy(f, 16) for f in frames]))
