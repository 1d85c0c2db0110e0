# Shared pieces of the one-call GPU scripts (benchmarks/h200_*.sh); `source` it, don't run it.
#
#   gpu_call_setup NAME   installs the carried wheels (.whl/), exports PYTHONPATH etc., makes
#                         S=runs/NAME, lists the GPUs into $S/devices.txt and sets NGPU.
#   bundle_until_done NAME  while background jobs run, re-packs runs/NAME into $OUT/bundle.tgz
#                         every 20 s (a timeout keeps what was measured); packs once more at the end.

gpu_call_setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
  OUT=${OUT:-runs/gpu_out}; mkdir -p "$OUT"
  S=runs/$1; mkdir -p "$S"
  nvidia-smi -L > "$S/devices.txt"; NGPU=$(wc -l < "$S/devices.txt")
}

_bundle() { tar -czf "$OUT/bundle.tgz.tmp" -C runs "$1" && mv "$OUT/bundle.tgz.tmp" "$OUT/bundle.tgz"; }

bundle_until_done() {
  local t0; t0=$(date +%s)
  while [ -n "$(jobs -r)" ]; do sleep 20; _bundle "$1"; done
  wait
  _bundle "$1"
  echo "[$1] $NGPU GPU(s), done in $(( $(date +%s) - t0 )) s"
}
