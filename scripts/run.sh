#!/usr/bin/env bash
# Set up .venv/ if needed, then run the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The main job replaces its own previous run (gigpo-train alone refuses to, without
# --overwrite); with --resume (or an explicit --overwrite) the flags are passed unchanged.
case " $* " in
*" --resume "* | *" --resume="* | *" --overwrite "* | *" --overwrite="*) exec .venv/bin/gigpo-train "$@" ;;
*) exec .venv/bin/gigpo-train --overwrite "$@" ;;
esac
