#!/usr/bin/env bash
# FP8 against bf16 on one GPU, in one call: sampling (B=1 and B=8), the S-VARE iteration and the quality measurement.
#
# Run from the repository root with diffusers importable; every JSON (and the grid PNG) goes to $OUT:
#
#     OUT=/tmp/fp8 bash benchmarks/run_fp8_suite.sh
#
# The bf16 and FP8 runs of each benchmark are consecutive processes on the same card, with the same flags but --fp8.
# Blocks run eager (no torch.compile: its minutes of compilation do not fit), sampling replays CUDA graphs. Each step
# has its own time limit (seconds, overridable) so that one slow step cannot take the others' time; a step that fails
# or runs out of time leaves its log in $OUT and the summary says so. Sized for about 240 s on an H100; the
# summary can be redone from the files: python benchmarks/fp8_summary.py $OUT.
#
# Environment: OUT (required), PYTHON (default python3, else python), SAMPLING_S (70), ERASURE_S (90), QUALITY_S (70) per step,
# SUITE_BUDGET_S (280: no step runs past it; a step that would start with less than 10 s left is skipped),
# SUITE_CONFIG (infinity-2b; "tiny" with SUITE_DEVICE=cpu is the CPU smoke run of the tests), SUITE_DEVICE (cuda),
# SUITE_SMALL (unset; 1: the smallest counts, for the smoke run), FP8_ARGS (extra flags of the FP8 runs and the
# quality script, e.g. "--fp8_fast_accum"), SUITE_STEPS (default "sampling erasure quality": a subset runs only
# those), SUITE_COMPILE (unset; 1: sampling with --compile --compile_vae, about 50 s of compilation per process: run
# it with SUITE_STEPS=sampling).
set -u
: "${OUT:?set OUT to the folder the JSON files go to}"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
CONFIG=${SUITE_CONFIG:-infinity-2b}
DEVICE=${SUITE_DEVICE:-cuda}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${SUITE_SMALL:-}" ]; then
    SAMPLING_ARGS=(--batch_sizes 1 2 --warmup 1 --iters 1)
    ERASURE_ARGS=(--warmup 1 --iters 1 --anchor_prompts 2 --anchor_batch_size 2)
    QUALITY_ARGS=(--toy_prompts 2 --toy_images_per_prompt 1 --grid_prompts 2 --toy_variants bf16 fp8)
else
    SAMPLING_ARGS=(--batch_sizes 1 8 --cuda_graphs --warmup 1 --iters 3)
    ERASURE_ARGS=(--warmup 2 --iters 3 --anchor_prompts 4 --anchor_batch_size 2)
    QUALITY_ARGS=(--toy_prompts 64 --toy_images_per_prompt 2 --grid_prompts 8)
fi
[ -z "${SUITE_COMPILE:-}" ] || SAMPLING_ARGS+=(--compile --compile_vae)
STEPS=" ${SUITE_STEPS:-sampling erasure quality} "
COMMON=(--config "$CONFIG" --device "$DEVICE")
read -r -a EXTRA <<< "${FP8_ARGS:-}"

step() {  # step NAME LIMIT_S ARGS...: run one benchmark, its JSON to $OUT/NAME.json, its stderr to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS left=$((BUDGET - (SECONDS - suite_start) - 5))  # 5 s kept for the summary
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "[fp8 suite] $name: skipped, the suite's budget of $BUDGET s is spent" >&2
        return
    fi
    timeout "$limit" "$PYTHON" "$@" --output_json "$OUT/$name.json" > /dev/null 2> "$OUT/$name.log"
    local rc=$?
    echo "[fp8 suite] $name: rc=$rc in $((SECONDS - start)) s" >&2
    [ "$rc" -eq 0 ] || tail -n 5 "$OUT/$name.log" >&2
}

suite_start=$SECONDS
BUDGET=${SUITE_BUDGET_S:-280}
if [[ $STEPS == *" sampling "* ]]; then
    step sampling_bf16 "${SAMPLING_S:-70}" benchmarks/bench_sampling.py "${COMMON[@]}" "${SAMPLING_ARGS[@]}"
    step sampling_fp8 "${SAMPLING_S:-70}" benchmarks/bench_sampling.py "${COMMON[@]}" "${SAMPLING_ARGS[@]}" --fp8 \
        "${EXTRA[@]}"
fi
if [[ $STEPS == *" erasure "* ]]; then
    step erasure_bf16 "${ERASURE_S:-90}" benchmarks/bench_erasure.py "${COMMON[@]}" "${ERASURE_ARGS[@]}"
    step erasure_fp8 "${ERASURE_S:-90}" benchmarks/bench_erasure.py "${COMMON[@]}" "${ERASURE_ARGS[@]}" --fp8 \
        "${EXTRA[@]}"
fi
if [[ $STEPS == *" quality "* ]]; then
    step fp8_quality "${QUALITY_S:-70}" benchmarks/bench_fp8_quality.py "${COMMON[@]}" "${QUALITY_ARGS[@]}" \
        "${EXTRA[@]}" --grid "$OUT/fp8_grid.png"
fi
echo "[fp8 suite] all steps: $((SECONDS - suite_start)) s" >&2

"$PYTHON" benchmarks/fp8_summary.py "$OUT"
