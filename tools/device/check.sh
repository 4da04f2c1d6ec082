#!/usr/bin/env bash
# On a GPU machine with staged executables (../shared/tools/stage-gpu → .gpu/): runs every
# staged test executable, then the staged benches, and — when a second staging of an older
# revision sits in .gpu-before/ — that revision's benches in the same run, so versions are
# compared on one card. Logs go to $OUT (or ./device-logs). Usage:
#   tools/device/check.sh [tests|benches|all] [extra command ...]
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
out=${OUT:-device-logs}; mkdir -p "$out"
what=${1:-all}; shift || true
# cuSOLVER/cuBLAS live in the PyTorch venv on the device images.
for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export FORGE_REQUIRE_CUSOLVER=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  ./.gpu/run-tests.sh 2>&1 | tee "$out/tests.log" | grep -E "^(===|test result|test .*FAILED|thread .* panicked)" || true
  grep -q "all test executables: passed" "$out/tests.log" || status=1
fi
if [ "$what" = benches ] || [ "$what" = all ]; then
  for b in .gpu/bin/bench-*; do
    name=$(basename "$b")
    if [ -x ".gpu-before/bin/$name" ]; then
      echo "=== $name (before: $(cut -c1-8 .gpu-before/REV 2>/dev/null))" | tee -a "$out/benches.log"
      ".gpu-before/bin/$name" --bench 2>&1 | tee -a "$out/benches.log" | tail -n 25
    fi
    echo "=== $name (this revision)" | tee -a "$out/benches.log"
    "$b" --bench 2>&1 | tee -a "$out/benches.log" | tail -n 25
  done
fi
[ $# -gt 0 ] && { echo "=== $*"; "$@" 2>&1 | tee "$out/extra.log"; }
exit $status
