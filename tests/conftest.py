"""Shared ROS 2 test fixtures.

- `ros_env`: isolates one test's ROS traffic (own ROS_DOMAIN_ID, localhost-only discovery, a temp
  ROS_LOG_DIR). Set in os.environ for in-process rclpy, returned as an env dict for subprocesses.
- `@pytest.mark.requires_rclpy` (or `pytestmark = pytest.mark.requires_rclpy`): skips where rclpy
  cannot be imported, with the import error as the reason; fails instead with CFGRL_REQUIRE_ROS=1
  (scripts/test.sh sets it: after its set-up, a missing rclpy is a broken install, not a skip).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

import pytest

from cfgrl_ros.ros_domain import ROS_ISOLATION_VARIABLES, TEST_DOMAIN_IDS, claim_domain_id, set_loopback_only

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ros_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """ROS environment of one test: os.environ is set, and a full copy is returned for Popen."""
    # A domain of its own (a lock file), so concurrent pytest runs on one machine never share one.
    domain_id, lock_fd = claim_domain_id(TEST_DOMAIN_IDS)
    log_dir = tmp_path / "ros_log"
    log_dir.mkdir()
    for name in ROS_ISOLATION_VARIABLES:
        monkeypatch.setenv(name, "")  # records the value to restore after the test
    set_loopback_only(os.environ, domain_id)
    monkeypatch.setenv("ROS_LOG_DIR", str(log_dir))
    # Subprocesses import the same source tree as the test (cfgrl_ros.msg still comes from the venv).
    python_path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT}{os.pathsep + python_path if python_path else ''}")
    try:
        yield dict(os.environ)
    finally:
        os.close(lock_fd)


@functools.cache
def rclpy_unavailable_reason() -> str | None:
    """None when rclpy imports, else why not."""
    try:
        import rclpy  # noqa: F401
    except ImportError as error:
        return (f"rclpy is not importable ({error}); run scripts/setup.sh and use its venv "
                "(scripts/test.sh does both)")
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires_rclpy: skip the test where rclpy (ROS 2) cannot be imported")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_rclpy") is not None:
        reason = rclpy_unavailable_reason()
        if reason is not None:
            if os.environ.get("CFGRL_REQUIRE_ROS") == "1":  # scripts/test.sh: its set-up built ROS in
                pytest.fail(f"CFGRL_REQUIRE_ROS=1 but {reason}", pytrace=False)
            pytest.skip(reason)
