#!/usr/bin/env bash
# ruff (lint + format check), mypy, and hadolint on the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ -f Dockerfile ]; then .venv/bin/hadolint Dockerfile; fi
