#!/usr/bin/env bash
# Whole-checkpoint interop (issue 13): `forge quantize` output directories loaded by
# transformers and checked against an independent unpacker (check_model_dir.py). Uses the
# venv of run.sh (created here the same way if missing).
#
#   tools/interop/run_model_dir.sh          # work files in target/interop-model-dir
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$SECONDS
VENV="${INTEROP_VENV:-target/interop-venv}"
WORK="${INTEROP_MODEL_DIR:-target/interop-model-dir}"
HERE=tools/interop
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, transformers, compressed_tensors" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" -c "$HERE/constraints.txt"
fi
cargo build --release -p forge-cli
FORGE=target/release/forge
rm -rf "$WORK" && mkdir -p "$WORK"
"$FORGE" demo -o "$WORK/llama"
"$FORGE" quantize "$WORK/llama" -o "$WORK/llama-w4" --max-shard-size 1MB
"$FORGE" quantize "$WORK/llama" -o "$WORK/llama-w3-mse" --bits 3 --group-size 64 --mse --exclude '*.o_proj' --max-shard-size 700KB
"$FORGE" demo --moe -o "$WORK/deepseek-fp8"
"$FORGE" quantize "$WORK/deepseek-fp8" -o "$WORK/deepseek-w4" --max-shard-size 400KB
status=0
"$VENV/bin/python" "$HERE/check_model_dir.py" "$WORK/llama-w4" "$WORK/llama" || status=1
"$VENV/bin/python" "$HERE/check_model_dir.py" "$WORK/llama-w3-mse" "$WORK/llama" || status=1
"$VENV/bin/python" "$HERE/check_model_dir.py" --load-only "$WORK/deepseek-w4" || status=1
echo "model-dir interop: total $((SECONDS - start)) s"
exit $status
