"""The test harness itself: a missing rclpy skips ROS tests, or fails them under CFGRL_REQUIRE_ROS=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
# A pytest run in which `import rclpy` fails (sys.modules entry None), on one requires_rclpy test.
RUNNER = ("import sys; sys.modules['rclpy'] = None; import pytest; "
          "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', sys.argv[1]]))")
ROS_TEST = "import pytest\n\n@pytest.mark.requires_rclpy\ndef test_needs_ros():\n    import rclpy\n"


def run_without_rclpy(tmp_path: Path, require: bool) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text((TESTS_DIR / "conftest.py").read_text())
    (tmp_path / "test_ros.py").write_text(ROS_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CFGRL_REQUIRE_ROS"}
    if require:
        env["CFGRL_REQUIRE_ROS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR.parent), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "test_ros.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_missing_rclpy_skips_with_the_reason(tmp_path):
    result = run_without_rclpy(tmp_path, require=False)
    assert result.returncode == 0 and "1 skipped" in result.stdout and "rclpy is not importable" in result.stdout


def test_missing_rclpy_fails_when_ros_is_required(tmp_path):
    result = run_without_rclpy(tmp_path, require=True)
    assert result.returncode == 1 and "1 error" in result.stdout  # failed in set-up
    assert "CFGRL_REQUIRE_ROS=1 but rclpy is not importable" in result.stdout
