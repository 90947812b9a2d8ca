#!/usr/bin/env bash
# Builds .devkit/, what the GPU machine lacks for scripts/device_run.sh: there is Python 3.12 with
# torch, numpy, safetensors, yaml, tqdm, onnx(runtime) and matplotlib, but no MuJoCo, OGBench or
# EGL loader, and no network. Run here (x86_64, network to the package registries), then name
# `.devkit` in the device call's carry:
#   .devkit/site-py312.tar.gz  mujoco, dm_control (the parts OGBench imports), ogbench, gymnasium and
#                              their small pure-Python needs, built for CPython 3.12, versions from
#                              constraints.txt (the CI venv's), ~25 MB
#   .devkit/gl/*.deb           Debian's libglvnd EGL/GL loaders (the NVIDIA driver supplies the rest)
#   .devkit/MANIFEST           what is inside, with sha256 sums
# A second run with an unchanged constraints.txt reuses the downloaded wheels.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$REPO_ROOT/.devkit"
WHEELS="$KIT/wheels"  # download cache; not carried
PYTHON="${PYTHON:-python3}"
# Imported by `import ogbench` and its manipulation envs; what the GPU image already has is left out.
PACKAGES=(mujoco mujoco-core dm_control dm-env glfw PyOpenGL gymnasium Farama-Notifications ogbench)
# dm_control's suite, locomotion (82 MB of assets) and viewer, MuJoCo's studio, headers and docs:
# nothing that OGBench imports. mujoco-studio is a declared dependency of mujoco but is not imported.
PRUNE=(dm_control/locomotion dm_control/suite dm_control/blender dm_control/viewer
  mujoco/studio mujoco/doc mujoco/include mujoco/testdata)
GL_DEBS=(libegl1 libglvnd0 libopengl0 libgl1 libglx0)

log() { printf '[device-kit] %s\n' "$*"; }
die() { printf '[device-kit] error: %s\n' "$*" >&2; exit 1; }

[[ "$(uname -m)" == x86_64 ]] || die "the GPU machine is x86_64; build the kit on an x86_64 machine"

pinned() {  # NAME==VERSION from constraints.txt, matching names as pip does (case, - _ .)
  local name="$1" normal
  normal="$(tr 'A-Z_.' 'a-z--' <<<"$name")"
  awk -F'==' -v want="$normal" '{n=tolower($1); gsub(/[_.]/, "-", n)} n == want {print $1 "==" $2}' \
    "$REPO_ROOT/constraints.txt" | head -n 1 | grep . || die "$name is not pinned in constraints.txt"
}

pinned_specs() {  # sets SPECS: NAME==VERSION of every package (a plain assignment, so `pinned` failing stops us)
  local name spec
  SPECS=()
  for name in "${PACKAGES[@]}"; do spec="$(pinned "$name")"; SPECS+=("$spec"); done
}

download_wheels() {
  pinned_specs
  mkdir -p "$WHEELS"
  log "wheels for CPython 3.12: ${SPECS[*]}"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${SPECS[@]}"
}

build_site() {
  local site path
  pinned_specs
  site="$(mktemp -d)"
  # pip unpacks wheels for any target Python; nothing is compiled or run. By pin, not by glob: the cache
  # may still hold wheels of earlier pins.
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --target "$site" \
    --python-version 3.12 --implementation cp --only-binary=:all: "${SPECS[@]}"
  for path in "${PRUNE[@]}"; do rm -rf "${site:?}/$path"; done
  find "$site" -name '*_test.py' -delete
  tar -czf "$KIT/site-py312.tar.gz" -C "$site" .
  rm -rf "$site"
}

download_gl() {
  rm -rf "$KIT/gl" && mkdir -p "$KIT/gl"
  if ! (cd "$KIT/gl" && apt-get download "${GL_DEBS[@]}" >/dev/null 2>&1); then
    log "apt: refreshing the package lists"
    apt-get update -qq
    (cd "$KIT/gl" && apt-get download "${GL_DEBS[@]}" >/dev/null)
  fi
}

main() {
  mkdir -p "$KIT"
  download_wheels
  build_site
  download_gl
  (cd "$KIT" && sha256sum site-py312.tar.gz gl/*.deb && ls "$WHEELS") >"$KIT/MANIFEST"
  log "built $(du -sh --exclude=wheels "$KIT" | cut -f1) in $KIT (carry: [\".devkit/site-py312.tar.gz\", \".devkit/gl\"])"
}

main "$@"
