"""The README's main command (scripts/demo.py, which scripts/demo.sh runs after set-up) on the embedded
default policy, at a small size: both nodes over DDS, a result for each w; and the model card matches
the file it describes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cfgrl_ros.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = REPO_ROOT / "cfgrl_ros" / "data" / "default_policy.safetensors"
MODEL_CARD = REPO_ROOT / "cfgrl_ros" / "data" / "README.md"


def test_model_card_matches_the_embedded_policy():
    checkpoint = load_checkpoint(DEFAULT_POLICY)
    card = MODEL_CARD.read_text()
    assert checkpoint.metadata["code_version"] in card
    assert checkpoint.config.goal_mode == "oracle" and checkpoint.config.image_size == 16
    assert json.loads(checkpoint.metadata["train_config"])["steps"] == 4000 and "4,000 steps" in card
    assert DEFAULT_POLICY.stat().st_size < 5e6  # a few MB, as the card says (fp16)


@pytest.mark.requires_rclpy
def test_demo_drives_the_sim_through_the_policy_node(ros_env, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--tasks", "1", "--episodes-per-task", "2",
         "--out-dir", str(tmp_path / "demo")],
        cwd=REPO_ROOT, env=ros_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for w in ("1", "3"):
        assert re.search(rf"^w={w}: success \d/2 \(\d+%\)  \[task 1 \d/2\]$", result.stdout, re.MULTILINE), \
            result.stdout[-2000:]
    assert list((tmp_path / "demo").glob("*.md"))
    assert {p.name for p in (tmp_path / "demo" / "logs").iterdir()} == {"sim.log", "policy.log"}
    assert f"node logs: {tmp_path / 'demo' / 'logs'}" in result.stdout


@pytest.mark.requires_rclpy
def test_demo_mistakes_are_one_line_errors(ros_env, tmp_path):
    for flags, message in ((["--env", "visual-cube-singel-v0"], "unknown env 'visual-cube-singel-v0'"),
                           (["--policy", str(tmp_path / "none.safetensors")], "no policy checkpoint at"),
                           (["--out-dir", "/proc/cfgrl-demo"], "--out-dir /proc/cfgrl-demo"),
                           (["--max-steps", "0"], "max_steps must be >= 1")):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), *flags],
                                cwd=REPO_ROOT, env=ros_env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, \
            result.stderr[-2000:]
