#!/usr/bin/env bash
# The kernel and trainer benchmarks that benchmarks/h200x4_session.sh runs on its fourth GPU while
# the other three train (one GPU, CUDA_VISIBLE_DEVICES set by the caller; the environment of the
# session script). Usage: bash benchmarks/track4.sh OUTDIR
#  1. configs/base.py training step at seq 1024 on one GPU, SSD impl xla vs pallas, with a
#     profile summary of the xla step (issue 4 MFU; issue 5 item 5).
#  2. the SSD Pallas kernels vs xla at the four DESIGN shapes (issue 5 benchmark).
#  3. the Pallas kernels' GPU correctness tests.
#  4. the Mosaic GPU forward probe.
set -u
D=${1:?usage: track4.sh OUTDIR}; mkdir -p "$D"
step() { echo "[track4] $(date +%T) $*"; }

step "base training step: xla vs pallas (+ profile)"
timeout -k 10 230 python3 benchmarks/train_throughput.py --config configs/base.py --per-device-batch 16 \
    --steps 10 --repeats 3 --warmup 2 --budget-s 215 --profile-dir /tmp/prof --profile-variants xla,pallas \
    --variant "xla:model.ssd_impl=xla" --variant "pallas:model.ssd_impl=pallas" \
    --out "$D/train_throughput_h200" > "$D/throughput.log" 2>&1
step "exit $?"; tail -15 "$D/throughput.log"

step "SSD kernels: pallas vs xla, four shapes"
timeout -k 10 140 python3 benchmarks/ssd_pallas_bench.py --out "$D" --variants 128x4x8 > "$D/ssd_bench.log" 2>&1
step "exit $?"; tail -12 "$D/ssd_bench.log"

step "Pallas GPU correctness tests"
timeout -k 10 90 python3 -m pytest tests/test_ssd_pallas.py -q -x -m gpu > "$D/pallas_tests.log" 2>&1
step "exit $?"; tail -5 "$D/pallas_tests.log"

step "Mosaic GPU probe"
timeout -k 10 90 python3 benchmarks/mosaic_probe.py --out "$D" --budget-s 80 > "$D/mosaic.log" 2>&1
step "exit $?"; tail -30 "$D/mosaic.log"
