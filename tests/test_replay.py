"""Bags and replay: mcap round trips, dataset and bag sources, the action comparison, and a bag that is
written, replayed through the real policy node (recording a new bag), and replayed again and compared."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cfgrl_ros import bags
from cfgrl_ros.image import image_to_rgb
from cfgrl_ros.replay import ReplayError, bag_frames, compare_actions, dataset_frames, write_replay_report
from training import pointreach


def frames_and_goal(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    positions = np.random.default_rng(seed).uniform(0.1, 0.9, (count + 1, 2)).astype(np.float32)
    return pointreach.render(positions[:count], 64), positions[count]


def write_bag(path, images, goal_vector, actions=None, frame_period_ns=50_000_000):
    """A bag as the recorder writes it: goal first, then frames, each action after its frame."""
    with bags.BagWriter(path) as writer:
        writer.write("/goal/vector", bags.VECTOR_TYPE, 1, bags.vector_message(goal_vector))
        for i, image in enumerate(images):
            stamp = 10**9 + i * frame_period_ns
            writer.write("/camera/image", bags.IMAGE_TYPE, stamp, bags.image_message(image, stamp))
            if actions is not None:
                writer.write("/action", bags.POLICY_ACTION_TYPE, stamp + 2000, policy_action(stamp, actions[i], 2.0))


def policy_action(image_stamp_ns: int, action, inference_time_ms: float):
    types = bags.typestore().types
    header = types["std_msgs/msg/Header"](stamp=bags.make_stamp(image_stamp_ns + 1000), frame_id="base_link")
    return types[bags.POLICY_ACTION_TYPE](header=header, image_stamp=bags.make_stamp(image_stamp_ns),
                                          action=np.asarray(action, np.float32), w=3.0, flow_steps=16,
                                          inference_time_ms=inference_time_ms)


# -------------------------------------------------------------------------------- without ROS
def test_bag_round_trip_matches_actions_to_frames_by_image_stamp(tmp_path):
    images, goal = frames_and_goal(4)
    actions = np.random.default_rng(1).uniform(-1, 1, (4, 2)).astype(np.float32)
    write_bag(tmp_path / "bag", images, goal, actions)
    assert bags.bag_topics(tmp_path / "bag") == {"/goal/vector": (bags.VECTOR_TYPE, 1),
                                                 "/camera/image": (bags.IMAGE_TYPE, 4),
                                                 "/action": (bags.POLICY_ACTION_TYPE, 4)}
    frames = bag_frames(tmp_path / "bag")
    assert len(frames) == 4
    assert all((f.image == image).all() for f, image in zip(frames, images))
    assert [f.time_s for f in frames] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert np.allclose(frames[0].goal_vector, goal) and not any(f.sets_goal for f in frames[1:])
    assert np.array_equal(np.stack([f.recorded_action for f in frames]), actions)
    with pytest.raises(bags.BagError, match="exists"):
        bags.BagWriter(tmp_path / "bag")


def test_bag_without_camera_frames_is_an_error(tmp_path):
    with bags.BagWriter(tmp_path / "bag") as writer:
        writer.write("/goal/vector", bags.VECTOR_TYPE, 1, bags.vector_message(np.zeros(2)))
    with pytest.raises(ReplayError, match="no messages on camera/image"):
        bag_frames(tmp_path / "bag")
    with pytest.raises(bags.BagError, match="not a rosbag2 bag"):
        list(bags.read_bag(tmp_path))


def test_bags_the_replay_cannot_trust_are_refused(tmp_path):
    images, goal = frames_and_goal(3)
    with bags.BagWriter(tmp_path / "no-goal") as writer:  # the node would act on its previous goal
        for i, image in enumerate(images):
            writer.write("/camera/image", bags.IMAGE_TYPE, 10 + i, bags.image_message(image, 10 + i))
    with pytest.raises(ReplayError, match="no goal on goal/image or goal/vector for its 3 frames"):
        bag_frames(tmp_path / "no-goal")
    with bags.BagWriter(tmp_path / "wrong-type") as writer:
        writer.write("/goal/vector", bags.IMAGE_TYPE, 1, bags.image_message(images[0], 1))
        writer.write("/camera/image", bags.IMAGE_TYPE, 2, bags.image_message(images[0], 2))
    with pytest.raises(bags.BagError, match="/goal/vector holds sensor_msgs/msg/Image, expected std_msgs/msg/Float32"):
        bag_frames(tmp_path / "wrong-type")
    with pytest.raises(ReplayError, match="max_frames must be >= 1"):
        bag_frames(tmp_path / "wrong-type", max_frames=-1)
    mcap = next((tmp_path / "wrong-type").glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[:100])  # truncated
    with pytest.raises(bags.BagError, match="cannot read the bag"):
        bag_frames(tmp_path / "wrong-type")


def test_a_damaged_bag_is_a_bag_error_wherever_the_damage_is(tmp_path):
    """Eight flipped bytes at 60 places: each read ends in a BagError or reads every frame (the damage hit
    pixels: rosbags' mcap chunks carry no CRC), never another exception and never fewer frames."""
    images, goal = frames_and_goal(5)
    with bags.BagWriter(tmp_path / "bag") as writer:
        writer.write("/goal/vector", bags.VECTOR_TYPE, 1, bags.vector_message(goal))
        for i, image in enumerate(images):
            writer.write("/camera/image", bags.IMAGE_TYPE, 10 + i, bags.image_message(image, 10 + i))
    data = next((tmp_path / "bag").glob("*.mcap")).read_bytes()
    outcomes = set()
    for offset in range(0, len(data), max(1, len(data) // 60)):
        damaged = bytearray(data)
        for k in range(offset, min(offset + 8, len(data))):
            damaged[k] ^= 0xFF
        copy = tmp_path / f"damaged-{offset}"
        shutil.copytree(tmp_path / "bag", copy)
        next(copy.glob("*.mcap")).write_bytes(bytes(damaged))
        try:
            outcomes.add(len(bag_frames(copy)))
        except bags.BagError:
            outcomes.add("BagError")
    assert outcomes <= {"BagError", 5} and "BagError" in outcomes


def test_a_bag_of_compressed_frames_replays_them_decoded(tmp_path):
    import cv2

    images, goal = frames_and_goal(3)
    types = bags.typestore().types
    with bags.BagWriter(tmp_path / "bag") as writer:
        writer.write("/goal/vector", bags.VECTOR_TYPE, 1, bags.vector_message(goal))
        for i, image in enumerate(images):
            header = types["std_msgs/msg/Header"](stamp=bags.make_stamp(10 + i), frame_id="camera")
            message = types[bags.COMPRESSED_IMAGE_TYPE](header=header, format="rgb8; png compressed bgr8",
                                                        data=cv2.imencode(".png", image[:, :, ::-1])[1])
            writer.write("/camera/image/compressed", bags.COMPRESSED_IMAGE_TYPE, 10 + i, message)
    frames = bag_frames(tmp_path / "bag", camera_topic="camera/image/compressed")
    assert len(frames) == 3 and all(np.array_equal(f.image, image) for f, image in zip(frames, images))


def test_max_frames_keeps_a_goal_recorded_after_the_frames_it_keeps(tmp_path):
    images, goal = frames_and_goal(3)
    with bags.BagWriter(tmp_path / "bag") as writer:
        for i, image in enumerate(images):
            writer.write("/camera/image", bags.IMAGE_TYPE, 10 + i, bags.image_message(image, 10 + i))
            if i == 1:  # the latched goal, recorded after the first two frames
                writer.write("/goal/vector", bags.VECTOR_TYPE, 11 + i, bags.vector_message(goal))
    (first,) = bag_frames(tmp_path / "bag", max_frames=1)
    assert np.allclose(first.goal_vector, goal) and np.array_equal(first.image, images[0])


def test_recorded_stale_stops_are_not_the_reference_action(tmp_path):
    images, goal = frames_and_goal(1)
    with bags.BagWriter(tmp_path / "bag") as writer:
        writer.write("/goal/vector", bags.VECTOR_TYPE, 1, bags.vector_message(goal))
        writer.write("/camera/image", bags.IMAGE_TYPE, 10, bags.image_message(images[0], 10))
        for t, (action, ms) in enumerate((([0.0, 0.0], 0.0), ([0.5, -0.5], 3.0))):  # a stop, then the answer
            writer.write("/action", bags.POLICY_ACTION_TYPE, 11 + t, policy_action(10, action, ms))
    (frame,) = bag_frames(tmp_path / "bag")
    np.testing.assert_array_equal(frame.recorded_action, [0.5, -0.5])


def test_frames_with_one_stamp_are_kept_unless_they_are_the_same_frame(tmp_path):
    """A camera without a clock stamps every frame 0: only a true resend (same stamp and pixels) is dropped."""
    images, goal = frames_and_goal(3)
    with bags.BagWriter(tmp_path / "bag") as writer:
        writer.write("/goal/vector", bags.VECTOR_TYPE, 1, bags.vector_message(goal))
        for i, image in enumerate((images[0], images[0], images[1], images[2])):  # frame 0 sent twice
            writer.write("/camera/image", bags.IMAGE_TYPE, 10 + i, bags.image_message(image, 0))
    frames = bag_frames(tmp_path / "bag")
    assert [np.array_equal(f.image, image) for f, image in zip(frames, images)] == [True] * 3 and len(frames) == 3


def test_actions_of_an_unstamped_camera_go_to_the_frame_before_them(tmp_path):
    """Every frame stamped 0, so every action's image_stamp is 0 too: each belongs to the newest frame
    received before it, not all to the first frame."""
    images, goal = frames_and_goal(3)
    with bags.BagWriter(tmp_path / "bag") as writer:
        writer.write("/goal/vector", bags.VECTOR_TYPE, 1, bags.vector_message(goal))
        for i, image in enumerate(images):
            writer.write("/camera/image", bags.IMAGE_TYPE, 10 + 10 * i, bags.image_message(image, 0))
            writer.write("/action", bags.POLICY_ACTION_TYPE, 15 + 10 * i, policy_action(0, [i / 4, -i / 4], 3.0))
    frames = bag_frames(tmp_path / "bag")
    assert [f.recorded_action.tolist() for f in frames] == [[0.0, 0.0], [0.25, -0.25], [0.5, -0.5]]
    (first,) = bag_frames(tmp_path / "bag", max_frames=1)
    assert first.recorded_action.tolist() == [0.0, 0.0]


def test_dataset_frames_take_each_episode_goal_from_its_last_state(tmp_path):
    demo = pointreach.DemoConfig(episodes=3, episode_length=5)
    path = pointreach.write_dataset(tmp_path / "pr.npz", demo)
    data = np.load(path)
    frames = dataset_frames(path, episodes=[1, 2], cache_dir=tmp_path / "cache")
    assert len(frames) == 10
    assert [f.sets_goal for f in frames] == [True] + [False] * 4 + [True] + [False] * 4
    assert np.array_equal(frames[0].goal_image, data["observations"][9])  # episode 1 ends on row 9
    assert np.allclose(frames[0].goal_vector, data["oracle_reps"][9])
    assert np.array_equal(frames[7].image, data["observations"][12])
    assert np.allclose(frames[7].recorded_action, data["actions"][12])
    assert frames[7].time_s == pytest.approx(7 / 20.0)
    assert len(dataset_frames(path, max_frames=7, cache_dir=tmp_path / "cache")) == 7
    with pytest.raises(ReplayError, match=r"episodes \[3\] do not exist"):
        dataset_frames(path, episodes=[3], cache_dir=tmp_path / "cache")
    with pytest.raises(ReplayError, match=r"episodes \[-1, 5\] do not exist"):  # found though max_frames stops at 0
        dataset_frames(path, episodes=[0, -1, 5], max_frames=1, cache_dir=tmp_path / "cache")


def test_compare_actions_statistics(tmp_path):
    recorded = np.array([[1.0, 0.0], [0.0, 1.0]])
    replayed = np.array([[1.0, 0.0], [0.0, -1.0]])
    comparison = compare_actions(recorded, replayed)
    assert comparison["mse"] == pytest.approx(1.0)  # (0 + 0 + 0 + 4) / 4
    assert comparison["mse_per_dim"] == pytest.approx([0.0, 2.0])
    assert comparison["mae_per_dim"] == pytest.approx([0.0, 1.0])
    assert comparison["cosine_mean"] == pytest.approx(0.0)  # +1 and -1
    assert comparison["max_abs_error"] == pytest.approx(2.0)
    with pytest.raises(ReplayError):
        compare_actions(recorded, replayed[:1])
    report = {"source": "x", "rate": "lockstep", "frames_played": 3, "frames_with_action": 2,
              "frames_with_recorded_action": 3, "resends": 1, "comparison": comparison}
    markdown = write_replay_report(report, tmp_path).read_text()
    assert "| MSE | 1 | 0 | 2 |" in markdown
    assert "frames played: 3 (rate lockstep, 1 resent)" in markdown
    assert "answered: 2; unanswered: 1" in markdown and "compared (answered and recorded): 2" in markdown
    assert json.loads((tmp_path / "replay_report.json").read_text())["comparison"]["mse"] == 1.0


def test_a_bag_cut_short_is_recovered_up_to_its_last_complete_chunk(tmp_path):
    images, goal = frames_and_goal(200)  # ~12 kB each: about 85 per 1 MiB chunk
    write_bag(tmp_path / "bag", images, goal)
    mcap = tmp_path / "bag" / "bag.mcap"
    original = mcap.read_bytes()
    (tmp_path / "bag" / "metadata.yaml").unlink()  # what a killed recorder leaves: no metadata...
    mcap.write_bytes(original[: len(original) * 2 // 3])  # ...and a file that stops mid-record
    with pytest.raises(bags.BagError, match="not a rosbag2 bag"):
        list(bags.read_bag(tmp_path / "bag"))

    counts = bags.recover_bag(tmp_path / "bag", tmp_path / "recovered")
    assert counts["/goal/vector"] == 1 and 85 <= counts["/camera/image"] < 200
    recovered = bag_frames(tmp_path / "recovered")
    assert len(recovered) == counts["/camera/image"]
    assert all((frame.image == image).all() for frame, image in zip(recovered, images))
    assert mcap.read_bytes() == original[: len(original) * 2 // 3]  # the damaged bag is left as it was

    write_bag(tmp_path / "whole", images, goal)  # a complete bag copies in full
    assert bags.recover_bag(tmp_path / "whole", tmp_path / "whole-copy")["/camera/image"] == 200


def test_bags_that_cannot_be_recovered_are_bag_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(bags.BagError, match="one .mcap file, found \\[\\]"):
        bags.recover_bag(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "junk.mcap").write_bytes(b"not an mcap file at all")
    with pytest.raises(bags.BagError, match="not an MCAP file"):
        bags.recover_bag(tmp_path / "junk", tmp_path / "out")
    images, goal = frames_and_goal(3)
    write_bag(tmp_path / "small", images, goal)
    mcap = tmp_path / "small" / "small.mcap"
    mcap.write_bytes(mcap.read_bytes()[:20_000])  # the only chunk (3 frames of 12 kB) is cut short
    with pytest.raises(bags.BagError, match="no complete chunk"):
        bags.recover_bag(tmp_path / "small", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no partial copy left behind
    with pytest.raises(bags.BagError, match="exists"):
        bags.recover_bag(tmp_path / "small", tmp_path / "junk")


# -------------------------------------------------------------------------------- over DDS
@pytest.mark.requires_rclpy
def test_the_recorder_stops_on_ctrl_c_every_time(ros_env, tmp_path):
    """SIGINT at a few moments after start-up: each time a clean exit and a bag that reads. (With an
    executor waiting without a timeout, about one run in six slept through the shutdown.)"""
    for run, delay_s in enumerate((1.0, 1.3, 1.6, 1.9, 2.2, 2.5)):
        bag = tmp_path / f"bag{run}"
        recorder = subprocess.Popen([sys.executable, "-m", "cfgrl_ros.nodes.recorder", "--out", str(bag)], env=ros_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(delay_s)
        recorder.send_signal(signal.SIGINT)
        try:
            output = recorder.communicate(timeout=20)[0]
        finally:
            if recorder.poll() is None:
                recorder.kill()
                recorder.communicate()
        assert recorder.returncode == 0, f"run {run}: {output}"
        assert (bag / "metadata.yaml").is_file(), f"run {run}: the bag was not closed"  # what a reader needs
        bags.bag_topics(bag)  # and it opens


@pytest.mark.requires_rclpy
def test_a_killed_recorder_leaves_a_bag_that_recover_copies(ros_env, tmp_path):
    """SIGKILL the real recorder after it took 200 frames over DDS; --recover gets its finished chunks."""
    images, _ = frames_and_goal(200)
    np.save(tmp_path / "images.npy", images)
    recorder = subprocess.Popen([sys.executable, "-m", "cfgrl_ros.nodes.recorder", "--out", str(tmp_path / "bag")],
                                env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    publisher = f"""
import time, numpy as np, rclpy
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node("frames")
pub = node.create_publisher(Image, "camera/image", QoSProfile(depth=300))
deadline = time.monotonic() + 60
while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
assert pub.get_subscription_count(), "the recorder never subscribed"
for image in np.load({str(tmp_path / "images.npy")!r}):
    pub.publish(Image(height=64, width=64, encoding="rgb8", step=192, data=image.tobytes()))
    time.sleep(0.01)  # 100 Hz, a camera's rate: the recorder's keep-last-100 queue never overflows
time.sleep(2.0)  # reliable delivery of the last frames
"""
    try:
        completed = subprocess.run([sys.executable, "-c", publisher], env=ros_env, capture_output=True, text=True,
                                   timeout=120)
        assert completed.returncode == 0, completed.stdout + completed.stderr
    finally:
        recorder.kill()
        log = recorder.communicate(timeout=30)[0]
    assert not (tmp_path / "bag" / "metadata.yaml").exists(), log

    from cfgrl_ros.nodes import recorder as recorder_module

    assert recorder_module.main(["--recover", str(tmp_path / "bag")]) == 0
    recovered = [image_to_rgb(item.message) for item in bags.read_bag(tmp_path / "bag-recovered")]
    assert 85 <= len(recovered) < 200
    # Frames sent, intact and in order. Not necessarily all of them from the first: while the two sides
    # are still matching, a volatile subscription can miss a frame (DDS discovery, not the recorder).
    sent_index = {image.tobytes(): i for i, image in enumerate(images)}
    indices = [sent_index.get(frame.tobytes(), -1) for frame in recovered]
    assert min(indices) >= 0 and indices == sorted(set(indices)), indices
    assert recorder_module.main(["--recover", str(tmp_path / "bag")]) == 1  # never overwrites the copy


@pytest.mark.requires_rclpy
def test_bag_written_replayed_and_compared(ros_env, tmp_path):
    """Replay a bag through the policy node recording a new bag, then replay that one through a fresh
    node with the same seed: the same frames and noise give the same actions, so the report's error is
    zero; a third replay (the noise generator has moved on) shows that the comparison does see changes."""
    from cfgrl_ros.nodes.processes import POLICY_MODULE, NodeProcess
    from test_sim_node import tiny_checkpoint  # tests/ is on sys.path under pytest

    images, goal = frames_and_goal(5)
    write_bag(tmp_path / "input_bag", images, goal)
    checkpoint = tiny_checkpoint(tmp_path, action_dim=2, goal_dim=2)
    parameters = {"policy": str(checkpoint), "backend": "torch", "trigger": "image", "control_rate_hz": 1000.0,
                  "stale_action": "none", "max_image_age_s": 3600.0, "seed": 7, "w": 3.0}

    def replay(source, out, record=None):
        command = [sys.executable, "-m", "cfgrl_ros.nodes.replay_node", "--source", str(source), "--rate", "lockstep",
                   "--out", str(out), "--policy-timeout", "120"] + (["--record", str(record)] if record else [])
        completed = subprocess.run(command, env=ros_env, capture_output=True, text=True, timeout=240)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return json.loads((out / "replay_report.json").read_text())

    node = NodeProcess(POLICY_MODULE, parameters, tmp_path / "policy_a.log", ros_env)
    try:
        first = replay(tmp_path / "input_bag", tmp_path / "first", record=tmp_path / "recorded_bag")
    finally:
        node.stop()
    assert first["frames_played"] == 5 and first["frames_with_action"] == 5 and first["comparison"] is None
    assert first["w_values"] == [3.0]
    topics = bags.bag_topics(tmp_path / "recorded_bag")
    assert topics["/action"] == (bags.POLICY_ACTION_TYPE, 5) and topics["/goal/vector"][1] == 1
    assert topics["/camera/image"][1] >= 5  # a resent frame appears twice, and is read back once
    from rosbags.interfaces import QosDurability, QosReliability
    from rosbags.rosbag2 import Reader

    with Reader(tmp_path / "recorded_bag") as reader:  # what `ros2 bag play` will publish each topic with
        offered = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    assert [q.durability for q in offered["/goal/vector"]] == [QosDurability.TRANSIENT_LOCAL]  # latched again
    assert [q.reliability for q in offered["/action"]] == [QosReliability.RELIABLE]
    recorded = bag_frames(tmp_path / "recorded_bag")
    assert len(recorded) == 5 and all((f.image == image).all() for f, image in zip(recorded, images))

    node = NodeProcess(POLICY_MODULE, parameters, tmp_path / "policy_b.log", ros_env)
    try:
        second = replay(tmp_path / "recorded_bag", tmp_path / "second")
        third = replay(tmp_path / "recorded_bag", tmp_path / "third")
    finally:
        node.stop()
    comparison = second["comparison"]
    assert comparison["frames_compared"] == 5
    assert comparison["mse"] == 0.0 and comparison["cosine_mean"] == pytest.approx(1.0)
    assert third["comparison"]["frames_compared"] == 5 and third["comparison"]["mse"] > 1e-6
    assert "| MSE | 0 |" in (tmp_path / "second" / "replay_report.md").read_text()


@pytest.mark.requires_rclpy
def test_lockstep_replay_gives_up_on_a_policy_that_never_acts(ros_env, tmp_path):
    """A goal the policy refuses (3 values for a 2-d goal): no action ever comes, and the replay stops after
    MAX_UNANSWERED_IN_A_ROW frames instead of waiting out every frame's timeout."""
    from cfgrl_ros.nodes.processes import POLICY_MODULE, NodeProcess
    from cfgrl_ros.nodes.replay_node import MAX_UNANSWERED_IN_A_ROW
    from test_sim_node import tiny_checkpoint

    images, _ = frames_and_goal(8)
    write_bag(tmp_path / "bag", images, np.zeros(3, np.float32))
    checkpoint = tiny_checkpoint(tmp_path, action_dim=2, goal_dim=2)
    node = NodeProcess(POLICY_MODULE, {"policy": str(checkpoint), "backend": "torch", "trigger": "image"},
                       tmp_path / "policy.log", ros_env)
    try:
        command = [sys.executable, "-m", "cfgrl_ros.nodes.replay_node", "--source", str(tmp_path / "bag"),
                   "--rate", "lockstep", "--action-timeout", "1", "--policy-timeout", "120", "--out", str(tmp_path / "out")]
        completed = subprocess.run(command, env=ros_env, capture_output=True, text=True, timeout=240)
    finally:
        node.stop()
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert f"no action for {MAX_UNANSWERED_IN_A_ROW} frames in a row (up to frame 2)" in completed.stderr


@pytest.mark.requires_rclpy
def test_replay_and_recorder_command_lines_refuse_bad_values_before_starting(tmp_path, capsys):
    from cfgrl_ros.nodes import recorder, replay_node

    (tmp_path / "taken").mkdir()
    for argv, message in ((["--source", "x.npz", "--rate", "nan"], "--rate must be recorded, lockstep or a positive"),
                          (["--source", "x.npz", "--rate", "inf"], "--rate must be"),
                          (["--source", "x.npz", "--record", str(tmp_path / "taken")], "exists; rosbag2 bags"),
                          (["--source", "x.npz", "--rate", "10", "--speed", "2"], "--speed scales --rate recorded")):
        with pytest.raises(SystemExit) as exit_info:
            replay_node.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        recorder.main(["--out", str(tmp_path / "taken")])  # before rclpy.init: no node, no traceback
    assert exit_info.value.code == 2 and "exists; rosbag2 bags are never overwritten" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        recorder.main(["--out", str(tmp_path / "new"), "--teleop-topic", "/action"])
    assert exit_info.value.code == 2 and "--teleop-topic /action is recorded already" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        recorder.main(["--out", str(tmp_path / "new"), "--teleop-topic", "bad topic"])
    assert exit_info.value.code == 2 and "'bad topic' is not a topic name" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_image_decoding_of_bag_messages_uses_the_node_decoder():
    message = bags.image_message(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 5)
    assert image_to_rgb(message).tolist() == np.arange(12).reshape(2, 2, 3).tolist()
