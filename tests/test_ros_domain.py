"""Domain claims and loopback isolation of the project's own ROS processes (no ROS needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cfgrl_ros.ros_domain import claim_domain_id, isolate_process, set_loopback_only

ONE_ID = range(233, 234)  # outside every range the project uses, so running tests never hold it


def claim_in_subprocess(ids: range) -> subprocess.CompletedProcess:
    code = ("import sys; from cfgrl_ros.ros_domain import claim_domain_id\n"
            f"try:\n    print(claim_domain_id(range({ids.start}, {ids.stop}))[0])\n"
            "except RuntimeError as e:\n    print(e); sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_claimed_id_is_refused_to_other_processes_until_released():
    domain_id, fd = claim_domain_id(ONE_ID)
    assert domain_id == 233
    try:
        taken = claim_in_subprocess(ONE_ID)
        assert taken.returncode == 3 and "233-233 are held" in taken.stdout
    finally:
        os.close(fd)
    free = claim_in_subprocess(ONE_ID)
    assert free.returncode == 0 and free.stdout.strip() == "233"


def test_claims_in_one_process_get_distinct_ids():
    (first, fd1), (second, fd2) = claim_domain_id(range(200, 204)), claim_domain_id(range(200, 204))
    try:
        assert first != second
    finally:
        os.close(fd1), os.close(fd2)


def test_loopback_only_overrides_what_would_widen_discovery(monkeypatch):
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "ROS_STATIC_PEERS": "192.168.1.7",
           "ROS_LOCALHOST_ONLY": "0", "ROS_DOMAIN_ID": "0", "HOME": "/root"}
    set_loopback_only(env, 42)
    assert env == {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": "42", "HOME": "/root"}

    for name in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_STATIC_PEERS"):
        monkeypatch.setenv(name, "x")
    assert isolate_process(7) == 7 and os.environ["ROS_DOMAIN_ID"] == "7"
    assert "ROS_STATIC_PEERS" not in os.environ
    domain_id = isolate_process()
    assert 30 <= domain_id < 60 and os.environ["ROS_DOMAIN_ID"] == str(domain_id)
    with pytest.raises(ValueError, match="0-232"):
        isolate_process(300)
