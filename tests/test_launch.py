"""launch/policy.launch.py and the installed console script, both with config/cfgrl.yaml.

`launch` and `launch_ros` are not on PyPI, so the launch test runs only on a ROS 2 install (with
this package built by colcon and sourced); the console-script test runs wherever scripts/setup.sh
installed `cfgrl_node`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.requires_rclpy
REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO_ROOT / "launch" / "policy.launch.py"
CONFIG = REPO_ROOT / "config" / "cfgrl.yaml"
STARTUP_S = 180.0  # imports, policy load and warm-up (backend auto may export first), discovery

# Runs the launch file as `ros2 launch` does, without needing ros2cli: LaunchService + include.
LAUNCH_RUNNER = """
import sys
from launch import LaunchService
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
service = LaunchService()
service.include_launch_description(IncludeLaunchDescription(
    PythonLaunchDescriptionSource(sys.argv[1]), launch_arguments=[a.split(":=", 1) for a in sys.argv[2:]]))
sys.exit(service.run())
"""


def checkpoint(path: Path, goal_mode: str) -> Path:
    import torch

    from cfgrl_ros.checkpoint import save_checkpoint
    from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig

    torch.manual_seed(0)
    config = PolicyConfig(action_dim=3, goal_mode=goal_mode, goal_dim=2, encoder_channels=(8, 8, 8),
                          encoder_dim=32, hidden_dims=(64, 64))
    return save_checkpoint(path, CFGRLPolicy(config))


def launch_unavailable_reason() -> str | None:
    if importlib.util.find_spec("launch_ros") is None or importlib.util.find_spec("launch") is None:
        return "launch/launch_ros are not on PyPI; run on a ROS 2 install"
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        prefix = Path(get_package_prefix("cfgrl_ros"))
    except PackageNotFoundError:
        return "cfgrl_ros is not in the ament index: build it with colcon and source install/setup.bash"
    if not (prefix / "lib" / "cfgrl_ros" / "cfgrl_node").exists():
        return f"{prefix}/lib/cfgrl_ros/cfgrl_node is missing: the package was not installed by colcon"
    return None


@pytest.fixture
def ros(ros_env):
    import rclpy

    rclpy.init()
    cleanups = []
    try:
        yield cleanups
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        rclpy.try_shutdown()


def stop_process(process: subprocess.Popen) -> int:
    import signal

    if process.poll() is None:
        # As Ctrl-C in a terminal: the whole process group. (Launch interrupted by SIGINT does not
        # forward it: it expects the terminal to have sent it to the node too.)
        os.killpg(process.pid, signal.SIGINT)
    try:
        return process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait(20)


def first_action(probe, camera: np.ndarray, timeout_s: float):
    from cfgrl_ros.nodes.probe import stamp_of

    stamp = stamp_of(time.time_ns())
    return probe.wait_for_action(lambda m: m.image_stamp == stamp and m.inference_time_ms > 0, "an action",
                                 timeout_s, meanwhile=lambda: probe.publish_camera(camera, stamp=stamp))


def test_launch_file_with_namespace_remaps_and_w(ros, ros_env, tmp_path):
    reason = launch_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from cfgrl_ros.nodes.probe import PolicyProbe

    policy = checkpoint(tmp_path / "oracle.safetensors", "oracle")
    arguments = [f"policy:={policy}", "namespace:=robot1", "camera_topic:=/robot1/cam/rgb",
                 "goal_vector_topic:=task/goal", "w:=2", "use_sim_time:=false"]
    with open(tmp_path / "launch.log", "wb") as log:
        launch = subprocess.Popen([sys.executable, "-c", LAUNCH_RUNNER, str(LAUNCH_FILE), *arguments],
                                  stdout=log, stderr=subprocess.STDOUT, env=ros_env, start_new_session=True)
    ros.append(lambda: stop_process(launch))
    probe = PolicyProbe(namespace="robot1", remaps={"camera/image": "/robot1/cam/rgb", "goal/vector": "task/goal"})
    ros.append(probe.destroy)

    def launch_alive() -> None:
        if launch.poll() is not None:
            raise RuntimeError(f"launch exited with {launch.returncode}:\n{(tmp_path / 'launch.log').read_text()[-3000:]}")

    probe.alive_checks.append(launch_alive)
    probe.wait_for_node("goal/vector", STARTUP_S)  # remapped names: the probe uses the same remaps
    assert probe.get_parameters("w", "use_sim_time") == {"w": 2.0, "use_sim_time": False}
    probe.publish_goal_vector([0.5, -0.5])
    message = first_action(probe, np.zeros((48, 64, 3), np.uint8), 60)  # non-square: resized by the node
    assert message.w == 2.0 and len(message.action) == 3
    start = len(probe.actions)
    assert stop_process(launch) == 0
    probe.alive_checks.clear()
    stop = probe.wait_for_action(lambda m: m.inference_time_ms == 0, "the stop action at shutdown", 10, start)
    assert not any(stop.action)


def test_console_script_runs_the_node_from_the_params_file(ros, ros_env, tmp_path):
    executable = shutil.which("cfgrl_node", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                  os.environ.get("PATH", "")]))
    if executable is None:
        pytest.skip("the cfgrl_node console script is not installed (run scripts/setup.sh)")
    from cfgrl_ros.nodes.probe import PolicyNodeProcess, PolicyProbe

    policy = checkpoint(tmp_path / "image.safetensors", "image")
    node = PolicyNodeProcess(tmp_path / "node.log", CONFIG, {"policy": policy, "backend": "torch"}, ros_env,
                             executable=[executable])
    ros.append(node.stop)
    probe = PolicyProbe()
    ros.append(probe.destroy)
    probe.alive_checks.append(node.check_alive)
    probe.wait_for_node("goal/image", STARTUP_S)
    rng = np.random.default_rng(0)
    probe.publish_goal_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    message = first_action(probe, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), 60)
    assert message.w == 3.0 and message.flow_steps == 16 and len(message.action) == 3  # the params file's values
    assert message.header.frame_id == "base_link"
    assert node.stop() == 0
