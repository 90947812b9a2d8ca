#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine with Python 3.11; run as root or via sudo.
# Installs the apt packages, a venv with the pinned Python packages (ROS 2 Kilted wheels included),
# builds msg/ into that venv and installs cfgrl_ros. Each step is skipped when its stamp (a hash of
# its inputs, kept inside the venv) matches, so a second run takes seconds and changes nothing.
#   VENV_DIR  the virtual environment to use or create (default: <repo>/.venv)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV_DIR:-$REPO_ROOT/.venv}"
VENV_PY="$VENV_DIR/bin/python"
STAMP_DIR="$VENV_DIR/.cfgrl-setup"
MSG_BUILD_DIR="$REPO_ROOT/build/cfgrl_msgs"
PIP_VERSION="25.3"
# MuJoCo EGL rendering (libglvnd + Mesa), the venv, and the message build (cmake, g++, headers).
APT_PACKAGES=(python3-venv python3-dev cmake g++ make
  libegl1 libegl-mesa0 libgl1-mesa-dri libglvnd0 libopengl0 libgl1)

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# Runs a command with its output kept aside; on failure shows the end of it.
quietly() {
  local output
  output="$(mktemp)"
  if ! "$@" >"$output" 2>&1; then
    tail -n 40 "$output" >&2
    rm -f "$output"
    die "failed: $*"
  fi
  rm -f "$output"
}

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "not root and no sudo: as root, run  apt-get install -y --no-install-recommends ${MISSING_APT[*]}  then run this again"
  fi
}

# Hash of the names and contents of the given repo-relative files, plus any extra words.
hash_inputs() {
  local extra="$1"; shift
  # A missing input is an error, not a hash without it (`set -e` does not reach into $(...) here).
  { (cd "$REPO_ROOT" && sha256sum "$@") || die "cannot hash $*"; printf '%s\n' "$extra"; } | sha256sum | cut -d' ' -f1
}

# True when step $1 last ran with input hash $2 and its output file $3 is still there.
up_to_date() { [[ -f "$STAMP_DIR/$1" && "$(<"$STAMP_DIR/$1")" == "$2" && -e "$3" ]]; }
write_stamp() { mkdir -p "$STAMP_DIR" && printf '%s\n' "$2" >"$STAMP_DIR/$1"; }

