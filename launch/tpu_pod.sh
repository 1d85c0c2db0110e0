#!/usr/bin/env bash
# launch/tpu_pod.sh — train on every host of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods).
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE [python -m dimba_jax.main flags ...]
# Example:
#   launch/tpu_pod.sh my-v5p-64 us-east5-a --config configs/base.py --workdir gs://my-bucket/runs/base
#
# What it does, on all workers at once (gcloud ... ssh --worker=all):
#   1. copies this repository to ~/dimba_jax on every worker (scp --recurse; skip with SYNC=0),
#   2. installs it (pip install -e . plus jax[tpu]; skip with INSTALL=0),
#   3. runs `python -m dimba_jax.main FLAGS` on every worker. jax.distributed.initialize()
#      reads the slice topology from the TPU metadata (see dimba_jax/train/distributed.py), so no
#      coordinator flags are needed; each host feeds its own rows of the global batch.
# The workdir must be shared by all hosts (a gs:// bucket or an NFS path): orbax writes one
# checkpoint from all hosts together. Preemption: the TPU runtime sends SIGTERM; all hosts save
# the same step (jax's preemption sync) and exit 0; rerun the same command to resume.
# Environment: PROJECT (gcloud project, optional), SYNC=0/1, INSTALL=0/1, PYTHON (default python3).
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,20p' "$0"; exit 2; fi
TPU_NAME=$1; ZONE=$2; shift 2
PYTHON=${PYTHON:-python3}
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
cd "$(dirname "$0")/.."
gcloud_ssh() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}
if [[ "${SYNC:-1}" == 1 ]]; then
  gcloud_ssh "mkdir -p ~/dimba_jax"
  gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
    dimba_jax configs launch pyproject.toml README.md "$TPU_NAME":~/dimba_jax/
fi
if [[ "${INSTALL:-1}" == 1 ]]; then
  gcloud_ssh "cd ~/dimba_jax && $PYTHON -m pip install -q -U 'jax[tpu]' && $PYTHON -m pip install -q -e ."
fi
ARGS=$(printf ' %q' "$@")
gcloud_ssh "cd ~/dimba_jax && $PYTHON -m dimba_jax.main$ARGS"
