#!/usr/bin/env bash
# Registers, spills and SASS of the built kernels without a GPU machine: fetches NVIDIA's
# ptxas, cuobjdump and nvdisasm (CUDA 13.0 wheels from PyPI, the ptxas the H200 images run)
# into target/cuda-tools once, assembles the release build's PTX for sm_90a, and prints one
# line per kernel. The project itself never needs them (DESIGN §6: no CUDA toolkit at build
# time); this is a developer's check before spending device time.
#
#   tools/ptxas_local.sh [REGEX]           registers and spills of the kernels matching REGEX (both modules)
#   tools/ptxas_local.sh --sass KERNEL     its SASS, then its loops (tools/sass_loops.py)
#
# Run `cargo build --release` first (the PTX comes from its build script's OUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
tools=target/cuda-tools
if [ ! -x "$tools/bin/ptxas" ]; then
  mkdir -p "$tools/wheels" "$tools/bin"
  pip download --quiet --no-deps --dest "$tools/wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-cuobjdump==13.*" "nvidia-cuda-nvdisasm==13.*"
  for w in "$tools"/wheels/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$tools/unpacked"
  done
  for b in ptxas cuobjdump nvdisasm; do
    cp "$(find "$tools/unpacked" -path "*/bin/$b" -type f | head -1)" "$tools/bin/$b"
    chmod +x "$tools/bin/$b"
  done
fi
export PATH="$PWD/$tools/bin:$PATH"
# Both modules: the sm_80 one (assembled for the H200's sm_90, as the driver JIT-compiles it
# there) and the Hopper one (sm_90a).
out=$(dirname "$(ls -t target/release/build/fourbit-forge-*/out/forge_kernels_hopper.ptx 2>/dev/null | head -1)")
[ -f "$out/forge_kernels_hopper.ptx" ] || { echo "no PTX: run cargo build --release first" >&2; exit 1; }
modules="forge_kernels:sm_90 forge_kernels_hopper:sm_90a"
if [ "${1:-}" = --sass ]; then
  sass="$tools/$2.sass"
  for m in $modules; do
    ptxas -arch="${m#*:}" "$out/${m%%:*}.ptx" -o "$tools/${m%%:*}.cubin"
    cuobjdump -sass -fun "$2" "$tools/${m%%:*}.cubin" > "$sass" 2>/dev/null && grep -q "Function : $2\$" "$sass" && break
  done
  grep -q "Function : $2\$" "$sass" || { echo "no kernel $2 in either module" >&2; exit 1; }
  echo "SASS of $2: $sass"
  python3 tools/sass_loops.py "$sass"
  exit 0
fi
for m in $modules; do
  ptxas -arch="${m#*:}" -v "$out/${m%%:*}.ptx" -o "$tools/${m%%:*}.cubin" 2>&1
done | python3 -c '
import re, sys
name, rows = None, []
for line in sys.stdin:
    m = re.search(r"Compiling entry function .(\w+).", line)
    if m:
        name = m.group(1)
    m = re.search(r"(\d+) bytes spill stores", line)
    if m:
        spill = int(m.group(1))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        rows.append((name, int(m.group(1)), spill))
pat = re.compile(sys.argv[1])
for name, regs, spill in sorted(rows):
    if pat.search(name):
        print(f"{name:44s} {regs:4d} registers" + (f", {spill} bytes spilled" if spill else ""))
' "${1:-.}"
