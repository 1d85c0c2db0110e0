#!/usr/bin/env bash
# Planned (not yet run): the first device run of the opt-in slab chunk-output kernel
# (dimba_jax/ssd/pallas_mosaic_out.py, built in session 4 after the GPU time was spent), on one
# H200 (nvidia-h200), .whl/ carried (~4 min):
#
#   bash benchmarks/h200_out_slab.sh          (everything lands in $OUT/bundle.tgz)
#
# 1. tests   its gpu-marked tests (slab vs whole kernel at 1.3b-L2k / 130m-L2k, full gradient).
# 2. probe   slab vs whole kernel at q 128 (and whole at q 64) at the four shapes
#            (mosaic_probe.py --out-slab). Predicted at 1.3b-L2k: ~200 us (170-240) vs 359 us.
# If it is correct and faster, set pallas_mosaic.OUT_KERNEL = "slab" and rerun
# `PART=ssd bash benchmarks/h200_final.sh` for the results of record.
set -u
source benchmarks/gpu_call_lib.sh
gpu_call_setup out_slab
(
  timeout -k 10 120 python3 -m pytest tests/test_ssd_mosaic_out.py -m gpu -rA --tb=short -q \
      -p no:warnings > "$S/tests_out_slab.log" 2>&1; echo "slab tests exit $?"
  timeout -k 10 120 python3 benchmarks/mosaic_probe.py --out "$S/out_slab" --budget-s 100 \
      --out-slab > "$S/out_slab.log" 2>&1; echo "probe exit $?"
) > "$S/tracks.log" 2>&1 &
bundle_until_done out_slab
cat "$S/tracks.log"
