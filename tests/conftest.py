"""Shared ROS 2 test fixtures.

- `ros_env`: isolates one test's ROS traffic (own ROS_DOMAIN_ID, localhost-only discovery, a temp
  ROS_LOG_DIR). Set in os.environ for in-process rclpy, returned as an env dict for subprocesses.
- `@pytest.mark.requires_rclpy` (or `pytestmark = pytest.mark.requires_rclpy`): skips where rclpy
  cannot be imported, with the import error as the reason.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Each test claims a domain with an exclusive lock file, so concurrent pytest runs on one machine
# (CI, several developers) never share a DDS domain. The lock dies with its process.
# 60-101: above the ids people use by hand, and below 102, where DDS ports (7400 + 250 * id + ...)
# start to overlap Linux's ephemeral port range.
TEST_DOMAIN_IDS = range(60, 102)
_DOMAIN_LOCK_DIR = Path(tempfile.gettempdir()) / "cfgrl_ros_test_domains"
_domain_claims = itertools.count()


def _claim_domain_id() -> tuple[int, int]:
    """Returns a free test domain id and the file descriptor that holds its lock."""
    _DOMAIN_LOCK_DIR.mkdir(exist_ok=True)
    # Start at pid + counter: processes start apart, and consecutive tests never reuse the domain
    # of the test just before them (a slow subprocess of that test may still be in it).
    start = os.getpid() + next(_domain_claims)
    for offset in range(len(TEST_DOMAIN_IDS)):
        domain_id = TEST_DOMAIN_IDS[(start + offset) % len(TEST_DOMAIN_IDS)]
        fd = os.open(_DOMAIN_LOCK_DIR / f"{domain_id}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return domain_id, fd
    raise RuntimeError(
        f"all test ROS domains {TEST_DOMAIN_IDS[0]}-{TEST_DOMAIN_IDS[-1]} are in use")


@pytest.fixture
def ros_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """ROS environment of one test: os.environ is set, and a full copy is returned for Popen."""
    domain_id, lock_fd = _claim_domain_id()
    log_dir = tmp_path / "ros_log"
    log_dir.mkdir()
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain_id))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.delenv("ROS_STATIC_PEERS", raising=False)
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)  # deprecated; conflicts with the above
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
            pytest.skip(reason)
