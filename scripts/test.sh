#!/usr/bin/env bash
# The test command: set-up (fast when nothing changed), then the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k messages -x` or `bash scripts/test.sh tests/test_image.py`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO_ROOT/scripts/setup.sh"
# shellcheck source=scripts/_env.sh
source "$REPO_ROOT/scripts/_env.sh"
cd "$REPO_ROOT"

status=0
# The set-up above installed ROS 2: a test that would skip for want of rclpy fails instead.
export CFGRL_REQUIRE_ROS=1
# The whole suite, unless the arguments name test files or directories themselves.
targets=(tests)
for arg in "$@"; do [[ $arg == tests* ]] && targets=(); done
# A test hung for 15 minutes prints every thread's stack, so a CI time-out still says where.
python -m pytest -q -o faulthandler_timeout=900 "${targets[@]}" "$@" || status=$?
if ((status == 5)); then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$status"
