#!/usr/bin/env bash
# The main job: set-up (fast when nothing changed), then the embedded default policy driving the
# simulated PointReach task through the ROS 2 policy node for w=1 and w=3 (scripts/demo.py;
# `--env visual-cube-single-v0 --policy <checkpoint>` runs OGBench's visual-cube-single instead).
# Extra arguments go to scripts/demo.py, e.g. `bash scripts/demo.sh --tasks 1 2 3 4 5`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO_ROOT/scripts/setup.sh"
# shellcheck source=scripts/_env.sh
source "$REPO_ROOT/scripts/_env.sh"
# The nodes' logs (one directory per run) stay out of the way.
export ROS_LOG_DIR="${ROS_LOG_DIR:-$(mktemp -d -t cfgrl_demo_ros_log.XXXXXX)}"
exec python "$REPO_ROOT/scripts/demo.py" "$@"
