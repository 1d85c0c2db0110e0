#!/usr/bin/env bash
# Per-kernel profile of the SSD (dispatcher, Mosaic backward) at 1.3b-L2k and 130m-L32k on one
# H200, .whl/ carried:  bash benchmarks/h200_ssd_profile.sh   (~3 min; $OUT/bundle.tgz)
set -u
source benchmarks/gpu_call_lib.sh
gpu_call_setup ssd_profile
(
  DIMBA_SSD_PALLAS_BACKWARD=${DIMBA_SSD_PALLAS_BACKWARD:-mosaic} \
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout -k 10 200 python3 benchmarks/ssd_profile.py \
      --out "$S/profile" > "$S/profile.log" 2>&1; echo "profile exit $?"
) > "$S/tracks.log" 2>&1 &
bundle_until_done ssd_profile
cat "$S/tracks.log"
