#!/usr/bin/env bash
# Issue 20's GPU checks, prepared to run in two calls of the device tool (10 minutes each
# at most; about 15 minutes of GPU time in all). Not run by CI; the project never needs a GPU.
#
# Here, once (copies Beauty and the wheels the device image lacks into .gpu/, which git
# ignores and the device tool carries):
#     bash bench/gpu_check.sh carry
# On the device machine, from the repository root (`carry: [".gpu"]`), one stage a call:
#     bash bench/gpu_check.sh speed   # Beauty, 200 epochs (2 min cap each), fp32 and bf16  (~4.5 min)
#     bash bench/gpu_check.sh share   # 8 Beauty runs sharing the GPU for 5 min; memcheck   (~6.5 min)
#     bash bench/gpu_check.sh s3      # generate and prepare S3, then one epoch (5 min cap)  (~8 min)
# speed and share fit one session's 15 minutes with a machine start; s3 wants another.
# Each stage writes its logs under $OUT (the device tool's folder) or bench/results/gpu,
# and prints one summary line: GPU_CHECK stage=... key=value ...
# GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 runs the same stages on the CPU on tiny data
# (to test this script without a GPU).
set -uo pipefail

STAGE=${1:-speed}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-0}
RESULTS=${OUT:-bench/results/gpu}
CARRY=.gpu
mkdir -p "$RESULTS"

carry() {
  mkdir -p "$CARRY/wheels"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cp ../shared/data/beauty.txt "$CARRY/beauty.txt"
  # duckdb (mqsa data prepare) is not in the device image: Python 3.12, manylinux x86_64.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" duckdb
  du -sh "$CARRY"
}

install() {  # the project and the carried wheels into /tmp/site, nothing else touched
  local site=/tmp/gpu-check-site
  if [ ! -d "$site/mqsa" ]; then
    if ! python3 -c "import duckdb" 2> /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$CARRY"/wheels/*.whl \
        || { echo "GPU_CHECK stage=$STAGE error=wheel-install"; exit 1; }
    fi
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$site" . \
      || { echo "GPU_CHECK stage=$STAGE error=project-install"; exit 1; }
  fi
  export PYTHONPATH=$site PYTHONUNBUFFERED=1
  MQSA=(python3 -m mqsa.cli)
}

beauty_data() {  # Beauty, or with GPU_CHECK_TINY a small generated set
  if [ "$TINY" = 1 ]; then
    [ -f /tmp/gpu-check-tiny/sequences.txt ] || "${MQSA[@]}" data synth --out /tmp/gpu-check-tiny \
      --users 400 --items 300 > /dev/null
    echo /tmp/gpu-check-tiny/sequences.txt
  else
    echo "$CARRY/beauty.txt"
  fi
}

seconds_per_epoch() {  # mean training seconds per epoch of a run's history.csv
  python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); \
print(f'{sum(float(x[\"seconds\"]) for x in r)/max(1,len(r)):.3f}/{len(r)}')" "$1/history.csv" 2>/dev/null \
    || echo none
}

speed() {
  local data epochs=200 limit=125
  data=$(beauty_data)
  [ "$TINY" = 1 ] && epochs=3
  nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
  local summary="GPU_CHECK stage=speed device=$DEVICE"
  for precision in fp32 bf16; do
    local run=$RESULTS/beauty-$precision start
    start=$(date +%s.%N)
    timeout "$limit" "${MQSA[@]}" train --data "$data" --out "$run" --device "$DEVICE" --threads 4 \
      --precision "$precision" --epochs "$epochs" --quiet > "$run.log" 2>&1
    local rc=$?
    summary+=" beauty_${precision}_rc=$rc beauty_${precision}_wall=$(python3 -c "import time;print(f'{time.time()-$start:.0f}')")"
    summary+=" beauty_${precision}_s_per_epoch/epochs=$(seconds_per_epoch "$run")"
  done
  echo "$summary" | tee "$RESULTS/summary-speed.txt"
}

s3() {  # one S3 epoch (sampled loss), no per-epoch validation: --eval-every 2 > --epochs 1
  local s3=/tmp/gpu-check-s3 s3_size=() summary="GPU_CHECK stage=s3 device=$DEVICE"
  [ "$TINY" = 1 ] && s3_size=(--users 3000 --items 2000)
  local start=$SECONDS
  timeout 120 "${MQSA[@]}" data synth-log --preset S3 "${s3_size[@]}" --out "$s3.parquet" \
    > "$RESULTS/s3-synth.log" 2>&1
  timeout 240 "${MQSA[@]}" data prepare "$s3.parquet" --out "$s3" > "$RESULTS/s3-prepare.log" 2>&1
  summary+=" prepare_rc=$? data_s=$((SECONDS - start))"
  # history.csv is written when the epoch ends, before the final evaluation on every user,
  # which the cap may cut short (train_rc 124): the epoch's time is read from history.csv
  timeout 300 "${MQSA[@]}" train --data "$s3/sequences.txt" --out "$RESULTS/s3" --device "$DEVICE" \
    --threads 8 --epochs 1 --eval-every 2 --quiet > "$RESULTS/s3.log" 2>&1
  summary+=" train_rc=$? epoch_s/epochs=$(seconds_per_epoch "$RESULTS/s3")"
  echo "$summary" | tee "$RESULTS/summary-s3.txt"
}

share() {
  local data seconds=300 runs=8
  data=$(beauty_data)
  [ "$TINY" = 1 ] && seconds=20 && runs=2
  local pids=()
  for i in $(seq 1 "$runs"); do
    timeout "$seconds" "${MQSA[@]}" train --data "$data" --out "$RESULTS/share-$i" --device "$DEVICE" \
      --threads 1 --seed "$i" --quiet > "$RESULTS/share-$i.log" 2>&1 &
    pids+=($!)
  done
  local ok=0 faults=0
  for pid in "${pids[@]}"; do
    wait "$pid"
    case $? in 0|124) ok=$((ok + 1)) ;; *) faults=$((faults + 1)) ;; esac  # 124: stopped by the timeout
  done
  local errors
  errors=$(cat "$RESULTS"/share-*.log | grep -ciE "illegal|cuda error|xid|Traceback" || true)
  local summary="GPU_CHECK stage=share device=$DEVICE runs=$runs seconds=$seconds clean_exits=$ok"
  summary+=" faults=$faults error_lines=$errors"
  echo "$summary memcheck=not-yet" > "$RESULTS/summary-share.txt"  # kept if the call is cut short
  local memcheck=skipped
  if [ "$DEVICE" = cuda ] && command -v compute-sanitizer > /dev/null; then
    # a few steps' worth: memcheck slows the run many times over; 124 = stopped at the cap
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "${MQSA[@]}" train --data "$data" \
      --out "$RESULTS/memcheck" --device cuda --epochs 1 --eval-every 2 --quiet > "$RESULTS/memcheck.log" 2>&1
    memcheck=rc$?
  fi
  echo "$summary memcheck=$memcheck" | tee "$RESULTS/summary-share.txt"
}

case $STAGE in
  carry) carry ;;
  speed) install; speed ;;
  share) install; share ;;
  s3) install; s3 ;;
  *) echo "usage: bash bench/gpu_check.sh carry|speed|share|s3" >&2; exit 2 ;;
esac
