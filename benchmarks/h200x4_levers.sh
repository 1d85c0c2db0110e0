#!/usr/bin/env bash
# One device call on a 4-GPU H200 machine (kind nvidia-h200-x4): the train-step and SSD-kernel
# levers of issues 4 and 5, four independent tracks, one per GPU. From the repository root, with
# the GPU wheels in .whl/ (carried):
#
#   bash benchmarks/h200x4_levers.sh          (everything lands in $OUT/bundle.tgz; ~9 min)
#
# GPU0  train_throughput of configs/base.py (16 x 1024 per step): SSD xla at chunk 256 (the
#       config), 128 and 64, and ssd_impl=pallas (Mosaic GPU forward + Triton backward).
# GPU1  step_breakdown with ssd_impl=pallas (block, fwd_bwd, train_step, profiled), then with
#       xla at chunk 128: where the step time goes with each SSD.
# GPU2  ssd_pallas_bench at the four DESIGN.md shapes: ssd(impl="pallas") as dispatched, the
#       Triton forward, and the Mosaic forwards (chunk 64 / 128), with the correctness checks.
# GPU3  the gpu-marked SSD tests (Mosaic, Triton, the forward routing), then the batch-1 latency
#       of DIMBA / AR sampling with ssd_impl=pallas (Mosaic forward) vs the default.
# Knob: LEVERS_S (wall seconds each track may take; 520).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
S=runs/levers; mkdir -p "$S"
LEVERS_S=${LEVERS_S:-520}
nvidia-smi -L > "$S/devices.txt"

CUDA_VISIBLE_DEVICES=0 timeout -k 10 "$LEVERS_S" python3 benchmarks/train_throughput.py \
    --config configs/base.py --per-device-batch 16 --steps 10 --repeats 3 --warmup 2 --devices 1 \
    --budget-s $((LEVERS_S - 40)) --variant xla_c256:model.ssd_impl=xla \
    --variant xla_c128:model.ssd_impl=xla,model.chunk_size=128 \
    --variant xla_c64:model.ssd_impl=xla,model.chunk_size=64 \
    --variant pallas_mosaic:model.ssd_impl=pallas --out "$S/train_throughput_levers_h200" \
    > "$S/gpu0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 bash -c "
  timeout -k 10 240 python3 benchmarks/step_breakdown.py --config configs/base.py \
      --per-device-batch 16 --budget-s 210 --cases block_ssd,block_no_ssd,fwd_bwd,train_step \
      --profile-dir /tmp/sb_pallas --profile-cases block_ssd,fwd_bwd \
      --out $S/step_breakdown_pallas_h200 --config.model.ssd_impl=pallas
  echo exit \$?
  timeout -k 10 $((LEVERS_S - 250)) python3 benchmarks/step_breakdown.py --config configs/base.py \
      --per-device-batch 16 --budget-s $((LEVERS_S - 290)) --cases block_ssd,fwd_bwd,train_step \
      --profile-dir /tmp/sb_c128 --profile-cases fwd_bwd \
      --out $S/step_breakdown_xla_c128_h200 --config.model.ssd_impl=xla --config.model.chunk_size=128
  echo exit \$?" > "$S/gpu1.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2 timeout -k 10 "$LEVERS_S" python3 benchmarks/ssd_pallas_bench.py --out "$S/ssd" \
    --variants default,128x4x8,mosaic:64:statepass+out,mosaic:128:state+out \
    > "$S/gpu2.log" 2>&1 &
CUDA_VISIBLE_DEVICES=3 bash -c "
  timeout -k 10 300 python3 -m pytest tests/test_ssd_mosaic.py tests/test_ssd_pallas_select.py \
      -m gpu -rA --tb=short -q > $S/tests_mosaic.log 2>&1; echo mosaic tests exit \$?
  timeout -k 10 120 python3 -m pytest tests/test_ssd_pallas.py -m gpu -rA --tb=short -q \
      > $S/tests_triton.log 2>&1; echo triton tests exit \$?
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 $((LEVERS_S - 440)) python3 \
      benchmarks/latency_levers.py --variants base,pallas --profile 0 \
      --budget-s $((LEVERS_S - 450)) --out $S/latency" > "$S/gpu3.log" 2>&1 &
T0=$(date +%s)
while [ -n "$(jobs -r)" ]; do
  sleep 20
  tar -czf "$OUT/bundle.tgz.tmp" -C runs levers && mv "$OUT/bundle.tgz.tmp" "$OUT/bundle.tgz"
done
wait
tar -czf "$OUT/bundle.tgz.tmp" -C runs levers && mv "$OUT/bundle.tgz.tmp" "$OUT/bundle.tgz"
echo "[levers] done in $(( $(date +%s) - T0 )) s"; tail -3 "$S"/gpu*.log
