#!/usr/bin/env bash
# Everything a GPU session should produce, sized for a 15-minute lease (BUDGET_S seconds of commands,
# default 420), in the order that matters when time runs out:
#   1. every test of the four kernels and their modules on the GPU (the `cuda`-marked ones included),
#      kernels compiled for the card, while the C++/CUDA log-mel extension builds with nvcc beside them;
#   2. the benchmark suites against the peers (--quick), one suite per process and time limit, so a slow
#      one cannot take the others' results with it;
#   3. one ViT-B/16 step with a 65,536 contrastive batch (gradient caching), if time is left.
# Each step gets min(its own limit, what is left of the budget). Everything lands in $OUT/session.tar.gz
# and $OUT/summary.txt (the lease returns at most 8 files); the summary ends with the benchmark tables
# and one table of every performance target: wanted, measured, met or not (mmfast.bench.targets).
# Usage (repository root, on the GPU machine):
#   OUT=/tmp/out MMFAST_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh
# Nothing is installed; PYTHONPATH points at this checkout. SUITES="contrastive log_mel" narrows the
# benchmarks; TESTS="tests/test_log_mel.py" the tests; PROFILE=full runs the full sweeps.
set -u
OUT=${OUT:-gpu-results}
BUDGET_S=${BUDGET_S:-420}
RESULTS=$(mktemp -d)/session
mkdir -p "$OUT" "$RESULTS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-8}
START=$(date +%s)
SUMMARY=$RESULTS/summary.txt

left() { echo $((BUDGET_S - ($(date +%s) - START) - 10)); }

step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND into NAME.txt under min(LIMIT_S, budget left)
  local name=$1 limit=$2 began rc
  shift 2
  (($(left) < limit)) && limit=$(left)
  if ((limit < 15)); then
    echo "$name: skipped, the budget is spent" | tee -a "$SUMMARY"
    return
  fi
  began=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$RESULTS/$name.txt" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - began)) s (limit $limit s)" | tee -a "$SUMMARY"
}

nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
python3 -m mmfast info > "$RESULTS/info.txt" 2>&1
head -n 20 "$RESULTS/info.txt" >> "$SUMMARY"

# The extension compiles on the CPU while the tests use the GPU; the log-mel tests wait for its lock.
python3 -c "from mmfast import _extension; print('extension loaded:', _extension.load())" \
  > "$RESULTS/extension-build.txt" 2>&1 &
BUILD=$!

parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 6)
step op-tests 170 python3 -m pytest -q -rfE -p no:cacheprovider "${parallel[@]}" \
  --deselect tests/test_log_mel.py::test_cuda_sources_compile_with_nvcc \
  ${TESTS:-tests/test_contrastive_op.py tests/test_mixed_attention_op.py tests/test_patch_embed_op.py \
  tests/test_log_mel.py tests/test_patch_embed_nn.py tests/test_mixed_attention_nn.py \
  tests/test_linear_cross_entropy_op.py tests/test_mixed_attention_decode.py tests/test_llava_model.py}
tail -n 25 "$RESULTS/op-tests.txt" >> "$SUMMARY"
wait $BUILD
tail -n 3 "$RESULTS/extension-build.txt" >> "$SUMMARY"

for suite in ${SUITES:-contrastive mixed_attention linear_cross_entropy decode clip_train patch_embed log_mel llava_train griffin_lim data_score audio_frontend
    unified_train}; do
  step "bench-$suite" 120 python3 -m mmfast bench "$suite" --profile "${PROFILE:-quick}" --out "$RESULTS/bench-$suite"
done
step grad-cache-65536 100 python3 benchmarks/clip_grad_cache.py --size ViT-B/16 --batch 65536 --micro-batch 512 \
  --steps 1
tail -n 5 "$RESULTS/grad-cache-65536.txt" >> "$SUMMARY"

for table in "$RESULTS"/bench-*/results.md; do
  [ -f "$table" ] && grep -v '^$' "$table" >> "$SUMMARY"
done
echo "## Targets (mmfast.bench.targets)" >> "$SUMMARY"
python3 -m mmfast.bench.targets "$RESULTS" >> "$SUMMARY" 2>&1
tar -czf "$OUT/session.tar.gz" -C "$(dirname "$RESULTS")" session
cp "$SUMMARY" "$OUT/summary.txt"
echo "total $(($(date +%s) - START)) s"
grep -E "^(op-tests|bench-|grad-cache|extension)|passed|failed" "$SUMMARY"
