"""The policy node: its ROS-free logic, then the real node over DDS.

Over DDS the node runs as a subprocess (`python -m cfgrl_ros.nodes.policy_node --ros-args
--params-file config/cfgrl.yaml -p ...`) and this process is the robot side (PolicyProbe). One node
serves the whole module (start-up costs seconds on a loaded 2-core machine); parameters are put back
after each test. Waits are on conditions with timeouts, never fixed sleeps; the few fixed windows
(`spin_for`) show that something does NOT arrive.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cfgrl_ros.control import ActionError, GoalError, Inputs, assess_inputs, checked_action, goal_vector, stale_action
from cfgrl_ros.inference_worker import ERROR, OK, WARN, InferenceWorker, LatencyStats, Mailbox, PolicyStats, RateMeter
from cfgrl_ros.node_params import PARAMETERS, SPECS, validate_changes

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "config" / "cfgrl.yaml"
DEFAULTS = {spec.name: spec.default for spec in PARAMETERS}


# ====================================================================== ROS-free
def test_config_yaml_lists_every_parameter_with_its_default():
    document = yaml.safe_load(CONFIG.read_text())
    params = document["/**/cfgrl"]["ros__parameters"]
    assert set(params) == set(SPECS), "config/cfgrl.yaml and cfgrl_ros/node_params.py disagree"
    for name, value in params.items():
        assert value == SPECS[name].default and type(value) is type(SPECS[name].default), name
    text = CONFIG.read_text()
    for name in SPECS:  # each parameter has a comment line right above it
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[index - 1].strip().startswith("#"), f"{name} has no comment"


@pytest.mark.parametrize("changes", [{"w": 3}, {"w": 0.0}, {"w": 20}, {"w": 7.5}, {"flow_steps": 1},
                                     {"flow_steps": 256}, {"trigger": "image"}, {"stale_action": "hold"},
                                     {"enable_control": False}, {"device": "cuda:1"}, {"seed": -5},
                                     {"max_goal_age_s": 0}, {"control_rate_hz": 1000}])
def test_valid_parameter_values_pass(changes):
    assert validate_changes(changes, DEFAULTS) is None


@pytest.mark.parametrize("changes, reason", [
    ({"w": math.nan}, "w must be finite and within \\[0, 20\\], got nan"),
    ({"w": math.inf}, "w must be finite"),
    ({"w": -0.5}, "w must be finite and within \\[0, 20\\], got -0.5"),
    ({"w": 20.01}, "within \\[0, 20\\]"),
    ({"w": "3"}, "w must be a number, got str '3'"),
    ({"w": True}, "w must be a number, got bool"),
    ({"flow_steps": 0}, "flow_steps must be within \\[1, 256\\], got 0"),
    ({"flow_steps": 257}, "flow_steps must be within"),
    ({"flow_steps": 2.5}, "flow_steps must be an integer, got float 2.5"),
    ({"trigger": "camera"}, "trigger must be one of timer, image; got 'camera'"),
    ({"stale_action": "stop"}, "stale_action must be one of zero, hold, none"),
    ({"backend": "tensorrtt"}, "backend must be one of auto, torch"),
    ({"device": "gpu"}, "device is not a torch device"),
    ({"device": 3}, "device must be a device name string"),
    ({"enable_control": "false"}, "enable_control must be true or false"),
    ({"control_rate_hz": 0}, "control_rate_hz must be finite and within"),
    ({"max_image_age_s": -1}, "max_image_age_s must be finite and within"),
    ({"policy": 5}, "policy must be a string"),
    ({"w_min": 5.0, "w_max": 1.0}, "w_min \\(5.0\\) must not exceed w_max \\(1.0\\)"),
])
def test_invalid_parameter_values_are_refused_with_a_reason(changes, reason):
    import re

    assert re.search(reason, validate_changes(changes, DEFAULTS) or "")


def test_w_bounds_follow_w_min_and_w_max():
    assert validate_changes({"w": 30}, {**DEFAULTS, "w_max": 50.0}) is None
    assert "within [1, 20]" in validate_changes({"w": 0.5}, {**DEFAULTS, "w_min": 1.0})


def test_unknown_parameters_are_left_to_ros():
    assert validate_changes({"use_sim_time": True, "qos_overrides./camera/image.subscription.depth": 3}, DEFAULTS) is None


def test_assess_inputs():
    assert assess_inputs(10.0, 9.9, None, 0.5, 0.0) is Inputs.NO_GOAL
    assert assess_inputs(10.0, None, 1.0, 0.5, 0.0) is Inputs.NO_IMAGE
    assert assess_inputs(10.0, 9.6, 1.0, 0.5, 0.0) is Inputs.FRESH  # goals never stale with 0
    assert assess_inputs(10.0, 9.4, 1.0, 0.5, 0.0) is Inputs.STALE_IMAGE
    assert assess_inputs(10.0, 9.9, 1.0, 0.5, 5.0) is Inputs.STALE_GOAL
    assert assess_inputs(10.0, 9.9, 6.0, 0.5, 5.0) is Inputs.FRESH
    assert assess_inputs(10.0, 12.0, 11.0, 0.5, 5.0) is Inputs.FRESH  # clock jumped back: not stale
    assert Inputs.STALE_IMAGE.stale and Inputs.STALE_GOAL.stale
    assert not Inputs.NO_GOAL.stale and not Inputs.NO_IMAGE.stale and not Inputs.FRESH.stale
    assert Inputs.NO_GOAL.missing and Inputs.NO_IMAGE.missing
    assert not any(i.missing for i in (Inputs.FRESH, Inputs.STALE_IMAGE, Inputs.STALE_GOAL))


def test_non_finite_actions_are_refused():
    action = np.array([0.5, -1.0, 1.0], np.float32)
    assert checked_action(action) is action
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ActionError, match="non-finite action"):
            checked_action(np.array([0.5, bad, 0.0], np.float32))


def test_stale_action_modes():
    last = np.array([0.5, -0.25], np.float32)
    np.testing.assert_array_equal(stale_action("zero", last, 2), [0.0, 0.0])
    np.testing.assert_array_equal(stale_action("zero", None, 3), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(stale_action("hold", last, 2), last)
    assert stale_action("hold", None, 2) is None
    assert stale_action("none", last, 2) is None
    with pytest.raises(ValueError, match="unknown stale_action 'brake'"):
        stale_action("brake", last, 2)


def test_goal_vector_checks_length_and_finiteness():
    np.testing.assert_array_equal(goal_vector([1, 2, 3], 3), np.array([1, 2, 3], np.float32))
    with pytest.raises(GoalError, match="has 2 values, the policy expects goal_dim = 3"):
        goal_vector([1.0, 2.0], 3)
    with pytest.raises(GoalError, match="NaN or inf"):
        goal_vector([1.0, math.nan, 0.0], 3)
    with pytest.raises(GoalError, match="NaN or inf"):
        goal_vector([1.0, -math.inf, 0.0], 3)


def test_mailbox_keeps_only_the_newest_and_counts_drops():
    box: Mailbox[int] = Mailbox()
    assert box.take() is None
    assert box.put(1) is False
    assert box.put(2) is True and box.put(3) is True  # 1 and 2 were never taken
    assert box.take() == 3 and box.take() is None
    assert box.put(4) is False and box.dropped == 2
    box.clear()
    assert box.take() is None


def test_worker_collapses_kicks_caps_its_rate_and_survives_errors():
    calls, errors = [], []
    release = threading.Event()

    def step() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            release.wait(5)  # a slow first step: kicks meanwhile must collapse into one
        if len(calls) == 3:
            raise RuntimeError("boom")
        return True

    worker = InferenceWorker(step, errors.append, min_interval_s=0.05)
    worker.start()
    worker.kick()
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.001)
    for _ in range(10):
        worker.kick()
    release.set()
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    worker.kick()
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    worker.kick()  # after the error the thread still serves kicks
    while len(calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    worker.stop()
    assert len(calls) == 4 and not worker.alive
    assert [str(e) for e in errors] == ["boom"]
    assert min(np.diff(calls)[:2]) >= 0.05 - 1e-3  # the rate cap holds after steps that did work


def test_worker_rate_cap_counts_only_steps_that_worked():
    calls = []
    worker = InferenceWorker(lambda: calls.append(time.monotonic()) and False, print, min_interval_s=10.0)
    worker.start()
    for _ in range(3):
        worker.kick()
        deadline = time.monotonic() + 5
        count = len(calls)
        while len(calls) == count and time.monotonic() < deadline:
            time.sleep(0.001)
    worker.stop()
    assert len(calls) == 3  # no 10 s waits: none of the steps ran an inference


def test_worker_stop_ends_a_rate_cap_wait_and_reports_a_step_that_outlives_it():
    calls, release = [], threading.Event()

    def step() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 2:
            release.wait(5)  # an inference that outlives the stop's timeout
        return True

    worker = InferenceWorker(step, print, min_interval_s=30.0)
    worker.start()
    worker.kick()
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.001)
    worker.kick()  # the second step now waits out the 30 s rate cap
    time.sleep(0.05)
    assert worker.stop(timeout_s=5)  # within 5 s: the stop ended the 30 s wait
    assert len(calls) == 1  # and the step it held back never ran

    calls.clear()
    worker = InferenceWorker(step, print)
    worker.start()
    for _ in range(2):
        count = len(calls)
        worker.kick()
        while len(calls) == count and time.monotonic() < deadline + 5:
            time.sleep(0.001)
    assert not worker.stop(timeout_s=0.1) and worker.alive  # the second step is still running
    assert not worker.on_own_thread()
    release.set()
    worker.stop(timeout_s=5)
    assert not worker.alive and len(calls) == 2


def test_rate_meter_and_latency_stats():
    meter = RateMeter(window_s=5.0)
    for i in range(11):
        meter.tick(100.0 + i * 0.1)
    assert meter.rate(101.0) == pytest.approx(10.0)
    assert meter.rate(200.0) == 0.0 and meter.count == 11
    stats = LatencyStats(capacity=100)
    assert all(math.isnan(v) for v in stats.percentiles(50, 99))
    for value in range(1, 201):
        stats.add(float(value))
    p50, p99 = stats.percentiles(50, 99)
    assert len(stats) == 100 and p50 == pytest.approx(150.5) and p99 == pytest.approx(199.01)


def test_policy_stats_summary_puts_the_worst_condition_first():
    stats = PolicyStats()
    assert stats.summary(True, "fresh", True, True, "")[0] == OK
    assert stats.summary(True, "fresh", True, False, "")[1].startswith("dry run")
    assert stats.summary(True, "fresh", True, True, "tensorrt failed") == (
        WARN, "acting on the torch fallback: tensorrt failed")
    assert stats.summary(True, "fresh", True, True, "", "publisher cam on /camera/image") == (
        WARN, "incompatible QoS: publisher cam on /camera/image (see the log)")
    assert stats.summary(True, "camera image is stale", False, True, "") == (WARN, "camera image is stale")
    assert stats.summary(False, "fresh", True, True, "") == (WARN, "inactive")
    stats.record_error(RuntimeError("CUDA out of memory"))
    assert stats.summary(True, "fresh", True, True, "") == (ERROR, "inference failing: RuntimeError: CUDA out of memory")
    stats._last_error_monotonic -= PolicyStats.ERROR_HOLD_S  # errors age out of the status, not the count
    assert stats.summary(True, "fresh", True, True, "")[0] == OK and stats.values()["inference_errors"] == "1"
    assert set(stats.values()) >= {"camera_rate_hz", "goal_rate_hz", "inference_ms_p50", "inference_ms_p99",
                                   "qos_incompatible_events", "rejected_images", "stale_actions"}


# ====================================================================== over DDS
ACTION_DIM = 4
CONTROL_RATE_HZ = 20.0
STARTUP_S = 120.0  # torch + rclpy import and discovery on a loaded 2-core machine
RESET = {"w": 3.0, "flow_steps": 16, "enable_control": True, "stale_action": "zero", "max_image_age_s": 0.5}


def small_checkpoint(path: Path, goal_mode: str):
    """A random-initialised policy with real 64x64 inputs and a small network (fast on CPU)."""
    import torch

    from cfgrl_ros.checkpoint import save_checkpoint
    from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig

    torch.manual_seed(0)
    config = PolicyConfig(action_dim=ACTION_DIM, goal_mode=goal_mode, goal_dim=3, encoder_channels=(8, 8, 8),
                          encoder_dim=32, hidden_dims=(64, 64))
    policy = CFGRLPolicy(config)
    with torch.no_grad():  # a null embedding far from any goal's, as training makes it: guidance shows
        policy.null_goal.fill_(2.0)
    return save_checkpoint(path, policy)


@pytest.fixture(scope="module")
def ros_domain(tmp_path_factory):
    """A ROS domain of this module's own (the conftest's ros_env, at module scope), and rclpy in it."""
    from conftest import rclpy_unavailable_reason

    if rclpy_unavailable_reason():
        pytest.skip(rclpy_unavailable_reason())  # the requires_rclpy tests that use this are skipped already
    import rclpy
    from cfgrl_ros.ros_domain import ROS_ISOLATION_VARIABLES, TEST_DOMAIN_IDS, claim_domain_id, set_loopback_only

    domain_id, lock_fd = claim_domain_id(TEST_DOMAIN_IDS)
    log_dir = tmp_path_factory.mktemp("ros_log")
    with pytest.MonkeyPatch.context() as patch:
        for name in ROS_ISOLATION_VARIABLES:
            patch.setenv(name, "")  # records the value to restore
        set_loopback_only(os.environ, domain_id)
        patch.setenv("ROS_LOG_DIR", str(log_dir))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        rclpy.init()
        try:
            yield dict(os.environ)
        finally:
            rclpy.try_shutdown()
            os.close(lock_fd)


def start_node(env: dict, log_path: Path, checkpoint: Path, namespace: str = "", **overrides):
    from cfgrl_ros.nodes.probe import PolicyNodeProcess

    overrides = {"policy": checkpoint, "backend": "torch", "control_rate_hz": CONTROL_RATE_HZ, **overrides}
    return PolicyNodeProcess(log_path, CONFIG, overrides, env, remaps={"__ns": namespace} if namespace else None)


@pytest.fixture(scope="module")
def rig(ros_domain, tmp_path_factory):
    """The image-goal node (timer trigger, 20 Hz) and a probe on the robot side."""
    from cfgrl_ros.nodes.probe import PolicyProbe

    tmp = tmp_path_factory.mktemp("policy_node")
    node = start_node(ros_domain, tmp / "node.log", small_checkpoint(tmp / "image.safetensors", "image"))
    probe = PolicyProbe()
    probe.alive_checks.append(node.check_alive)
    try:
        probe.wait_for_node("goal/image", STARTUP_S)
        yield probe, node
    finally:
        probe.destroy()
        node.stop()


@pytest.fixture
def probe(rig):
    probe, node = rig
    yield probe
    if node.process.poll() is None:
        results = probe.set_parameters(**RESET)
        assert all(r.successful for r in results), [r.reason for r in results]


def frames(seed: int, count: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(count)]


def computed(message) -> bool:
    """An action the policy computed (stale actions carry inference_time_ms = 0)."""
    return message.inference_time_ms > 0


def act_on(probe, pixels: np.ndarray, timeout_s: float = 30.0, encoding: str = "rgb8"):
    """Publish a frame (again every 0.2 s: best-effort) until an action computed from it arrives."""
    from cfgrl_ros.nodes.probe import stamp_of

    stamp = stamp_of(time.time_ns())
    return probe.wait_for_action(lambda m: m.image_stamp == stamp and computed(m), "an action for the frame",
                                 timeout_s, meanwhile=lambda: probe.publish_camera(pixels, encoding, stamp))


def report_where(probe, predicate, what: str, timeout_s: float = 15.0, meanwhile=None) -> dict:
    """The first diagnostics report from now on that satisfies predicate."""
    start = len(probe.diagnostics)
    probe.spin_until(lambda: any(predicate(d) for d in probe.diagnostics[start:]), what, timeout_s, meanwhile)
    return next(d for d in probe.diagnostics[start:] if predicate(d))


requires_rclpy = pytest.mark.requires_rclpy


@requires_rclpy
def test_no_goal_no_actions_then_actions_with_the_right_fields(probe):
    from cfgrl_ros.nodes.probe import ns_of

    camera, goal = frames(1, 2)
    # Before any goal: camera frames arrive, no action leaves, and diagnostics say why.
    report = report_where(probe, lambda d: d["camera_age_s"] != "never", "diagnostics that saw the camera",
                          meanwhile=lambda: probe.publish_camera(camera))
    assert report["inputs"] == "no goal received yet" and report["level"] == 1 and report["state"] == "active"
    assert not probe.actions

    probe.publish_goal_image(goal)
    before_ns = time.time_ns()
    message = act_on(probe, camera)
    assert len(message.action) == ACTION_DIM and all(-1.0 <= a <= 1.0 for a in message.action)
    assert message.header.frame_id == "base_link"
    assert before_ns <= ns_of(message.image_stamp) <= ns_of(message.header.stamp) <= time.time_ns()
    assert message.w == 3.0 and message.flow_steps == 16 and message.inference_time_ms > 0

    report = report_where(probe, lambda d: int(d["inferences"]) > 1 and d["inputs"] == "fresh", "a fresh report",
                          meanwhile=lambda: probe.publish_camera(camera))
    assert report["engine"] == "torch" and report["backend_requested"] == "torch" and report["engine_fallback"] == ""
    assert report["trigger"] == "timer" and report["w"] == "3" and report["level"] == 0
    assert 0 < float(report["inference_ms_p50"]) <= float(report["inference_ms_p99"])
    assert float(report["camera_rate_hz"]) > 0 and int(report["actions_published"]) > 0
    assert report["dropped_frames"].isdigit() and report["qos_incompatible_events"] == "0"


@requires_rclpy
def test_w_through_the_parameter_service(probe):
    camera = frames(2)[0]
    probe.publish_goal_image(frames(3)[0])
    [result] = probe.set_parameters(w=3)  # an integer, as users type `ros2 param set /cfgrl w 3`
    assert result.successful
    [result] = probe.set_parameters(w=5)
    assert result.successful and probe.get_parameters("w") == {"w": 5}
    assert act_on(probe, camera).w == 5.0  # applies from the next action on

    refused = {math.nan: "finite", -1.0: "within [0, 20]", 25.0: "within [0, 20]", "three": "must be a number"}
    for value, reason in refused.items():
        [result] = probe.set_parameters(w=value)
        assert not result.successful and reason in result.reason, (value, result.reason)
        assert probe.get_parameters("w") == {"w": 5}, f"w changed after refusing {value!r}"
    assert act_on(probe, camera).w == 5.0

    for value, reason in {0: "within [1, 256]", 300: "within [1, 256]", 2.5: "must be an integer"}.items():
        [result] = probe.set_parameters(flow_steps=value)
        assert not result.successful and reason in result.reason
    [result] = probe.set_parameters(policy="/elsewhere.safetensors")
    assert not result.successful and "read-only" in result.reason
    [result] = probe.set_parameters(flow_steps=4)  # engines may build per count: swapped in when ready
    assert result.successful
    message = probe.wait_for_action(lambda m: m.flow_steps == 4 and computed(m), "an action with 4 flow steps",
                                    meanwhile=lambda: probe.publish_camera(camera))
    assert message.w == 5.0


@requires_rclpy
def test_flow_steps_never_rereads_the_checkpoint_file(rig, probe):
    """The torch engine takes any count at once, from the policy loaded at configure: what is on disk now
    (a training run overwriting the file, or nothing at all) does not matter."""
    _, node = rig
    checkpoint = Path(next(a for a in node.command if a.startswith("policy:=")).split(":=", 1)[1])
    assert checkpoint.name == "image.safetensors"
    probe.publish_goal_image(frames(4)[0])
    moved = checkpoint.with_name("moved.safetensors")
    checkpoint.rename(moved)
    try:
        assert probe.set_parameters(flow_steps=8)[0].successful
        probe.wait_for_action(lambda m: m.flow_steps == 8 and computed(m), "an action with 8 flow steps",
                              meanwhile=lambda: probe.publish_camera(frames(5)[0]))
    finally:
        moved.rename(checkpoint)
    report = report_where(probe, lambda d: d["flow_steps"] == "8", "flow_steps 8 in the diagnostics")
    assert not report["flow_steps_note"]
    node.check_alive()


@requires_rclpy
def test_action_distribution_changes_with_w(probe):
    """One observation and goal: the mean action at w=8 differs from w=0 by far more than its noise."""
    camera = frames(4)[0]
    probe.publish_goal_image(frames(5)[0])
    assert probe.set_parameters(max_image_age_s=60.0)[0].successful  # one frame serves all actions
    samples = {}
    for w in (0.0, 8.0):
        assert probe.set_parameters(w=w)[0].successful
        first = act_on(probe, camera)  # from here on, actions at this w on this frame
        start = len(probe.actions)
        at_w = lambda: [m.action for m in probe.actions_since(start)  # noqa: E731
                        if m.w == w and computed(m) and m.image_stamp == first.image_stamp]
        probe.spin_until(lambda: len(at_w()) >= 30, f"30 actions at w={w}", timeout_s=60)
        samples[w] = np.array(at_w()[:30])
    difference = np.abs(samples[8.0].mean(0) - samples[0.0].mean(0))
    standard_error = np.sqrt(samples[8.0].var(0) / 30 + samples[0.0].var(0) / 30)
    assert np.max(difference / np.maximum(standard_error, 1e-6)) > 5, (difference, standard_error)
    assert np.all(samples[0.0].std(0) > 0)  # fresh noise per action: not one repeated action


@requires_rclpy
def test_stale_camera_gives_zero_actions_then_recovers(probe):
    camera, goal = frames(6, 2)
    probe.publish_goal_image(goal)
    assert probe.set_parameters(max_image_age_s=0.3)[0].successful
    message = act_on(probe, camera)
    zero = probe.wait_for_action(lambda m: not computed(m), "a stale action", timeout_s=10)
    assert list(zero.action) == [0.0] * ACTION_DIM and zero.image_stamp == message.image_stamp
    report = report_where(probe, lambda d: d["inputs"] == "camera image is stale", "a stale report")
    assert report["level"] == 1 and float(report["camera_age_s"]) > 0.3 and int(report["stale_actions"]) > 0
    start = len(probe.actions)  # still stale: zeros keep coming at the control rate, nothing computed
    probe.spin_until(lambda: len(probe.actions_since(start)) >= 3, "three more stale actions", timeout_s=10)
    stale = probe.actions_since(start)
    assert all(not computed(m) and not any(m.action) for m in stale)

    assert any(act_on(probe, camera).action)  # fresh input: acting again

    assert probe.set_parameters(stale_action="hold")[0].successful
    act_on(probe, frames(7)[0])
    held = probe.wait_for_action(lambda m: not computed(m), "a held action", timeout_s=10)
    received = probe.actions_since(0)
    last_computed = [m for m in received[:received.index(held)] if computed(m)][-1]
    assert list(held.action) == list(last_computed.action) and any(held.action)


@requires_rclpy
def test_malformed_images_stop_the_robot_and_the_node_stays_up(rig, probe):
    _, node = rig
    camera = frames(8)[0]
    probe.publish_goal_image(frames(9)[0])
    act_on(probe, camera)
    malformed = {  # name: (fields, the reason the node gives)
        "nv21 encoding": (dict(encoding="nv21"), "unsupported encoding 'nv21'"),
        "truncated data": (dict(pixels=camera[:40]), "truncated"),  # 40 rows of data, the header says 64
        "zero size": (dict(pixels=camera[:0]), "zero-size image (64x0)"),
        "wrong step": (dict(step=64 * 3 - 1), "step 191 is smaller than width*channels"),
    }
    from cfgrl_ros.nodes.probe import image_message, stamp_of

    if not probe.diagnostics:  # the count below starts from the newest report
        probe.next_diagnostics()
    for name, (fields, reason) in malformed.items():
        message = image_message(fields.get("pixels", camera), fields.get("encoding", "rgb8"),
                                stamp_of(time.time_ns()), fields.get("step"))
        if name == "truncated data":
            message.height = 64
        rejected = int(probe.diagnostics[-1]["rejected_images"])
        report = report_where(probe, lambda d: int(d["rejected_images"]) > rejected,
                              f"the {name} image to be rejected", meanwhile=lambda: probe.camera.publish(message))
        assert reason in report["last_image_error"] and report["inputs"] == "no usable camera image yet"
        start = len(probe.actions)  # from now: nothing computed, the stale action (a stop) instead
        probe.spin_until(lambda: len(probe.actions_since(start)) >= 2, f"a stop after a frame with {name} "
                         "(without one the last command would stand)", timeout_s=10)
        after = probe.actions_since(start)
        assert all(not computed(m) and not any(m.action) for m in after), f"a motion after a frame with {name}"
        node.check_alive()
    assert "camera image rejected, nothing computed from it: unsupported encoding 'nv21'" in node.log()
    assert any(act_on(probe, camera).action)  # a good image: acting again


@requires_rclpy
def test_dry_run_computes_but_publishes_nothing(probe):
    camera = frames(10)[0]
    probe.publish_goal_image(frames(11)[0])
    act_on(probe, camera)
    assert probe.set_parameters(enable_control=False)[0].successful
    probe.spin_for(0.2)  # an action already on the wire may still land
    start = len(probe.actions)
    before = report_where(probe, lambda d: d["enable_control"] == "false", "a dry-run report",
                          meanwhile=lambda: probe.publish_camera(camera))
    after = report_where(probe, lambda d: int(d["inferences"]) >= int(before["inferences"]) + 5,
                         "more inferences in the dry run", meanwhile=lambda: probe.publish_camera(camera))
    assert after["message"].startswith("dry run") and after["level"] == 0
    assert not probe.actions_since(start), "an action was published in the dry run"


@requires_rclpy
def test_incompatible_qos_is_reported_while_it_lasts(probe):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from cfgrl_ros.msg import PolicyAction

    camera, goal = frames(9, 2)
    probe.publish_goal_image(goal)
    act_on(probe, camera)  # fresh inputs: nothing else warns
    best_effort = probe.node.create_publisher(Image, "goal/image", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    try:
        report = report_where(probe, lambda d: int(d["qos_incompatible_events"]) > 0, "a QoS incompatibility report",
                              meanwhile=lambda: probe.publish_camera(camera))
        assert report["level"] == 1 and report["message"].startswith("incompatible QoS: publisher ")
        assert "/goal/image" in report["message"]
    finally:
        probe.node.destroy_publisher(best_effort)
    # Once that publisher is gone the status recovers; the event count stays.
    report_where(probe, lambda d: d["level"] == 0, "the status back to OK",
                 meanwhile=lambda: probe.publish_camera(camera))
    # A robot-side subscriber the action publisher cannot serve (it is volatile) is named too.
    latched = probe.node.create_subscription(PolicyAction, "action", lambda message: None,
                                             QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    try:
        report = report_where(probe, lambda d: "on /action" in d["message"], "an action QoS report",
                              meanwhile=lambda: probe.publish_camera(camera))
        assert report["level"] == 1 and "subscriber cfgrl_probe on /action" in report["message"]
    finally:
        probe.node.destroy_subscription(latched)


@requires_rclpy
def test_deactivate_publishes_the_stop_then_image_trigger_acts_once_per_frame(rig, probe):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    _, node = rig
    assert probe.set_parameters(max_image_age_s=60.0)[0].successful  # the only stale action: the stop
    probe.publish_goal_image(frames(12)[0])
    act_on(probe, frames(13)[0])
    client = probe.node.create_client(ChangeState, "cfgrl/change_state")

    def transition(transition_id: int) -> None:
        probe.spin_until(client.service_is_ready, "the lifecycle service")
        future = client.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        probe.spin_until(future.done, "the transition")
        assert future.result().success

    start = len(probe.actions)
    transition(Transition.TRANSITION_DEACTIVATE)
    stop = probe.wait_for_action(lambda m: not computed(m), "the stop action", start=start, timeout_s=5)
    assert not any(stop.action)
    probe.spin_for(0.3)
    assert probe.actions[-1].message is stop, "actions after the stop"  # inactive: nothing more
    assert probe.set_parameters(trigger="image")[0].successful
    try:
        transition(Transition.TRANSITION_ACTIVATE)
        probe.spin_until(lambda: probe.node.count_subscribers("camera/image") >= 1, "the camera subscription")
        act_on(probe, frames(14)[0])  # the camera subscription is matched again
        for pixels in frames(15, 3):  # image trigger: one frame sent once -> exactly one action
            assert actions_for_one_frame(probe, pixels) == 1
        report = report_where(probe, lambda d: d["trigger"] == "image", "an image-trigger report")
        assert report["state"] == "active"
        # A frame that arrives before its goal is acted on when the goal comes, with no new frame.
        probe.publish_goal_image(np.zeros((64, 64, 2), np.uint8))  # refused: the node drops its goal
        report_where(probe, lambda d: d["inputs"] != "fresh", "the goal dropped")
        stamp = probe.publish_camera(frames(16)[0])
        start = len(probe.actions)
        probe.spin_for(0.5)
        assert not any(computed(m) for m in probe.actions_since(start)), "acted without a goal"
        probe.publish_goal_image(frames(17)[0])
        probe.wait_for_action(lambda m: m.image_stamp == stamp and computed(m), "an action for the waiting frame",
                              timeout_s=5, start=start)
    finally:
        node.check_alive()
        transition(Transition.TRANSITION_DEACTIVATE)
        assert probe.set_parameters(trigger="timer")[0].successful
        transition(Transition.TRANSITION_ACTIVATE)


def actions_for_one_frame(probe, pixels: np.ndarray, tries: int = 3) -> int:
    """Computed actions for a frame published once, counted over 0.5 s (a best-effort frame lost on
    the way is sent again with a new stamp, up to `tries` times)."""
    for _ in range(tries):
        stamp = probe.publish_camera(pixels)
        start = len(probe.actions)
        probe.spin_for(0.5)  # ten control periods at 20 Hz: a timer trigger would act ~10 times
        count = sum(m.image_stamp == stamp and computed(m) for m in probe.actions_since(start))
        if count:
            return count
    return 0


@requires_rclpy
def test_sigint_publishes_the_stop_and_exits_cleanly(rig, probe):
    """Last in the module: it ends the module's node."""
    _, node = rig
    assert probe.set_parameters(max_image_age_s=60.0)[0].successful  # the only stale action: the stop
    probe.publish_goal_image(frames(18)[0])
    act_on(probe, frames(19)[0])
    start = len(probe.actions)
    node.interrupt()
    stop = probe.wait_for_action(lambda m: not computed(m), "the stop action", start=start, timeout_s=15)
    assert not any(stop.action)
    assert node.process.wait(15) == 0


