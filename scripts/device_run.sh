#!/usr/bin/env bash
# The GPU checks, as one prepared script for the lent GPU machine (H100/H200, Python 3.12 with torch,
# no network), which a task gets for 15 minutes in all. Build the kit here first
# (`bash scripts/device_kit.sh`), then call the device tool's run with
#   command: CFGRL_CODE_VERSION=0.1.0+<commit> bash scripts/device_run.sh headline   (or headline image, check)
#   carry:   [".devkit/site-py312.tar.gz", ".devkit/gl"]
#   timeout_s: 590
# docs/gpu.md says what each part measures, how long it takes and what to do with the results.
# Parts:
#   check     the CUDA tests that skip on CPU machines; dataset generation throughput (issue 3);
#             training steps/s; engine latency (cuda_graph vs eager)
#   headline [oracle|image]
#             `training.reproduce` at the device-10min scale (issue 7), one stage per step (generate,
#             train, evaluate w in {0, 1, 3} + report), each stage's figures (generation transitions/s,
#             training steps/s, success) recorded as soon as it ends; then the checkpoint in fp16 and,
#             with the time left, engine latency. Oracle goals (the paper's) by default; `image` repeats
#             it with goal images on the same dataset (runs/device/data)
# Every step has its own time limit, none runs past DEVICE_DEADLINE_S (550 s, inside the call's 590),
# and the script goes on after a failed one, most important first. What comes back in
# $OUT (at most 8 files): device.log (everything), figures.md (the measured figures), and for the
# headline report.md, success_vs_w.png, comparison.json and policy-fp16.safetensors. Plan on one call
# per task: after a machine's start and a 590 s call, too little of the 15 minutes is left for another.
# Outside the device tool (no $OUT) it writes to runs/device-out/ and still needs a CUDA GPU.
# DEVICE_REHEARSAL=1 runs `headline` on a CPU machine instead, with the project's venv as it is (no
# kit), the smoke scale and the CPU: the script's own plumbing, tested in tests/test_device_run.py.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 1
OUT="${OUT:-$REPO_ROOT/runs/device-out}"
mkdir -p "$OUT"
LOG="$OUT/device.log"
FIGURES="$OUT/figures.md"
PYTHON="${PYTHON:-python3}"
SITE=/tmp/cfgrl-site
RUN_START=$SECONDS
DEADLINE_S="${DEVICE_DEADLINE_S:-550}"
RUN_DIR="${DEVICE_RUN_DIR:-runs/device}"
SCRATCH="$RUN_DIR/scratch"  # generation, benchmark and export leftovers: one run's, not a shared /tmp
REHEARSAL="${DEVICE_REHEARSAL:-0}"

log() { printf '[device %4ds] %s\n' "$((SECONDS - RUN_START))" "$*" | tee -a "$LOG" >&2; }
figure() { printf '%s\n' "$*" >>"$FIGURES"; }

# step NAME LIMIT_S CMD...: runs CMD with a time limit (cut to what is left before the deadline), its
# output into the log; records the outcome.
step() {
  local name="$1" limit="$2" start=$SECONDS rc left
  shift 2
  left=$((DEADLINE_S - (SECONDS - RUN_START)))
  if ((left < 20)); then
    log "$name: skipped, ${left} s left before the deadline"
    figure "- step \`$name\`: skipped (deadline)"
    return 1
  fi
  ((limit > left)) && limit=$left
  log "$name: start (limit ${limit} s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) log "$name: ok in $((SECONDS - start)) s" ;;
    124 | 137) log "$name: TIMED OUT after $((SECONDS - start)) s" ;;
    *) log "$name: FAILED (exit $rc) after $((SECONDS - start)) s" ;;
  esac
  figure "- step \`$name\`: exit $rc, $((SECONDS - start)) s"
  return $rc
}

prepare_rehearsal() {
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" MUJOCO_GL="${MUJOCO_GL:-egl}" PYTHONUNBUFFERED=1
  figure "# Rehearsal $(date -u +%FT%TZ) on $(nproc) CPU cores: smoke scale, no GPU, no kit"
}

