#!/usr/bin/env bash
# GPU-3 track of the second 4-GPU session (TRACK4="bash benchmarks/track4_followup.sh DIR" for
# benchmarks/h200x4_session.sh): what the first session's track left open. One GPU; in order:
#  1. the Mosaic GPU forward probe (after the layout-inference fix), --quick.
#  2. configs/base.py training step with the Pallas SSD (issue 5 item 5; the xla row exists).
#  3. the same step with XLA command buffers (CUDA graphs) off, profiled: with graphs on, the
#     profiler saw only part of the kernels, so the busy/idle split of the first profile is suspect.
#  4. sampling latency levers not reached in the first call (cb_off, unroll4).
set -u
D=${1:?usage: track4_followup.sh OUTDIR}; mkdir -p "$D"
step() { echo "[track4] $(date +%T) $*"; }
TT="python3 benchmarks/train_throughput.py --config configs/base.py --per-device-batch 16 --steps 10 --repeats 3 --warmup 2"

step "Mosaic GPU probe"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 140 python3 benchmarks/mosaic_probe.py --out "$D/mosaic" --budget-s 115 --quick > "$D/mosaic.log" 2>&1
step "exit $?"; tail -12 "$D/mosaic.log"

step "base step, pallas SSD"
timeout -k 10 120 $TT --variant "pallas:model.ssd_impl=pallas" --out "$D/train_throughput_pallas" > "$D/throughput_pallas.log" 2>&1
step "exit $?"; tail -4 "$D/throughput_pallas.log"

step "base step, xla SSD, command buffers off, profiled"
XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout -k 10 130 $TT --variant "xla_cb_off:model.ssd_impl=xla" \
    --profile-dir /tmp/prof_cboff --profile-variants xla_cb_off --out "$D/train_throughput_cb_off" > "$D/throughput_cb_off.log" 2>&1
step "exit $?"; tail -4 "$D/throughput_cb_off.log"

step "latency levers: cb_off, unroll4"
timeout -k 10 100 python3 benchmarks/latency_levers.py --out "$D/latency" --budget-s 90 --variants base,cb_off,unroll4 \
    --compile-cache "" > "$D/latency.log" 2>&1
step "exit $?"; tail -6 "$D/latency.log"