@requires_rclpy
def test_a_step_outliving_deactivation_never_publishes_after_the_stop(ros_domain, tmp_path, monkeypatch):
    """In-process node whose engine is made slow on demand: deactivation times out waiting for the step and
    publishes the stop; the node is active again (a new worker) when the old step computes its action,
    which is never sent nor held."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from cfgrl_ros.nodes import policy_node
    from cfgrl_ros.nodes.probe import PolicyProbe

    monkeypatch.setattr(policy_node, "WORKER_STOP_TIMEOUT_S", 0.2)
    import torch

    # configure sets torch's thread count (cpu_threads) for the whole process: put it back afterwards,
    # or later tests in this process (bit-exact resume checks) would run with another reduction order.
    threads = torch.get_num_threads()
    checkpoint = small_checkpoint(tmp_path / "image.safetensors", "image")
    overrides = {"policy": str(checkpoint), "backend": "torch", "control_rate_hz": CONTROL_RATE_HZ,
                 "max_image_age_s": 60.0, "autostart": False}
    node = policy_node.PolicyNode(namespace="slow", parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinning, release = threading.Event(), threading.Event()

    def spin() -> None:
        while spinning.is_set():
            executor.spin_once(timeout_sec=0.05)

    spinner = threading.Thread(target=spin)
    probe = PolicyProbe(namespace="slow")
    try:
        assert node.start()
        spinning.set()
        spinner.start()
        probe.wait_for_node("goal/image", STARTUP_S)
        probe.publish_goal_image(frames(40)[0])
        act_on(probe, frames(41)[0])

        engine, entered = node.engine, threading.Event()
        real_infer = engine.infer

        def slow_infer(*args, **kwargs):
            entered.set()
            release.wait(10)
            return real_infer(*args, **kwargs)

        monkeypatch.setattr(engine, "infer", slow_infer)
        assert entered.wait(10), "no inference started"
        start = len(probe.actions)
        assert node.trigger_deactivate() == policy_node.TransitionCallbackReturn.SUCCESS
        stop = probe.wait_for_action(lambda m: not computed(m), "the stop action", start=start, timeout_s=5)
        assert node.trigger_activate() == policy_node.TransitionCallbackReturn.SUCCESS
        release.set()  # the old step now computes its action, with the action topic live again
        probe.spin_for(1.0)  # no frame since: the new activation has nothing to act on
        assert probe.actions[-1].message is stop and not any(stop.action), "an action after the stop"
    finally:
        release.set()
        spinning.clear()
        if spinner.is_alive():
            spinner.join(5)
        probe.destroy()
        executor.shutdown()
        node.destroy_node()
        torch.set_num_threads(threads)


@requires_rclpy
def test_compressed_camera_images(ros_domain, tmp_path):
    """camera_transport compressed: JPEG and PNG frames on camera/image/compressed are acted on; bytes
    that are no image are refused like a malformed raw frame, with a stop."""
    import cv2
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage

    from cfgrl_ros.nodes.probe import PolicyProbe, stamp_of

    node = start_node(ros_domain, tmp_path / "node.log", small_checkpoint(tmp_path / "oracle.safetensors", "oracle"),
                      namespace="/compressed", camera_transport="compressed")
    probe = PolicyProbe(namespace="compressed")
    probe.alive_checks.append(node.check_alive)
    camera = probe.node.create_publisher(CompressedImage, "camera/image/compressed", qos_profile_sensor_data)

    def compressed(data: bytes, image_format: str, stamp) -> CompressedImage:
        message = CompressedImage(format=image_format, data=data)
        message.header.stamp = stamp
        return message

    try:
        probe.spin_until(lambda: camera.get_subscription_count() >= 1
                         and probe.node.count_subscribers(probe.goal_vector.topic_name) >= 1
                         and probe.parameters.services_are_ready(), "the policy node", STARTUP_S)
        probe.publish_goal_vector([0.1, -0.2, 0.3])
        frame = np.ascontiguousarray(frames(30)[0][:, :, ::-1])  # BGR, as OpenCV encodes
        for image_format, extension in (("rgb8; jpeg compressed bgr8", ".jpg"), ("rgb8; png compressed bgr8", ".png")):
            data = cv2.imencode(extension, frame)[1].tobytes()
            stamp = stamp_of(time.time_ns())
            message = compressed(data, image_format, stamp)
            action = probe.wait_for_action(lambda m: m.image_stamp == stamp and computed(m), f"an action for a "
                                           f"{extension} frame", meanwhile=lambda: camera.publish(message))
            assert len(action.action) == ACTION_DIM
        garbage = compressed(b"not an image", "rgb8; jpeg compressed bgr8", stamp_of(time.time_ns()))
        report = report_where(probe, lambda d: int(d["rejected_images"]) > 0, "the garbage frame to be rejected",
                              meanwhile=lambda: camera.publish(garbage))
        assert "do not decode as an image" in report["last_image_error"]
        start = len(probe.actions)
        probe.spin_until(lambda: len(probe.actions_since(start)) >= 2, "a stop after the garbage frame", timeout_s=10)
        assert all(not computed(m) and not any(m.action) for m in probe.actions_since(start))
    finally:
        probe.destroy()
        assert node.stop() == 0, node.log()[-2000:]


@requires_rclpy
def test_goal_vectors_in_a_namespace(ros_domain, tmp_path):
    """An oracle-goal policy under /oracle: goal/vector is checked (length, NaN) and may go stale."""
    from cfgrl_ros.nodes.probe import PolicyProbe

    node = start_node(ros_domain, tmp_path / "node.log", small_checkpoint(tmp_path / "oracle.safetensors", "oracle"),
                      namespace="/oracle")
    probe = PolicyProbe(namespace="oracle")
    probe.alive_checks.append(node.check_alive)
    try:
        probe.wait_for_node("goal/vector", STARTUP_S)
        camera = frames(20)[0]
        for goal, reason in (([1.0, 2.0], "goal vector has 2 values, the policy expects goal_dim = 3"),
                             ([0.0, math.nan, 1.0], "NaN or inf")):
            probe.publish_goal_vector(goal)
            report = report_where(probe, lambda d: reason in d["last_goal_error"], f"the goal {goal} to be rejected",
                                  meanwhile=lambda: probe.publish_camera(camera))
            assert report["inputs"] == "no goal received yet"
        assert not probe.actions

        probe.publish_goal_vector([0.1, -0.2, 0.3])
        message = act_on(probe, camera)
        assert len(message.action) == ACTION_DIM and message.header.frame_id == "base_link"

        probe.publish_goal_vector([0.1, -0.2, math.inf])  # a bad goal also drops the previous one
        report_where(probe, lambda d: d["rejected_goals"] == "3", "the third rejection",
                     meanwhile=lambda: probe.publish_camera(camera))
        start = len(probe.actions)  # acting before: the lost goal means a stop, never the goal before the bad one
        probe.spin_until(lambda: len(probe.actions_since(start)) >= 2, "a stop after a bad goal", timeout_s=10)
        after = probe.actions_since(start)
        assert all(not computed(m) and not any(m.action) for m in after), "a motion after a bad goal"
        node.check_alive()

        assert probe.set_parameters(max_goal_age_s=0.3)[0].successful
        probe.publish_goal_vector([0.1, -0.2, 0.3])
        act_on(probe, camera)
        stale = probe.wait_for_action(lambda m: not computed(m), "a stale-goal action", timeout_s=10,
                                      meanwhile=lambda: probe.publish_camera(camera))  # the camera stays fresh
        assert not any(stale.action)
        assert report_where(probe, lambda d: d["inputs"] == "goal is stale", "a stale-goal report",
                            meanwhile=lambda: probe.publish_camera(camera))["level"] == 1
    finally:
        probe.destroy()
        assert node.stop() == 0, node.log()[-2000:]


@requires_rclpy
def test_flow_steps_on_an_engine_that_builds_per_count(ros_domain, tmp_path):
    """onnxruntime exports one model per count, on a thread while the node acts: a request replaced before
    its engine is ready is dropped (a revert included), and one that fails sets the parameter back."""
    from cfgrl_ros.nodes.probe import PolicyProbe

    checkpoint = small_checkpoint(tmp_path / "onnx.safetensors", "oracle")
    node = start_node(ros_domain, tmp_path / "node.log", checkpoint, namespace="/onnx", backend="onnxruntime")
    probe = PolicyProbe(namespace="onnx")
    probe.alive_checks.append(node.check_alive)
    camera = frames(21)[0]
    try:
        probe.wait_for_node("goal/vector", STARTUP_S)
        probe.publish_goal_vector([0.1, -0.2, 0.3])
        assert act_on(probe, camera).flow_steps == 16

        assert probe.set_parameters(flow_steps=4)[0].successful
        assert probe.set_parameters(flow_steps=16)[0].successful  # changed back before 4 is ready
        probe.spin_until(lambda: "flow_steps 4 ready but superseded: dropped" in node.log(), "the dropped engine",
                         timeout_s=120, meanwhile=lambda: probe.publish_camera(camera))
        assert act_on(probe, camera).flow_steps == 16
        assert report_where(probe, lambda d: True, "a report")["flow_steps_note"] == ""

        export_dir = checkpoint.with_suffix(".export")
        shutil.rmtree(export_dir)
        export_dir.write_text("a file where the exports go: the next export cannot be written")
        assert probe.set_parameters(flow_steps=8)[0].successful
        report = report_where(probe, lambda d: "flow_steps 8 failed" in d["flow_steps_note"], "the failure report",
                              timeout_s=120, meanwhile=lambda: probe.publish_camera(camera))
        assert "cannot write the ONNX export" in report["flow_steps_note"] and report["flow_steps"] == "16"
        probe.spin_until(lambda: probe.get_parameters("flow_steps") == {"flow_steps": 16}, "flow_steps set back")
        assert act_on(probe, camera).flow_steps == 16
    finally:
        probe.destroy()
        assert node.stop() == 0, node.log()[-2000:]


@requires_rclpy
def test_an_activation_that_fails_says_why(ros_domain, tmp_path):
    """A typo in a QoS override fails the activation; rclpy alone would log no reason."""
    node = start_node(ros_domain, tmp_path / "node.log", small_checkpoint(tmp_path / "qos.safetensors", "oracle"),
                      namespace="/qos", **{"qos_overrides./qos/camera/image.subscription.reliability": "reliabel"})
    assert node.process.wait(STARTUP_S) == 1
    log = node.log()
    assert "activate failed:" in log and "reliabel" in log, log[-2000:]
    assert "autostart failed" in log



@requires_rclpy
def test_a_transition_that_raises_leaves_no_inputs_behind(ros_domain, tmp_path, monkeypatch):
    """rclpy sends a raising transition to on_error: the node ends unconfigured with no subscription
    or control timer left (a goal arriving then would find no engine), and can be started again; a
    stop requested during the configure leaves it configured but not acting."""
    import torch
    from lifecycle_msgs.msg import State
    from rclpy.parameter import Parameter

    from cfgrl_ros.nodes import policy_node

    threads = torch.get_num_threads()  # configure sets it for the whole process (see above)
    checkpoint = small_checkpoint(tmp_path / "oracle.safetensors", "oracle")
    overrides = {"policy": str(checkpoint), "backend": "torch", "autostart": False}
    node = policy_node.PolicyNode(namespace="raising",
                                  parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    try:
        assert node.start() and node._subscriptions_active
        worker, real_stop = node.worker, node.worker.stop

        def failing_stop(*args, **kwargs):
            real_stop(*args, **kwargs)
            raise RuntimeError("the worker would not stop")

        monkeypatch.setattr(worker, "stop", failing_stop)
        assert node.trigger_deactivate() == policy_node.TransitionCallbackReturn.ERROR
        assert node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
        assert node._subscriptions_active == [] and node._control_timer is None and node.engine is None
        assert node.count_subscribers("/raising/goal/vector") == node.count_subscribers("/raising/camera/image") == 0
        assert node.start(), "the node did not come back after the error"
        node.trigger_deactivate()
        node.trigger_cleanup()
        stop = threading.Event()
        stop.set()  # as Ctrl-C during a long configure leaves it: configured, never acting
        assert node.start(stop) and node.worker is None and node.engine is not None
        assert node._state_machine.current_state[0] == State.PRIMARY_STATE_INACTIVE
    finally:
        if node.worker is not None:
            node.trigger_deactivate()
        node.destroy_node()
        torch.set_num_threads(threads)


@requires_rclpy
def test_cfgrl_goal_gives_the_node_its_goal(ros_domain, tmp_path):
    """The goal command and the real node: no goal, no action; `cfgrl_goal --vector ... --once`; actions."""
    import subprocess

    from cfgrl_ros.nodes.probe import PolicyProbe

    # A namespace of its own: the module's node may still be up in the root one (e.g. under -k).
    node = start_node(ros_domain, tmp_path / "node.log", small_checkpoint(tmp_path / "oracle.safetensors", "oracle"),
                      namespace="/goalcmd")
    probe = PolicyProbe(namespace="goalcmd")
    probe.alive_checks.append(node.check_alive)
    try:
        probe.wait_for_node("goal/vector", STARTUP_S)
        camera = frames(21)[0]
        report = report_where(probe, lambda d: d["inputs"] == "no goal received yet", "a no-goal report",
                              meanwhile=lambda: probe.publish_camera(camera))
        assert report and not probe.actions
        goal = subprocess.run([sys.executable, "-m", "cfgrl_ros.nodes.goal_publisher", "--vector", "0.1,-0.2,0.3",
                               "--once", "--timeout", "60", "--ros-args", "-r", "__ns:=/goalcmd"],
                              env=ros_domain, capture_output=True, text=True, timeout=90)
        assert goal.returncode == 0, goal.stdout + goal.stderr
        assert len(act_on(probe, camera).action) == ACTION_DIM  # the goal outlives the command that sent it
    finally:
        probe.destroy()
        assert node.stop() == 0, node.log()[-2000:]
