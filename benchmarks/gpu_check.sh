#!/usr/bin/env bash
# The GPU check, in one go, on a machine with a CUDA device: what the data pipeline and the
# training loop get out of the GPU (bench_data: step time, data wait and MFU per family at 0
# and `auto` workers, bf16-mixed), the GPU-marked tests, then the four model benchmarks (and
# the layer-removal and sparse-attention benchmarks) in bf16-mixed with the flash SDPA
# kernel, in under 10 minutes. Results go under one output directory:
#   pytest_gpu.xml            JUnit report of `pytest -m gpu`
#   bench_*.json              each benchmark's --json (environment, figures, ratios, raw steps)
#   *.log                     each step's console output
#   gpu_check.json            every step's command, exit status and seconds
#
# Usage (from anywhere in the repository):
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
# OUTPUT_DIR defaults to $OUT if set, else masklab-runs/bench/gpu. PYTHON picks the
# interpreter (default: .venv/bin/python if present, else python3; the checkout is put on
# PYTHONPATH, so an interpreter with torch, lightning and the data libraries will do without
# installing masklab); MASKLAB_DATA_DIR the data (default: ../shared/data beside the checkout).
#
# BERT runs with the mem-efficient kernel: both sides pass the padding mask, and flash
# takes no attention mask. Every step has its own time cap (CAP_* below, 550 s in all), so
# the whole check ends within 10 minutes even if a step hangs; a capped step exits 124.
# bench_attention runs fp32 (its own settings): FlexAttention compiled with the patterns'
# block masks against SDPA.
set -uo pipefail

cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-masklab-runs/bench/gpu}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${MASKLAB_DATA_DIR:-}" && -d ../shared/data ]]; then
    export MASKLAB_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export MLFLOW_DISABLE_TELEMETRY=true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Seconds per step: the tests, then each benchmark (startup, data, models, warm-up included).
CAP_DATA=120 CAP_TESTS=100 CAP_GPT=50 CAP_BERT=60 CAP_MAE=45 CAP_VIDEO=45 CAP_ABLATION=40 CAP_ATTENTION=90
# On a GPU a step takes milliseconds: more steps per round than the CPU defaults.
GPU=(--device cuda --precision bf16-mixed)
ROUNDS=(--rounds 5 --steps 10)

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device ($PYTHON); nothing run" >&2
    exit 2
fi
"$PYTHON" -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(), \
'bf16' if torch.cuda.is_bf16_supported() else 'no bf16')" | tee "$OUTDIR/device.log"

STEPS_JSON=()
FAILED=0
run_step() {  # name, cap in seconds, command...
    local name=$1 cap=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (cap ${cap} s): $*"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    local rc=${PIPESTATUS[0]}
    local dt=$((SECONDS - t0))
    echo "=== $name: exit $rc after ${dt} s"
    [[ $rc -ne 0 ]] && FAILED=1
    local cmd
    cmd=$("$PYTHON" -c 'import json, sys; print(json.dumps(" ".join(sys.argv[1:])))' "$@")
    STEPS_JSON+=("{\"step\": \"$name\", \"command\": $cmd, \"exit\": $rc, \"seconds\": $dt}")
}

run_step bench_data "$CAP_DATA" "$PYTHON" benchmarks/bench_data.py "${GPU[@]}" --families gpt,bert,mae,video \
    --workers 0,auto --rounds 1 --warmup 10 --steps 30 --json "$OUTDIR/bench_data.json"
# The files that hold GPU-marked tests (collecting every test file would need the whole stack).
run_step tests "$CAP_TESTS" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUTDIR/pytest_gpu.xml" \
    $(grep -l "mark.gpu" tests/test_*.py)
run_step bench_gpt "$CAP_GPT" "$PYTHON" benchmarks/bench_gpt.py "${GPU[@]}" --sdpa-kernel flash "${ROUNDS[@]}" \
    --json "$OUTDIR/bench_gpt.json"
run_step bench_bert "$CAP_BERT" "$PYTHON" benchmarks/bench_bert.py "${GPU[@]}" --sdpa-kernel efficient "${ROUNDS[@]}" \
    --json "$OUTDIR/bench_bert.json"
run_step bench_mae "$CAP_MAE" "$PYTHON" benchmarks/bench_mae.py "${GPU[@]}" --sdpa-kernel flash "${ROUNDS[@]}" \
    --json "$OUTDIR/bench_mae.json"
run_step bench_video "$CAP_VIDEO" "$PYTHON" benchmarks/bench_video.py "${GPU[@]}" --sdpa-kernel flash "${ROUNDS[@]}" \
    --json "$OUTDIR/bench_video.json"
run_step bench_ablation "$CAP_ABLATION" "$PYTHON" benchmarks/bench_ablation.py "${GPU[@]}" --sdpa-kernel flash \
    --rounds 5 --steps 5 --json "$OUTDIR/bench_ablation.json"
run_step bench_attention "$CAP_ATTENTION" "$PYTHON" benchmarks/bench_attention.py --device cuda --rounds 3 --steps 5 \
    --kinds full,sliding,bigbird,full-causal,sliding-causal --lengths 2048,4096,8192,16384 \
    --json "$OUTDIR/bench_attention.json"

{
    echo "{\"output_dir\": \"$OUTDIR\", \"seconds\": $SECONDS, \"failed\": $FAILED, \"steps\": ["
    for i in "${!STEPS_JSON[@]}"; do
        [[ $i -gt 0 ]] && echo ","
        echo "  ${STEPS_JSON[$i]}"
    done
    echo "]}"
} > "$OUTDIR/gpu_check.json"
echo "gpu_check: ${SECONDS} s in all, results in $OUTDIR (failed: $FAILED)"
exit $FAILED
