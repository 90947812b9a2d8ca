"""Start and stop ROS node processes (policy, sim) for the evaluator, the demo and the tests.

Each node runs as `python -m <module>` in its own session (process group), logging to a file, so it
can be stopped by its id: SIGINT first (the nodes shut down cleanly on it; the policy node publishes
its stop action), then SIGKILL of its group after a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

POLICY_MODULE = "cfgrl_ros.nodes.policy_node"
SIM_MODULE = "cfgrl_ros.nodes.sim_node"


def ros_arguments(parameters: dict) -> list[str]:
    """{'w': 3.0, 'trigger': 'image'} -> ['--ros-args', '-p', 'w:=3.0', '-p', 'trigger:=image']."""
    args = ["--ros-args"]
    for name, value in parameters.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["-p", f"{name}:={text}"]
    return args


class NodeProcess:
    def __init__(self, module: str, parameters: dict, log_path: str | os.PathLike, env: dict | None = None,
                 ros_args: list[str] = (), executable: list[str] | None = None):
        """ros_args: more --ros-args arguments (e.g. --params-file PATH), before the parameters.
        executable: the command instead of `python -m module` (e.g. the installed console script)."""
        self.module = module
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.command = [*(executable or [sys.executable, "-m", module]), "--ros-args", *ros_args,
                        *ros_arguments(parameters)[1:]]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError(f"{self.module} exited with code {self.process.returncode}:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the node process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def interrupt(self) -> None:
        """SIGINT: the nodes shut down cleanly on it (the policy node publishes its stop action)."""
        if self.alive:
            self.process.send_signal(signal.SIGINT)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGINT, wait, then SIGKILL its process group; returns the exit code (None: it outlived SIGKILL,
        e.g. stuck in the kernel; the caller carries on rather than raise from its clean-up)."""
        self.interrupt()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        if self.process.poll() is None or _group_alive(self.process.pid):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return None
        return self.process.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
