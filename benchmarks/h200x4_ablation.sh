#!/usr/bin/env bash
# One device call on a 4-GPU H200 machine (nvidia-h200-x4): the embedding-scale ablation of DIMBA
# small, two settings trained at once next to a fresh judge, then judged; GPU 3 runs TRACK4.
# Run from the repository root with .whl/ and .gpu/data/ carried (as benchmarks/h200x4_session.sh):
#
#   bash benchmarks/h200x4_ablation.sh            (everything lands in $OUT/bundle.tgz)
#
# Why: in the 4000-step run of configs/small.py (embed_scale 1.0) the head decodes the right token
# from x_t for t up to ~0.8T, so the generation problem sits in the last ~15% of the schedule
# (docs/small_run/README.md). A row norm of embed_scale*sqrt(d) with embed_scale ~ 4/sqrt(2d)
# (0.25 at d = 512) should put the hard region mid-schedule; 0.5 is the step between.
# Knobs (environment): SCALES ("0.25 0.5"), STEPS (4000, as the embed_scale 1.0 run), JUDGE_STEPS
# (2500, as before), TRAIN_S (315), EVAL_S (115), TRACK4 (default benchmarks/track4_followup.sh).
# The judge is retrained with the same config, seed and data as in the first session; its
# perplexity of real validation text (the "reference") shows how close it is to the first one.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DIMBA_DATA=.gpu/data NCCL_NVLS_ENABLE=0
OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
S=runs/ablation; mkdir -p "$S"
SCALES=${SCALES:-"0.25 0.5"}; STEPS=${STEPS:-4000}; JUDGE_STEPS=${JUDGE_STEPS:-2500}
TRAIN_S=${TRAIN_S:-315}; EVAL_S=${EVAL_S:-115}
T0=$(date +%s)
bundle() { tar -czf "$OUT/bundle.tgz.tmp" -C runs ablation && mv "$OUT/bundle.tgz.tmp" "$OUT/bundle.tgz"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
COMMON="--config.train.sample_every=0 --config.train.eval_every=0 --config.train.log_every=50"

# ------------------------------------------------------------------ phase 1: training (parallel)
read -r -a SC <<< "$SCALES"
CUDA_VISIBLE_DEVICES=1 timeout -s TERM -k 60 "$TRAIN_S" python3 -m dimba_jax.main --config configs/judge.py \
    --workdir runs/judge --config.train.steps="$JUDGE_STEPS" --config.data.token_cache_dir=runs/cache1 $COMMON \
    > "$S/train_judge.log" 2>&1 &
PJ=$!
PIDS=()
for i in "${!SC[@]}"; do
  gpu=$([ "$i" = 0 ] && echo 0 || echo 2)
  CUDA_VISIBLE_DEVICES=$gpu timeout -s TERM -k 60 "$TRAIN_S" python3 -m dimba_jax.main --config configs/small.py \
      --workdir "runs/small_es${SC[$i]}" --config.model.embed_scale="${SC[$i]}" --config.train.steps="$STEPS" \
      --config.data.token_cache_dir=runs/cache$gpu $COMMON > "$S/train_small_es${SC[$i]}.log" 2>&1 &
  PIDS+=($!)
done
TRACK4=${TRACK4:-"bash benchmarks/track4_followup.sh $S/track4"}
CUDA_VISIBLE_DEVICES=3 timeout -k 10 $((TRAIN_S + EVAL_S + 15)) bash -c "$TRACK4" > "$S/track4.log" 2>&1 &
P3=$!
for p in "${PIDS[@]}" $PJ; do wait "$p"; echo "[ablation] training pid $p exit $? at $(elapsed)s"; done
for s in "${SC[@]}"; do cp "runs/small_es$s/metrics.jsonl" "$S/metrics_small_es$s.jsonl" 2>/dev/null; done
cp runs/judge/metrics.jsonl "$S/metrics_judge.jsonl" 2>/dev/null
bundle

# ------------------------------------------------------------------ phase 2: judge + CLI (parallel)
for i in "${!SC[@]}"; do
  gpu=$([ "$i" = 0 ] && echo 0 || echo 1)
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 20 $((EVAL_S + 10)) python3 benchmarks/pareto.py --results /nonexistent.json \
      --long-context "" --compile-cache "" --budget-s "$EVAL_S" --dimba "runs/small_es${SC[$i]}" --ar runs/judge \
      --models dimba --samplers ddim --steps 64,16 --lengths 1024 --prompted 0,1 --batches 1 \
      --out "$S/pareto_es${SC[$i]}.json" > "$S/pareto_es${SC[$i]}.log" 2>&1 &
done
(
  export CUDA_VISIBLE_DEVICES=2
  for s in "${SC[@]}"; do
    echo "### python -m dimba_jax.main --workdir runs/small_es$s --mode eval"
    timeout 50 python3 -m dimba_jax.main --workdir "runs/small_es$s" --mode eval
  done
  echo "### python -m dimba_jax.main --workdir runs/small_es${SC[0]} --mode sample --steps 64 --sampler ddim --config.sample.num_samples=3 --config.sample.length=256"
  timeout 50 python3 -m dimba_jax.main --workdir "runs/small_es${SC[0]}" --mode sample --steps 64 --sampler ddim \
      --config.sample.num_samples=3 --config.sample.length=256 --seed 1
) > "$S/eval_cli.txt" 2>&1 &
wait $(jobs -p | grep -v "^$P3$")
echo "[ablation] evaluation done at $(elapsed)s"
wait $P3; echo "[ablation] track4 exit $? at $(elapsed)s"
bundle
echo "[ablation] done at $(elapsed)s"
