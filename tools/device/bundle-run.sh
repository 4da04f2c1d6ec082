#!/usr/bin/env bash
# On a GPU machine: like check.sh, for a staging too large to carry as is. Here:
#   ONLY=gpu ../shared/tools/stage-gpu; mv .gpu /tmp/g; mkdir .gpu; tar cJf .gpu/bundle.tar.xz -C /tmp/g .
# There (device run, carry .gpu): BENCHES="gpu_pipeline gpu_pack" BT=150 [SKIP_TESTS=1] bash tools/device/bundle-run.sh
# Unpacks, runs every staged test (unless SKIP_TESTS), then each named bench under a timeout
# of BT seconds; logs (gpu.txt, tests.log, benches.log) go to $OUT.
set -u
cd .gpu && tar xJf bundle.tar.xz && rm bundle.tar.xz && cd ..
out=$OUT
for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib; do export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export FORGE_REQUIRE_CUSOLVER=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee $out/gpu.txt
git rev-parse HEAD > $out/rev.txt 2>/dev/null
start=$SECONDS
[ -n "${SKIP_TESTS:-}" ] || { ./.gpu/run-tests.sh > $out/tests.log 2>&1; echo "tests rc=$? in $((SECONDS-start)) s" | tee -a $out/tests.log; }
[ -n "${SKIP_TESTS:-}" ] || grep -E "^(===|test result|test .*FAILED|thread .* panicked)" $out/tests.log
for b in $BENCHES; do
  s=$SECONDS
  echo "=== bench-$b" >> $out/benches.log
  timeout $BT ./.gpu/bin/bench-$b --bench >> $out/benches.log 2>&1; echo "bench-$b rc=$? in $((SECONDS-s)) s" | tee -a $out/benches.log
done
