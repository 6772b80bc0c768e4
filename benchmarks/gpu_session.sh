#!/usr/bin/env bash
# Everything a GPU session should produce, in one script: the cuda-marked tests, the whole test
# suite with compiled kernels, one ViT-B/16 step with a 65,536 contrastive batch (gradient caching),
# and the benchmark suites against the peers (clip_train: the 1.3x training target), all under $OUT.
# Usage (repository root, on the GPU machine):  OUT=/tmp/out bash benchmarks/gpu_session.sh
# Nothing is installed; PYTHONPATH points at this checkout. SUITES="contrastive" narrows the
# benchmarks; PROFILE=full runs the full sweeps instead of --quick.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m mmfast info > "$OUT/info.txt" 2>&1
python3 -m pytest tests -m cuda -q -p no:cacheprovider > "$OUT/cuda-tests.txt" 2>&1
echo "exit $?" >> "$OUT/cuda-tests.txt"
timeout 240 python3 -m pytest tests -q -x -p no:cacheprovider -m "not distributed" > "$OUT/all-tests.txt" 2>&1
echo "exit $?" >> "$OUT/all-tests.txt"
timeout 300 python3 benchmarks/clip_grad_cache.py --size ViT-B/16 --batch 65536 --micro-batch 512 \
  > "$OUT/grad-cache-65536.txt" 2>&1
echo "exit $?" >> "$OUT/grad-cache-65536.txt"
python3 -m mmfast bench ${SUITES:-all} --profile "${PROFILE:-quick}" --out "$OUT/bench" > "$OUT/bench.txt" 2>&1
echo "exit $?" >> "$OUT/bench.txt"
tail -n 3 "$OUT"/*.txt
