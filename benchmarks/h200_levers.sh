#!/usr/bin/env bash
# One device call on a 2- or 4-GPU H200 machine (kinds nvidia-h200-x2 / -x4): the train-step and
# SSD-kernel levers of issues 4 and 5, as independent tracks spread over the GPUs. From the
# repository root, with the GPU wheels in .whl/ (carried):
#
#   bash benchmarks/h200_levers.sh          (everything lands in $OUT/bundle.tgz; ~9 min)
#
# Tracks (4 GPUs: one each; 2 GPUs: kernel tracks on GPU 0, trainer tracks on GPU 1, in turn):
# ssd      ssd_pallas_bench at the four DESIGN.md shapes: ssd(impl="pallas") as dispatched
#          (Mosaic GPU forward + Triton backward), the Triton forward, the Mosaic forward at
#          chunk 64, and xla, with the correctness checks.
# tests    the gpu-marked Mosaic SSD tests and the forward-routing tests.
# train    train_throughput of configs/base.py (16 x 1024 per step): SSD xla at chunk 256 (the
#          config), 128 and 64, and ssd_impl=pallas.
# breakdown  step_breakdown with ssd_impl=pallas (one block with / without the SSD, fwd_bwd,
#          profiled): where the step time goes with the kernel SSD.
# Knob: TRACK_S (wall seconds per track; 250).
set -u
source benchmarks/gpu_call_lib.sh
gpu_call_setup levers
TRACK_S=${TRACK_S:-250}

track_ssd() {
  timeout -k 10 "$TRACK_S" python3 benchmarks/ssd_pallas_bench.py --out "$S/ssd" \
      --variants default,128x4x8,mosaic:64:statepass+out > "$S/ssd.log" 2>&1; echo "ssd exit $?"; }
track_tests() {
  timeout -k 10 "$TRACK_S" python3 -m pytest tests/test_ssd_mosaic.py tests/test_ssd_pallas_select.py \
      -m gpu -rA --tb=short -q > "$S/tests_mosaic.log" 2>&1; echo "tests exit $?"; }
track_train() {
  timeout -k 10 "$TRACK_S" python3 benchmarks/train_throughput.py --config configs/base.py \
      --per-device-batch 16 --steps 10 --repeats 3 --warmup 2 --devices 1 \
      --budget-s $((TRACK_S - 25)) --variant xla_c256:model.ssd_impl=xla \
      --variant pallas_mosaic:model.ssd_impl=pallas \
      --variant xla_c128:model.ssd_impl=xla,model.chunk_size=128 \
      --variant xla_c64:model.ssd_impl=xla,model.chunk_size=64 \
      --out "$S/train_throughput_levers_h200" > "$S/train.log" 2>&1; echo "train exit $?"; }
track_breakdown() {
  timeout -k 10 "$TRACK_S" python3 benchmarks/step_breakdown.py --config configs/base.py \
      --per-device-batch 16 --budget-s $((TRACK_S - 30)) --cases block_ssd,block_no_ssd,fwd_bwd \
      --profile-dir /tmp/sb_pallas --profile-cases block_ssd,fwd_bwd \
      --out "$S/step_breakdown_pallas_h200" --config.model.ssd_impl=pallas \
      > "$S/breakdown.log" 2>&1; echo "breakdown exit $?"; }

if [ "$NGPU" -ge 4 ]; then
  CUDA_VISIBLE_DEVICES=0 track_ssd & CUDA_VISIBLE_DEVICES=1 track_tests &
  CUDA_VISIBLE_DEVICES=2 track_train & CUDA_VISIBLE_DEVICES=3 track_breakdown &
else
  (export CUDA_VISIBLE_DEVICES=0; track_ssd; track_tests) &
  (export CUDA_VISIBLE_DEVICES=$((NGPU > 1 ? 1 : 0)); track_train; track_breakdown) &
fi
bundle_until_done levers
