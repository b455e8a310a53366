#!/usr/bin/env bash
# Set up .venv/ if needed, then run ruff and the test suite (slow tests too when CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
