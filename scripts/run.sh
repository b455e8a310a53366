#!/usr/bin/env bash
# Set up .venv/ if needed, then run the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gigpo-train "$@"
