"""What a benchmark or report says about the machine it ran on (one place, so every figure says the same)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC 7B13"), else the architecture."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. "0.6/0.6/0.4": how busy the cores were while measuring."""
    return "/".join(f"{load:.1f}" for load in os.getloadavg())
