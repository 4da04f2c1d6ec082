#!/usr/bin/env bash
# Interop check of 4Bit Forge checkpoints against the real libraries (issue 12):
# compressed-tensors' own packer / decompressor, transformers loading a tiny Llama, and an
# independent GPTQ unpacker (see check.py). Makes a venv with the pinned packages, writes the
# fixtures with `cargo run --release --example interop_fixtures`, runs check.py.
#
#   tools/interop/run.sh            # venv in target/interop-venv, fixtures in target/interop-fixtures
#   INTEROP_VENV=DIR INTEROP_FIXTURES=DIR tools/interop/run.sh
#
# Needs python3 (with venv) and network access to PyPI on the first run. torch is taken from
# the PyTorch CPU index when that is reachable (~200 MB) and otherwise from PyPI, whose Linux
# wheel pulls the CUDA runtime packages (~4 GB installed; the check itself runs on the CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$SECONDS
VENV="${INTEROP_VENV:-target/interop-venv}"
FIXTURES="${INTEROP_FIXTURES:-target/interop-fixtures}"
HERE=tools/interop
PIP_OPTS=(--quiet --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    torch_pin=$(grep '^torch==' "$HERE/requirements.txt")
    "$PY" -m pip install "${PIP_OPTS[@]}" --timeout 15 --retries 0 \
        --index-url https://download.pytorch.org/whl/cpu "$torch_pin" 2>/dev/null \
        && echo "torch: CPU build from the PyTorch index" \
        || echo "torch: PyTorch CPU index not reachable; installing the PyPI build"
fi
"$PY" -m pip install "${PIP_OPTS[@]}" -r "$HERE/requirements.txt" -c "$HERE/constraints.txt"
echo "setup: $((SECONDS - start)) s"

cargo run --release --example interop_fixtures -- --out "$FIXTURES"
echo "fixtures: $((SECONDS - start)) s"
"$PY" "$HERE/check.py" "$FIXTURES"
echo "interop: total $((SECONDS - start)) s"
