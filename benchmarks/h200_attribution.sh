#!/usr/bin/env bash
# One device call on a 2-GPU H200 machine (kind nvidia-h200-x2; also runs on one GPU, in turn):
# which source lines the copy/transpose kernels of a configs/base.py block come from, and the
# train-step levers the previous call had no time for. From the repository root, .whl/ carried:
#
#   bash benchmarks/h200_attribution.sh       (everything lands in $OUT/bundle.tgz; ~5 min)
#
# GPU 0  step_breakdown of one block (block_ssd) with ssd_impl xla and pallas, profiled with XLA
#        command buffers OFF: under jax 0.11 every kernel of a command buffer is reported as
#        "command_buffer_N", so only without them do kernel events name their HLO instruction
#        (and, through its metadata, the dimba_jax function). The block's own time changes a
#        little without command buffers; the attribution is the point.
# GPU 1  train_throughput of configs/base.py: ssd_impl=pallas (Mosaic GPU forward) and xla at
#        chunk 128.
set -u
source benchmarks/gpu_call_lib.sh
gpu_call_setup attribution

attribution() {
  for impl in xla pallas; do
    XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout -k 10 100 python3 benchmarks/step_breakdown.py \
        --config configs/base.py --per-device-batch 16 --cases block_ssd,block_no_ssd \
        --profile-dir "/tmp/attr_$impl" --profile-cases block_ssd \
        --out "$S/block_cb_off_$impl" --config.model.ssd_impl=$impl > "$S/block_$impl.log" 2>&1
    echo "block $impl exit $?"
    cp "/tmp/attr_$impl"/*/program.hlo.txt "$S/block_${impl}_program.hlo.txt" 2>/dev/null \
      || find "/tmp/attr_$impl" -name "*.hlo.txt" -exec cp {} "$S/block_${impl}_program.hlo.txt" \; 2>/dev/null
  done; }
levers() {
  timeout -k 10 290 python3 benchmarks/train_throughput.py --config configs/base.py \
      --per-device-batch 16 --steps 10 --repeats 3 --warmup 2 --devices 1 --budget-s 280 \
      --variant pallas_mosaic:model.ssd_impl=pallas \
      --variant xla_c128:model.ssd_impl=xla,model.chunk_size=128 \
      --out "$S/train_throughput_levers2_h200" > "$S/train.log" 2>&1; echo "train exit $?"; }

if [ "$NGPU" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 attribution & CUDA_VISIBLE_DEVICES=1 levers &
else
  (attribution; levers) &
fi
bundle_until_done attribution
