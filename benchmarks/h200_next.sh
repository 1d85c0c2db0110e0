#!/usr/bin/env bash
# Planned after session 3; session 4 ran its ssd and probe tracks (benchmarks/h200_bwd_first.sh,
# results in docs/ssd_kernel_notes.md, v6). Its conv and train tracks (custom-VJP conv, XLA SSD
# at chunk 128) have still not run. The levers prepared after session 3's GPU time was spent. One call on a 2- or 4-GPU H200 machine (nvidia-h200-x2 / -x4), .whl/ carried:
#
#   bash benchmarks/h200_next.sh              (everything lands in $OUT/bundle.tgz; ~9 min)
#
# ssd      ssd_pallas_bench at the four shapes: ssd(impl="pallas") now runs forward-only calls at
#          chunk 64 (pallas_mosaic.FORWARD_ONLY_BLOCK_LEN) and training at 128; predicted from
#          session 3's mosaic_64 rows: fwd 0.19 / 0.23 / 0.43 / 0.58 ms (1.3b-L2k meets 0.5x).
# conv     one configs/base.py block (step_breakdown block_ssd / block_no_ssd) with the
#          hand-written conv backward (model.conv_impl=custom_vjp), pallas and xla SSD:
#          predicted -1.0 ms per block with pallas (docs/train_step_profile.md).
# train    train_throughput of configs/base.py: pallas + custom_vjp conv, xla at chunk 128 and 64.
# ssd_mosaic_bwd  the same benchmark with DIMBA_SSD_PALLAS_BACKWARD=mosaic: the Mosaic GPU chunk
#          backward (pallas_mosaic_bwd.py; first device compile) in the full fwd+bwd.
# probe    the Mosaic chunk-backward stage vs Triton (mosaic_probe.py --chunk-bwd: errors, ms,
#          GB/s at 130m-L2k, q 128 / 64) and the gpu-marked tests of pallas_mosaic_bwd.py.
# Knob: TRACK_S (wall seconds per track; 250).
set -u
source benchmarks/gpu_call_lib.sh
gpu_call_setup next
TRACK_S=${TRACK_S:-250}

track_ssd() {
  timeout -k 10 $((TRACK_S / 2)) python3 benchmarks/ssd_pallas_bench.py --out "$S/ssd" --skip-check \
      --variants default,mosaic:64:statepass+out > "$S/ssd.log" 2>&1; echo "ssd exit $?"
  DIMBA_SSD_PALLAS_BACKWARD=mosaic timeout -k 10 $((TRACK_S / 2)) python3 benchmarks/ssd_pallas_bench.py \
      --out "$S/ssd_mosaic_bwd" --skip-xla --variants default > "$S/ssd_mosaic_bwd.log" 2>&1
  echo "ssd mosaic bwd exit $?"; }
track_conv() {
  for impl in pallas xla; do
    timeout -k 10 $((TRACK_S / 2)) python3 benchmarks/step_breakdown.py --config configs/base.py \
        --per-device-batch 16 --cases block_ssd,block_no_ssd --out "$S/block_custom_conv_$impl" \
        --config.model.ssd_impl=$impl --config.model.conv_impl=custom_vjp > "$S/conv_$impl.log" 2>&1
    echo "conv $impl exit $?"
  done; }
track_train() {
  timeout -k 10 "$TRACK_S" python3 benchmarks/train_throughput.py --config configs/base.py \
      --per-device-batch 16 --steps 10 --repeats 3 --warmup 2 --devices 1 \
      --budget-s $((TRACK_S - 25)) \
      --variant pallas_conv:model.ssd_impl=pallas,model.conv_impl=custom_vjp \
      --variant xla_c128:model.ssd_impl=xla,model.chunk_size=128 \
      --out "$S/train_throughput_next_h200" > "$S/train.log" 2>&1; echo "train exit $?"; }
track_probe() {
  timeout -k 10 "$TRACK_S" python3 benchmarks/mosaic_probe.py --out "$S/mosaic_bwd" \
      --budget-s $((TRACK_S - 30)) --chunk-bwd > "$S/mosaic_bwd.log" 2>&1; echo "probe exit $?"
  timeout -k 10 200 python3 -m pytest tests/test_ssd_mosaic_bwd.py -m gpu -rA --tb=short -q \
      > "$S/tests_mosaic_bwd.log" 2>&1; echo "bwd tests exit $?"; }

if [ "$NGPU" -ge 4 ]; then
  CUDA_VISIBLE_DEVICES=0 track_ssd & CUDA_VISIBLE_DEVICES=1 track_conv &
  CUDA_VISIBLE_DEVICES=2 track_train & CUDA_VISIBLE_DEVICES=3 track_probe &
else
  (export CUDA_VISIBLE_DEVICES=0; track_ssd; track_probe) &
  (export CUDA_VISIBLE_DEVICES=$((NGPU > 1 ? 1 : 0)); track_conv; track_train) &
fi
bundle_until_done next
