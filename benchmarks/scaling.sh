#!/usr/bin/env bash
# Weak scaling of the trainer: configs/base.py at seq 1024, the same per-device batch on 1, 2 and 4
# GPUs (data+fsdp mesh), each device count a separate process bounded by `timeout`. Rows land in
# $OUT/scaling_h200.json + .md (tokens/s, tokens/s per device, MFU, scaling and efficiency vs 1).
#
#   bash benchmarks/scaling.sh                 # 1, 2, 4 devices (those that exist)
#   DEVICE_COUNTS="1 2" bash benchmarks/scaling.sh
#
# Environment (all optional):
#   OUT             output folder (default runs/scaling)
#   CONFIG          config file (default configs/base.py)
#   DEVICE_COUNTS   device counts to run (default "1 2 4"; counts above the GPUs present are skipped)
#   MESH_1/2/4      --mesh of each count (default data=1 | data=1,fsdp=2 | data=2,fsdp=2)
#   BATCH           per-device batch (default 16); SEQ (default 1024)
#   STEPS REPEATS WARMUP  timing (default 10 3 2)
#   RUN_TIMEOUT     seconds per device count (default 170)
#   EXTRA           more train_throughput.py arguments (e.g. "--config.model.ssd_impl=xla")
# The persistent compilation cache (JAX_COMPILATION_CACHE_DIR, default /tmp/jax_cache) lets the
# 1-device run reuse a compile of the same program from an earlier call on the same machine.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/scaling}; mkdir -p "$OUT"; : > "$OUT/scaling_log.txt"
CONFIG=${CONFIG:-configs/base.py}
BATCH=${BATCH:-16}; SEQ=${SEQ:-1024}
STEPS=${STEPS:-10}; REPEATS=${REPEATS:-3}; WARMUP=${WARMUP:-2}
RUN_TIMEOUT=${RUN_TIMEOUT:-170}
DEVICE_COUNTS=${DEVICE_COUNTS:-"1 2 4"}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on the shared GPU hosts
PY=${PYTHON:-python3}
AVAILABLE=$($PY -c "import jax; print(jax.device_count())" 2>/dev/null || echo 1)
echo "devices available: $AVAILABLE; counts requested: $DEVICE_COUNTS"
for N in $DEVICE_COUNTS; do
  if [ "$N" -gt "$AVAILABLE" ]; then echo "skip $N devices (only $AVAILABLE)"; continue; fi
  case $N in
    1) MESH=${MESH_1:-data=1} ;;
    2) MESH=${MESH_2:-data=1,fsdp=2} ;;
    4) MESH=${MESH_4:-data=2,fsdp=2} ;;
    *) MESH="data=-1" ;;
  esac
  echo "=== $N devices, mesh $MESH ==="
  # shellcheck disable=SC2086
  timeout "$RUN_TIMEOUT" $PY benchmarks/train_throughput.py --config "$CONFIG" \
      --per-device-batch "$BATCH" --seq-len "$SEQ" --devices "$N" --mesh "$MESH" \
      --steps "$STEPS" --repeats "$REPEATS" --warmup "$WARMUP" ${EXTRA:-} \
      --out "$OUT/scaling_h200" >> "$OUT/scaling_log.txt" 2>&1
  echo "exit $? after $N devices"
  grep -E '"(devices|tokens_per_s|mfu|step_ms|compile_s)"|Error' "$OUT/scaling_log.txt" | tail -6
done
[ -f "$OUT/scaling_h200.md" ] && cat "$OUT/scaling_h200.md"
