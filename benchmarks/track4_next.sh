#!/usr/bin/env bash
# GPU-3 track planned for the next 4-GPU session (not yet run):
#   TRACK4="bash benchmarks/track4_next.sh runs/session/track4" bash benchmarks/h200x4_session.sh
# While GPUs 0-2 retrain DIMBA small / AR small / the judge and the Pareto shards then measure
# sampling without clamping (the session script's ablation shard), this GPU runs:
#  1. benchmarks/step_breakdown.py on configs/base.py: where the 190 ms train step goes (issue 4).
#  2. the Mosaic GPU probe, --quick: the chunk-state and fused chunk-state + state-pass kernels,
#     first device compile (issue 5).
#  3. the gpu-marked Mosaic tests (forward, gradients and final states vs the reference).
set -u
D=${1:?usage: track4_next.sh OUTDIR}; mkdir -p "$D"
step() { echo "[track4] $(date +%T) $*"; }

step "step breakdown of configs/base.py"
timeout -k 10 215 python3 benchmarks/step_breakdown.py --config configs/base.py --per-device-batch 16 \
    --step-ms 190.2 --budget-s 180 --profile-dir /tmp/sb_prof --out "$D/step_breakdown_h200" \
    > "$D/step_breakdown.log" 2>&1
step "exit $?"; tail -25 "$D/step_breakdown_h200.md" 2>/dev/null

step "Mosaic GPU probe (--quick)"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 150 python3 benchmarks/mosaic_probe.py --out "$D/mosaic" \
    --budget-s 140 --quick > "$D/mosaic.log" 2>&1
step "exit $?"; tail -12 "$D/mosaic.log"

step "Mosaic GPU tests"
timeout -k 10 100 python3 -m pytest tests/test_ssd_mosaic.py -q -m gpu -rA > "$D/mosaic_tests.log" 2>&1
step "exit $?"; tail -15 "$D/mosaic_tests.log"
