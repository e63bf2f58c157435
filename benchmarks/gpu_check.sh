#!/usr/bin/env bash
# Every GPU check of the TensorRT backend in one command, sized for under 10 minutes on one GPU:
#   1. `pytest -m gpu` (tests/test_trt_gpu.py): export the embedded digits model (W8A8 MoDiff,
#      fp16, static scales; a fixed-batch export; the plain unet graph), build the plans, sample
#      10 steps with trt against ort on the CPU, CUDA graph == eager, short last batch, stale
#      sidecar refused, second GPU (when there is one);
#   2. `modiff-trt profile` of the step and warm-up plans (needs trtexec on PATH; recorded as
#      skipped otherwise; `--dry-run` commands are recorded either way).
# Writes OUT/summary.json (default OUT: ./gpu-check), with the logs, junit.xml and the exports
# beside it. Exit status: 0 when every step that ran passed.
#
# Needs a CUDA machine with `pip install -e '.[trt,test]'` done (tensorrt + CUDA torch).
# Written without a GPU: it has NOT been run yet.
#
# Usage: benchmarks/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-check}")
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/pytest.log" ]; then
    echo "error: $out exists and is not an earlier gpu_check output: choose another OUT" >&2
    exit 2
fi
rm -rf "$out"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MODIFF_TRT_GPU_DIR="$out/exports" MODIFF_TRT_GPU_REPORT="$out/metrics.jsonl"
started=$(date +%s)

timeout 400 python -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/junit.xml" tests/test_trt_gpu.py \
    >"$out/pytest.log" 2>&1
pytest_rc=$?

profile_rcs=()
for engine in step warmup; do
    timeout 20 python -m modiff_trt profile "$out/exports/modiff" --engine "$engine" --batch 4 --dry-run \
        >"$out/profile-$engine.cmd" 2>&1
    if command -v trtexec >/dev/null 2>&1 && [ -f "$out/exports/modiff/$engine.plan" ]; then
        timeout 60 python -m modiff_trt profile "$out/exports/modiff" --engine "$engine" --batch 4 --per-layer \
            >"$out/profile-$engine.log" 2>&1
        profile_rcs+=("$engine=$?")
    else
        profile_rcs+=("$engine=skipped")
    fi
done

python benchmarks/gpu_summary.py "$out" --pytest-rc "$pytest_rc" --profile "${profile_rcs[@]}" \
    --seconds "$(( $(date +%s) - started ))"
