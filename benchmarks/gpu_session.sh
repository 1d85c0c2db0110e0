#!/usr/bin/env bash
# The one-call H200 session of the evidence in benchmarks/results and docs/ (run through the
# device tool with carry [".whl", ".gpu"]; .gpu/data holds two shared train shards + validation):
#   bash benchmarks/gpu_session.sh
# 1. benchmarks/pareto.py: trains the judge, the AR baseline and DIMBA small (same steps x batch
#    x seq_len for the last two), then times and judges them, then the long-context study.
# 2. benchmarks/train_throughput.py: tokens/s and MFU of configs/base.py at seq 1024 (1 GPU).
# Everything lands in $OUT (at most 8 files come back).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DIMBA_DATA=.gpu/data
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
nvidia-smi -L
timeout 380 python3 benchmarks/pareto.py --train-seconds 60 --train-steps 800 --judge-steps 400 \
    --budget-s 370 --samplers ddim --steps 16,64 --lengths 1024 --prompted 0,1 --batches 1,64 \
    --out "$OUT/pareto_h200.json" > "$OUT/pareto_log.txt" 2>&1
echo "pareto exit $?"
tr '\r' '\n' < "$OUT/pareto_log.txt" | grep -v 'train:' | tail -40
for m in ar_small small; do cp "runs/$m/metrics.jsonl" "$OUT/train_$m.jsonl" 2>/dev/null; done
cp runs/small/samples.txt "$OUT/samples_small.txt" 2>/dev/null
timeout 150 python3 benchmarks/train_throughput.py --config configs/base.py --per-device-batch 16 \
    --steps 10 --repeats 3 --warmup 2 --out "$OUT/train_throughput_h200" > "$OUT/throughput_log.txt" 2>&1; tail -12 "$OUT/throughput_log.txt"
echo "throughput exit $?"
