"""Keeping this project's own ROS processes to themselves: loopback-only discovery, a free domain id.

The demo, the evaluators and the tests start their nodes on this machine. Each claims a ROS domain id
with an exclusive lock file, so concurrent runs (two demos, a demo beside the tests, CI jobs on one
host) never share a DDS domain, and confines discovery to loopback, so nothing leaves the host.
The lock dies with its process. ROS-free: only environment variables and files.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import tempfile
from pathlib import Path
from typing import MutableMapping

# Ids 0-101 keep DDS ports (7400 + 250 * id + ...) below Linux's ephemeral port range.
# Demos and evaluators take 30-59, tests 60-101: above the ids people use by hand.
TOOL_DOMAIN_IDS = range(30, 60)
TEST_DOMAIN_IDS = range(60, 102)
LOCK_DIR = Path(tempfile.gettempdir()) / "cfgrl_ros_domains"
_claims = itertools.count()
_held_for_process: list[int] = []  # lock fds of isolate_process(): held until the process exits


def claim_domain_id(ids: range = TOOL_DOMAIN_IDS) -> tuple[int, int]:
    """A domain id from `ids` that no other process holds, and the file descriptor of its lock.

    Closing the descriptor (or exiting) releases the id. Raises RuntimeError when every id is taken.
    """
    LOCK_DIR.mkdir(exist_ok=True)
    with contextlib.suppress(PermissionError):  # shared by every user's runs: world-writable and sticky, like /tmp
        LOCK_DIR.chmod(0o1777)  # (only its owner may; for everyone else it already is)
    # Start at pid + counter: processes start apart, and consecutive claims in one process never
    # reuse the id just released (a slow subprocess may still be in that domain).
    start = os.getpid() + next(_claims)
    for offset in range(len(ids)):
        domain_id = ids[(start + offset) % len(ids)]
        fd = os.open(LOCK_DIR / f"{domain_id}.lock", os.O_CREAT | os.O_RDONLY, 0o644)  # flock needs no write
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return domain_id, fd
    raise RuntimeError(f"all ROS domain ids {ids[0]}-{ids[-1]} are held by other cfgrl_ros processes")


# What set_loopback_only sets or removes (tests record them first, to restore them afterwards).
ROS_ISOLATION_VARIABLES = ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_STATIC_PEERS", "ROS_LOCALHOST_ONLY")


def set_loopback_only(env: MutableMapping[str, str], domain_id: int) -> None:
    """Discovery over loopback only, in `domain_id`; peer settings that would widen it are removed."""
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_STATIC_PEERS", None)
    env.pop("ROS_LOCALHOST_ONLY", None)  # deprecated, and conflicts with the discovery range


def isolate_process(domain_id: int | None = None) -> int:
    """Put this process (and the nodes it starts, which inherit os.environ) on loopback in a domain of
    its own: `domain_id` if given, else a free one from TOOL_DOMAIN_IDS, held until exit. Returns it."""
    if domain_id is None:
        domain_id, fd = claim_domain_id(TOOL_DOMAIN_IDS)
        _held_for_process.append(fd)
    elif not 0 <= domain_id <= 232:
        raise ValueError(f"ROS domain id must be within 0-232, got {domain_id}")
    set_loopback_only(os.environ, domain_id)
    return domain_id