# Files under the given repo-relative dirs (those that exist), sorted, caches left out.
source_files() {
  local dirs=() dir
  for dir in "$@"; do [[ -d "$REPO_ROOT/$dir" ]] && dirs+=("$dir"); done
  ((${#dirs[@]})) || return 0
  (cd "$REPO_ROOT" && find "${dirs[@]}" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' |
    LC_ALL=C sort)
}

MISSING_APT=()

site_packages() { printf '%s/lib/python3.11/site-packages' "$VENV_DIR"; }

install_apt_packages() {
  if ! command -v dpkg-query >/dev/null; then
    log "apt: no dpkg here; install the equivalents of ${APT_PACKAGES[*]} yourself"
    return
  fi
  local pkg
  MISSING_APT=()
  for pkg in "${APT_PACKAGES[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] ||
      MISSING_APT+=("$pkg")
  done
  if ((${#MISSING_APT[@]} == 0)); then
    log "apt: all ${#APT_PACKAGES[@]} packages present"
    return
  fi
  log "apt: installing ${MISSING_APT[*]}"
  # A fresh VM's own apt jobs often hold the lock for a while: wait for it instead of failing.
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  quietly as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${MISSING_APT[@]}"
}

# The package names above are Debian 12's; elsewhere they may differ, so say so before using them.
check_os() {
  local id="" version=""
  if [[ -r /etc/os-release ]]; then
    id="$(. /etc/os-release && printf '%s' "${ID:-}")"
    version="$(. /etc/os-release && printf '%s' "${VERSION_ID:-}")"
  fi
  [[ "$id" == debian && "$version" == 12 ]] ||
    log "warning: made for Debian 12, this is ${id:-an unknown OS} ${version}; apt package names may differ"
}

# python3.11 first; python3 only if it is 3.11 (pyenv here, /usr/bin/python3 on Debian 12).
find_python311() {
  local candidate
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  die "Python 3.11 not found (tried python3.11 and python3)"
}

create_venv() {
  if [[ -x "$VENV_PY" ]]; then
    "$VENV_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
      die "$VENV_DIR is not a Python 3.11 venv; remove it or set VENV_DIR"
    if "$VENV_PY" -m pip --version >/dev/null 2>&1; then
      log "venv: $VENV_DIR present"
      return
    fi
    log "venv: $VENV_DIR has no working pip (an interrupted creation?): making it again"
    rm -rf "$STAMP_DIR"
  fi
  local python
  python="$(find_python311)"
  log "venv: creating $VENV_DIR with $python"
  "$python" -m venv --clear "$VENV_DIR"
}

install_requirements() {
  local hash
  hash="$(hash_inputs "pip==$PIP_VERSION" requirements.txt constraints.txt build-constraints.txt)"
  if up_to_date requirements "$hash" "$VENV_DIR/bin/pytest"; then
    log "pip: pinned requirements up to date"
    return
  fi
  log "pip: installing pinned requirements (a few minutes on a new venv)"
  "$VENV_PY" -m pip install -q "pip==$PIP_VERSION"
  "$VENV_PY" -m pip install -q -r "$REPO_ROOT/requirements.txt" -c "$REPO_ROOT/constraints.txt" \
    --build-constraint "$REPO_ROOT/build-constraints.txt"
  write_stamp requirements "$hash"
}

build_messages() {
  local hash files
  mapfile -t files < <(source_files msg)
  # The venv path and the installed ROS wheels are inputs too: a new venv needs its own build.
  hash="$(hash_inputs "$VENV_DIR $(<"$STAMP_DIR/requirements")" CMakeLists.txt package.xml "${files[@]}")"
  if up_to_date messages "$hash" "$(site_packages)/cfgrl_ros/msg/_policy_action.py"; then
    log "msg: cfgrl_ros messages up to date"
    return
  fi
  log "msg: building cfgrl_ros messages into $VENV_DIR"
  rm -rf "$MSG_BUILD_DIR"  # a clean build: the cache may point at another venv
  # The ament index (AMENT_PREFIX_PATH) is how rosidl finds the wheels' type supports.
  quietly env AMENT_PREFIX_PATH="$VENV_DIR" cmake -S "$REPO_ROOT" -B "$MSG_BUILD_DIR" -Wno-dev \
    -DCFGRL_INSTALL_PYTHON=OFF -DBUILD_TESTING=OFF \
    -DCMAKE_INSTALL_PREFIX="$VENV_DIR" -DCMAKE_PREFIX_PATH="$VENV_DIR" \
    -DPython3_EXECUTABLE="$VENV_PY"
  quietly cmake --build "$MSG_BUILD_DIR" -j "$(nproc)"
  quietly cmake --install "$MSG_BUILD_DIR"
  # rosidl installs a cfgrl_ros egg-info next to the generated package. pip would take it for an
  # old install of this project and, uninstalling that, delete the whole cfgrl_ros directory
  # (messages included). The msg files need no metadata, so drop it.
  rm -rf "$(site_packages)"/cfgrl_ros-*.egg-info
  write_stamp messages "$hash"
}

install_project() {
  local hash files
  mapfile -t files < <(source_files cfgrl_ros training launch config)
  # After a message build the generated (empty) cfgrl_ros/__init__.py has replaced ours: reinstall.
  hash="$(hash_inputs "$(<"$STAMP_DIR/messages")" setup.py package.xml resource/cfgrl_ros "${files[@]}")"
  if up_to_date project "$hash" "$VENV_DIR/bin/cfgrl_node"; then
    log "pip: cfgrl_ros package up to date"
    return
  fi
  log "pip: installing cfgrl_ros (console scripts, ament index marker, launch, config)"
  rm -rf "$REPO_ROOT/build/setuptools"  # setuptools never removes stale modules from it
  "$VENV_PY" -m pip install -q --no-deps --no-build-isolation "$REPO_ROOT"
  write_stamp project "$hash"
}

# What the tests and the node need, imported from the venv (not the source tree, hence cd /) the way
# they will be: a failure here, not a skip later.
check_install() {
  quietly env -C / -u PYTHONPATH AMENT_PREFIX_PATH="$VENV_DIR" "$VENV_PY" -c \
    'import rclpy, torch, ogbench, mujoco, onnxruntime; from cfgrl_ros.msg import PolicyAction; import cfgrl_ros.nodes.policy_node'
  log "check: rclpy, torch, ogbench, mujoco, onnxruntime and cfgrl_ros.msg import"
}

main() {
  local start=$SECONDS
  # One set-up at a time per venv: test.sh and demo.sh both run this, and two at once would rebuild
  # the same build directories and install into the same venv together.
  mkdir -p "$(dirname "$VENV_DIR")"
  exec 9>"$VENV_DIR.setup.lock"
  flock 9
  check_os
  find_python311 >/dev/null  # before apt: a missing Python 3.11 is said first
  install_apt_packages
  create_venv
  install_requirements
  build_messages
  install_project
  check_install
  log "done in $((SECONDS - start)) s; use it with: source scripts/_env.sh"
}

main "$@"
