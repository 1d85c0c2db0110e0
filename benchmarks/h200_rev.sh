#!/usr/bin/env bash
# Session 4's second timing call, on one H200 (nvidia-h200), .whl/ carried (~7 min):
#
#   bash benchmarks/h200_rev.sh               (everything lands in $OUT/bundle.tgz)
#
# 1. tests   gpu-marked tests of the fused Mosaic reverse state pass (test_ssd_mosaic_rev.py), of
#            the Mosaic forward (test_ssd_mosaic.py: the state pass now keeps up to 4 chunks in
#            flight) and of the Mosaic chunk backward.
# 2. probe   the fused reverse kernel alone vs the Triton pair (mosaic_probe.py --rev).
# 3. ssd     ssd_pallas_bench at the four shapes, pallas only: the dispatcher's default (training
#            at chunk 128) and mosaic:64 (training at chunk 64), both with the all-Mosaic backward.
# 4. profile per-kernel times of the default at 1.3b-L2k and 130m-L32k (ssd_profile.py).
set -u
source benchmarks/gpu_call_lib.sh
gpu_call_setup rev
(
  timeout -k 10 150 python3 -m pytest tests/test_ssd_mosaic_rev.py -m gpu -rA --tb=short -q \
      -p no:warnings > "$S/tests_rev.log" 2>&1; echo "rev tests exit $?"
  timeout -k 10 100 python3 benchmarks/mosaic_probe.py --out "$S/rev" --budget-s 80 --rev \
      > "$S/rev.log" 2>&1; echo "probe exit $?"
  timeout -k 10 110 python3 benchmarks/ssd_pallas_bench.py --out "$S/ssd" --skip-check --skip-xla \
      --variants default,mosaic:64:statepass+out > "$S/ssd.log" 2>&1; echo "ssd exit $?"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout -k 10 60 python3 benchmarks/ssd_profile.py \
      --out "$S/profile" > "$S/profile.log" 2>&1; echo "profile exit $?"
  timeout -k 10 150 python3 -m pytest tests/test_ssd_mosaic.py tests/test_ssd_mosaic_bwd.py -m gpu \
      -rA --tb=short -q -p no:warnings > "$S/tests_fwd_bwd.log" 2>&1; echo "fwd/bwd tests exit $?"
) > "$S/tracks.log" 2>&1 &
bundle_until_done rev
cat "$S/tracks.log"
