#!/usr/bin/env bash
# README's first command: set everything up, then run the main job on the default model
# (evaluate SmolLM2-135M dense, convert it to an MoE, evaluate it, save it and write its report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moefy run smollm2-135m --out runs/smollm2-135m-moe --overwrite "$@"
