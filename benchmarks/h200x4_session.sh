#!/usr/bin/env bash
# One device call on a 4-GPU H200 machine (device kind nvidia-h200-x4) that trains the three models
# of the Pareto study at once, one per GPU, then evaluates them in parallel shards, while the fourth
# GPU runs the kernel and trainer benchmarks. Run from the repository root, with the wheels in .whl/
# and the shared corpus in .gpu/data/ (train-*.jsonl.xz, validation.jsonl.xz), both carried:
#
#   bash benchmarks/h200x4_session.sh            (everything lands in $OUT/bundle.tgz)
#
# Knobs (environment): STEPS (DIMBA and AR train.steps, equal so both see the same tokens; 4000),
# JUDGE_STEPS (2500), TRAIN_S (wall seconds of the training phase; 320), EVAL_S (wall seconds of
# the evaluation phase; 200), TRACK4 (a command for GPU 3, default: the kernel/trainer benchmarks),
# DIMBA_WORKDIR (runs/small) and DIMBA_OVERRIDES (extra --config.* flags of the DIMBA run, e.g.
# "--config.model.embed_scale=0.25" for an ablation), SHARD_HEADLINE / SHARD_STEPS / SHARD_ABLATIONS
# (pareto.py grid flags of the three evaluation shards; defaults below).
#
# Timeline:  GPU0 DIMBA small | GPU1 AR small | GPU2 judge  — in parallel, each stopped by SIGTERM
# at TRAIN_S (the trainer checkpoints and exits 0) — then GPU0: `--mode sample` (5 unprompted and
# 5 prompted, T=16 and T=64) and `--mode eval`; GPU1/GPU2: benchmarks/pareto.py shards (disjoint
# parts of the spec grid), merged by benchmarks/merge_pareto.py. GPU3 runs TRACK4 throughout.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DIMBA_DATA=.gpu/data
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
S=runs/session; mkdir -p "$S"
DIMBA_WORKDIR=${DIMBA_WORKDIR:-runs/small}; DIMBA_OVERRIDES=${DIMBA_OVERRIDES:-}
SHARD_HEADLINE=${SHARD_HEADLINE:-"--models ar,dimba --samplers ddim --steps 64 --lengths 1024 --prompted 0,1 --batches 1,64"}
SHARD_STEPS=${SHARD_STEPS:-"--models dimba --samplers ddim,ddpm --steps 16,8,32,128,256 --lengths 1024 --prompted 0 --batches 1,64"}
SHARD_ABLATIONS=${SHARD_ABLATIONS:-"--models dimba --samplers ddim,ddpm --steps 64 --lengths 1024 --prompted 1,0 --batches 1 --variants noclamp,noselfcond,cfg2"}
STEPS=${STEPS:-4000}; JUDGE_STEPS=${JUDGE_STEPS:-2500}; TRAIN_S=${TRAIN_S:-320}; EVAL_S=${EVAL_S:-200}
T0=$(date +%s)
bundle() { tar -czf "$OUT/bundle.tgz.tmp" -C runs session && mv "$OUT/bundle.tgz.tmp" "$OUT/bundle.tgz"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
nvidia-smi -L | tee "$S/devices.txt"

# ------------------------------------------------------------------ phase 1: training (parallel)
COMMON="--config.train.sample_every=0 --config.train.eval_every=0 --config.train.log_every=50"
CUDA_VISIBLE_DEVICES=0 timeout -s TERM -k 60 "$TRAIN_S" python3 -m dimba_jax.main --config configs/small.py \
    --workdir "$DIMBA_WORKDIR" --config.train.steps="$STEPS" --config.data.token_cache_dir=runs/cache0 $COMMON $DIMBA_OVERRIDES \
    > "$S/train_small.log" 2>&1 &
P0=$!
CUDA_VISIBLE_DEVICES=1 timeout -s TERM -k 60 "$TRAIN_S" python3 -m dimba_jax.main --config configs/ar_small.py \
    --workdir runs/ar_small --config.train.steps="$STEPS" --config.data.token_cache_dir=runs/cache1 $COMMON \
    > "$S/train_ar_small.log" 2>&1 &
P1=$!
CUDA_VISIBLE_DEVICES=2 timeout -s TERM -k 60 "$TRAIN_S" python3 -m dimba_jax.main --config configs/judge.py \
    --workdir runs/judge --config.train.steps="$JUDGE_STEPS" --config.data.token_cache_dir=runs/cache2 $COMMON \
    > "$S/train_judge.log" 2>&1 &
P2=$!
TRACK4=${TRACK4:-"bash benchmarks/track4.sh $S/track4"}
mkdir -p "$S/track4"
CUDA_VISIBLE_DEVICES=3 timeout -k 10 $((TRAIN_S + EVAL_S + 15)) bash -c "$TRACK4" > "$S/track4.log" 2>&1 &
P3=$!
wait $P0; echo "[session] DIMBA training exit $? at $(elapsed)s"
wait $P1; echo "[session] AR training exit $? at $(elapsed)s"
wait $P2; echo "[session] judge training exit $? at $(elapsed)s"
for m in "$DIMBA_WORKDIR" runs/ar_small runs/judge; do cp "$m/metrics.jsonl" "$S/metrics_$(basename "$m").jsonl" 2>/dev/null; done
cp "$DIMBA_WORKDIR/samples.txt" "$S/samples_end_of_training.txt" 2>/dev/null
bundle

# ------------------------------------------------------------------ phase 2: evaluation (parallel)
PROMPTS=(
  "Mathilde had one vast book of curious manuscript, which she had discovered in the farmhouse, and which was her constant"
  "\"I have the command of the door,\" said he; \"and your household, Sir Morgan, at this moment is too much occupied with"
  "Men have, however crudely, been seeking for and working for the object you refer to since the beginning of the world."
  "Mr. Henry, his shaven head bound in a napkin, tossed to and fro without remission, beating the bed with his hands. His"
  "And with Eddie. Everything falls into place suddenly, it all seems so wrong, so useless.\" He looked at her intently as"
)
PARGS=()
for p in "${PROMPTS[@]}"; do PARGS+=(--prompt "$p"); done
eval_gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  for T in 64 16; do
    echo "### python -m dimba_jax.main --workdir "$DIMBA_WORKDIR" --mode sample --steps $T --sampler ddim --config.sample.num_samples=5"
    timeout 60 python3 -m dimba_jax.main --workdir "$DIMBA_WORKDIR" --mode sample --steps $T --sampler ddim \
        --config.sample.num_samples=5 --seed 1
    echo "### python -m dimba_jax.main --workdir "$DIMBA_WORKDIR" --mode sample --steps $T --sampler ddim --prompt ... (5 prompts)"
    timeout 60 python3 -m dimba_jax.main --workdir "$DIMBA_WORKDIR" --mode sample --steps $T --sampler ddim \
        --seed 1 "${PARGS[@]}"
  done
  echo "### python -m dimba_jax.main --workdir "$DIMBA_WORKDIR" --mode eval"
  timeout 60 python3 -m dimba_jax.main --workdir "$DIMBA_WORKDIR" --mode eval
}
shard() {  # shard GPU NAME ARGS...
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 20 $((EVAL_S + 10)) python3 benchmarks/pareto.py --results /nonexistent.json \
      --long-context "" --compile-cache "" --budget-s "$EVAL_S" --dimba "$DIMBA_WORKDIR" --out "$S/pareto_$name.json" "$@" \
      > "$S/pareto_$name.log" 2>&1
}
(  # GPU0: the CLI samples of docs/small_run, then ablation rows with what is left of EVAL_S
  T_EVAL=$(date +%s)
  eval_gpu0 > "$S/samples_cli.txt" 2>&1
  LEFT=$(( EVAL_S - ($(date +%s) - T_EVAL) ))
  [ "$LEFT" -gt 60 ] && EVAL_S=$LEFT shard 0 ablations $SHARD_ABLATIONS
) &
E0=$!
shard 1 headline $SHARD_HEADLINE &
E1=$!
shard 2 steps $SHARD_STEPS &
E2=$!
wait $E0 $E1 $E2
echo "[session] evaluation done at $(elapsed)s"
python3 benchmarks/merge_pareto.py --base benchmarks/results/pareto_h200.json --out "$S/pareto_h200.json" \
    $(ls "$S"/pareto_{headline,steps,ablations}.json 2>/dev/null) 2>&1 | tail -3
wait $P3; echo "[session] track4 exit $? at $(elapsed)s"
bundle
echo "[session] done at $(elapsed)s"
