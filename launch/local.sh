#!/usr/bin/env bash
# launch/local.sh — N training processes on this machine, joined by jax.distributed.
#
# Usage:
#   launch/local.sh N [python -m dimba_jax.main flags ...]
# Example (two processes, checkpoint every 3 steps, then resume to step 10):
#   launch/local.sh 2 --config configs/tiny.py --workdir runs/local --config.train.steps=6 --config.train.checkpoint_every=3
#   launch/local.sh 2 --config configs/tiny.py --workdir runs/local --config.train.steps=10 --config.train.checkpoint_every=3
#
# Every process runs `python -m dimba_jax.main` with the flags given plus
#   --config.mesh.coordinator_address=127.0.0.1:$PORT --config.mesh.num_processes=N --config.mesh.process_id=I
# so jax.distributed.initialize connects them (process 0 hosts the coordinator). Each process
# reads its own rows of every global batch and sees its own devices (1 CPU device each by
# default; set XLA_FLAGS=--xla_force_host_platform_device_count=K for K per process).
# Process 0 prints to this terminal; the others log to $LOG_DIR/process_I.log (printed when
# a process fails). SIGTERM/SIGINT are forwarded to all processes (they save and exit 0).
#
# Environment: PYTHON (default: python), PORT (default: a free port), LOG_DIR (default: a new
# temporary directory). Exit status: 0 if all processes succeed, else the first failure's.
set -u
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
N=$1; shift
PYTHON=${PYTHON:-python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t dimba_local.XXXXXX)}
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."

pids=()
for ((i = 0; i < N; i++)); do
  args=("$@" "--config.mesh.coordinator_address=127.0.0.1:$PORT"
        "--config.mesh.num_processes=$N" "--config.mesh.process_id=$i")
  if [[ $i -eq 0 ]]; then
    "$PYTHON" -m dimba_jax.main "${args[@]}" &
  else
    "$PYTHON" -m dimba_jax.main "${args[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
forward() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap forward TERM INT

status=0
for ((i = 0; i < N; i++)); do
  wait "${pids[$i]}"; rc=$?
  while [[ $rc -gt 128 ]] && kill -0 "${pids[$i]}" 2>/dev/null; do  # wait interrupted by a trap
    wait "${pids[$i]}"; rc=$?
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch/local.sh: process $i exited with status $rc" >&2
    [[ $i -gt 0 ]] && tail -n 40 "$LOG_DIR/process_$i.log" >&2
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  fi
done
exit $status
