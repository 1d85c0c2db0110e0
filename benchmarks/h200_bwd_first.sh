#!/usr/bin/env bash
# Session 4's first device call, on one H200 (nvidia-h200), .whl/ carried (~8 min):
#
#   bash benchmarks/h200_bwd_first.sh         (everything lands in $OUT/bundle.tgz)
#
# 1. tests   the gpu-marked tests of the Mosaic chunk backward (tests/test_ssd_mosaic_bwd.py):
#            its first run on a device.
# 2. probe   the chunk-backward stage alone, Mosaic vs Triton (mosaic_probe.py --chunk-bwd).
# 3. ssd     ssd_pallas_bench at the four shapes, pallas only: the dispatcher's default (forward-
#            only calls at chunk 64 since session 3) and the same with DIMBA_SSD_PALLAS_BACKWARD=mosaic.
set -u
source benchmarks/gpu_call_lib.sh
gpu_call_setup bwd_first
(
  timeout -k 10 150 python3 -m pytest tests/test_ssd_mosaic_bwd.py -m gpu -rA --tb=short -q \
      > "$S/tests_mosaic_bwd.log" 2>&1; echo "bwd tests exit $?"
  timeout -k 10 100 python3 benchmarks/mosaic_probe.py --out "$S/mosaic_bwd" --budget-s 80 \
      --chunk-bwd > "$S/mosaic_bwd.log" 2>&1; echo "probe exit $?"
  timeout -k 10 110 python3 benchmarks/ssd_pallas_bench.py --out "$S/ssd" --skip-check --skip-xla \
      --variants default > "$S/ssd.log" 2>&1; echo "ssd exit $?"
  DIMBA_SSD_PALLAS_BACKWARD=mosaic timeout -k 10 110 python3 benchmarks/ssd_pallas_bench.py \
      --out "$S/ssd_mosaic_bwd" --skip-check --skip-xla --variants default > "$S/ssd_mosaic_bwd.log" 2>&1
  echo "ssd mosaic bwd exit $?"
) > "$S/tracks.log" 2>&1 &
bundle_until_done bwd_first
cat "$S/tracks.log"