prepare() {
  local deb
  [[ -f .devkit/site-py312.tar.gz ]] || { log "no .devkit/: run scripts/device_kit.sh here and carry it"; exit 2; }
  for deb in .devkit/gl/*.deb; do dpkg -x "$deb" /; done
  ldconfig
  rm -rf "$SITE" && mkdir -p "$SITE" && tar -xzf .devkit/site-py312.tar.gz -C "$SITE"
  export PYTHONPATH="$SITE:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" MUJOCO_GL=egl PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
  local vendor
  for vendor in /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json \
    /usr/share/glvnd/egl_vendor.d/10_nvidia.json /etc/glvnd/egl_vendor.d/10_nvidia.json; do
    [[ -f $vendor ]] && { export __EGL_VENDOR_LIBRARY_FILENAMES="$vendor"; break; }
  done
  # No .git travels: the checkpoints' code version comes from the caller's commit, if given.
  export CFGRL_CODE_VERSION="${CFGRL_CODE_VERSION:-0.1.0+device}"
  {
    echo "# Device run $(date -u +%FT%TZ), code $CFGRL_CODE_VERSION"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/- GPU: /'
    echo "- CPU: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  } >>"$FIGURES"
  # MuJoCo must render through the NVIDIA driver: a software renderer would make every figure wrong.
  # Bounded: a hung eglInitialize must not eat the call.
  timeout 90 "$PYTHON" - >>"$FIGURES" 2>>"$LOG" <<'EOF' || { log "EGL check failed: see device.log"; return 1; }
import mujoco, torch
from OpenGL import GL
context = mujoco.GLContext(64, 64)
context.make_current()
renderer = GL.glGetString(GL.GL_RENDERER).decode()
print(f"- python {__import__('sys').version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()}), mujoco {mujoco.__version__}")
print(f"- MuJoCo EGL renderer: {renderer}")
context.free()
if "llvmpipe" in renderer.lower() or "software" in renderer.lower():
    raise SystemExit(f"EGL gave a software renderer ({renderer}), not the GPU")
EOF
}

check_tests() {
  # The tests that skip without a GPU (TensorRT ones skip here too: it cannot be installed).
  step tests 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_engines.py tests/test_data.py \
    tests/test_export.py -k "cuda or tensorrt"
}

check_generation() {
  # Issue 3's figure: 1001-step cube-single play episodes, 16 processes: replay 3 shards each, OGBench's
  # own rendering 1 each (3 would outlast its step). A rate counts from the start, so the 16 processes'
  # start-up is spread over 3 episodes per worker for replay and over 1 for env: env's rate reads low.
  local run mode shadow episodes dir
  for run in "replay 4096 48" "replay 1024 48" "env 4096 16"; do
    read -r mode shadow episodes <<<"$run"
    dir="$SCRATCH/gen-$mode-$shadow"
    rm -rf "$dir"
    step "generate-$mode-shadow$shadow" 150 "$PYTHON" -m training.generate_dataset --env cube-single \
      --variant play --num-episodes "$episodes" --num-val-episodes 0 --shard-episodes 1 --workers 16 \
      --render-mode "$mode" --render-tiles 16 --shadow-size "$shadow" --out-dir "$dir" &&
      grep -h '^wrote ' "$LOG" | tail -n 1 | sed "s/^/- generate $mode shadow $shadow: /" >>"$FIGURES"
    rm -rf "$dir"
  done
  step render-fidelity 90 "$PYTHON" -m training.bench_render --frames 200 --out "$OUT/render.md" &&
    cat "$OUT/render.md" >>"$FIGURES" && rm -f "$OUT/render.md"
}

check_training() {
  local goal_mode
  for goal_mode in oracle image; do
    step "train-$goal_mode" 120 "$PYTHON" -m training.bench_train --device cuda --rows 100000 --steps 300 \
      --goal-mode "$goal_mode" --out "$OUT/train.md" && cat "$OUT/train.md" >>"$FIGURES"
    rm -f "$OUT/train.md"
  done
}

# check_engines [LIMIT_S ITERATIONS ENGINES]
check_engines() {
  local limit="${1:-180}" iterations="${2:-300}" engines="${3:-torch,cuda_graph,tensorrt}"
  step engines "$limit" "$PYTHON" -m training.benchmark --device cuda --engines "$engines" \
    --iterations "$iterations" --min-seconds 0.5 --workdir "$SCRATCH/bench" --out "$OUT/engines.md" &&
    cat "$OUT/engines.md" >>"$FIGURES"
  rm -f "$OUT/engines.md"
}

# stage_figures DIR...: one line per reproduce stage record found (status, time, its summary's figures),
# so a stage that finished is in figures.md even when a later one runs out of time.
stage_figures() {
  "$PYTHON" - "$@" >>"$FIGURES" 2>>"$LOG" <<'EOF'
import json, pathlib, sys
for root in sys.argv[1:]:
    for path in sorted(pathlib.Path(root).rglob("*stage.json")):
        record = json.loads(path.read_text())
        facts = {k: v for k, v in record.get("summary", {}).items()
                 if isinstance(v, (int, float, str)) and len(str(v)) <= 40}
        print(f"- stage {record['stage']}: {record['status']}, {record['wall_s']:.0f} s; "
              + ", ".join(f"{k} {v}" for k, v in facts.items()))
EOF
}

headline() {
  local goal_mode="$1" report until
  local run="$RUN_DIR/visual-cube-single-$goal_mode"
  local settings=(--scale device-10min --workers 16 --device cuda)
  ((REHEARSAL)) && settings=(--scale smoke --device cpu)
  local reproduce=("$PYTHON" -m training.reproduce --task visual-cube-single --goal-mode "$goal_mode"
    --out "$run" --data-dir "$RUN_DIR/data" "${settings[@]}")
  # Three steps (generation, training, evaluation with the report): each has its own limit, and a
  # later one running out of time keeps the earlier ones' figures. A failed step stops the chain.
  for until in generate train report; do
    step "headline-$until" 420 "${reproduce[@]}" --until "$until" || break
  done
  stage_figures "$RUN_DIR"
  report="$run/report"
  if [[ -f $report/report.md ]]; then
    cp "$report/report.md" "$report/success_vs_w.png" "$report/comparison.json" "$OUT/" 2>>"$LOG"
    step export-fp16 60 "$PYTHON" -m training.export "$run/train/checkpoint.safetensors" --formats fp16 \
      --out "$SCRATCH/fp16" && cp "$SCRATCH/fp16/policy_fp16.safetensors" "$OUT/policy-fp16.safetensors"
  else
    log "headline: no report; the stage records above say how far it got"
    # An evaluation cut short leaves the success of its complete episode rounds.
    [[ -f $run/eval/partial-results.json ]] &&
      { printf -- '- partial evaluation: '; tr -d '\n ' <"$run/eval/partial-results.json"; echo; } >>"$FIGURES"
  fi
  ((REHEARSAL)) || check_engines 90 200 torch,cuda_graph  # with the time left: engine latency on the GPU
}

main() {
  local part="${1:-check}" goal_mode="${2:-oracle}"
  local usage="usage: $0 check | headline [oracle|image]"
  case "$part" in check | headline) ;; *) echo "$usage" >&2; exit 2 ;; esac
  case "$goal_mode" in oracle | image) ;; *) echo "$usage" >&2; exit 2 ;; esac
  : >"$LOG"; : >"$FIGURES"
  if ((REHEARSAL)); then
    [[ $part == headline ]] || { echo "$0: a rehearsal runs headline only; check needs the GPU" >&2; exit 2; }
    prepare_rehearsal
  elif ! prepare; then
    # No GPU rendering: generation and evaluation would be wrong or stall; measure what needs none.
    figure "- EGL check failed: only training and engine figures (no rendering)"
    check_training
    check_engines
    cat "$FIGURES"
    exit 1
  fi
  if [[ $part == check ]]; then
    check_generation
    check_tests
    check_training
    check_engines
  else
    headline "$goal_mode"
  fi
  log "done in $((SECONDS - RUN_START)) s; figures in $FIGURES"
  cat "$FIGURES"
}

main "$@"
