#!/usr/bin/env bash
# README's second command: set everything up, then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# headless Chromium for the HTML report test (the test skips cleanly without it)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed; the browser test will skip"
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy src/moefy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
