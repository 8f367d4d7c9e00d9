#!/usr/bin/env bash
# The whole suite: lint, then every test (slow end-to-end ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lint.sh
.venv/bin/python -m pytest -q "$@"
