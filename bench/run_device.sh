#!/usr/bin/env bash
# One device call: build the kernel library, GPU tests, sanitizer, benchmark (both kernel paths).
# Results land in $OUT. Extra arguments go to bench/attention.py.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
{ cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="80;90a" -G Ninja && cmake --build build; } > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
python3 -m pytest -q -m gpu tests/test_kernel_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
SAEXPORT_BSA_PATH=sm80 python3 -m pytest -q -m gpu tests/test_kernel_gpu.py -p no:cacheprovider 2>&1 | tail -2
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider \
  "tests/test_kernel_gpu.py::test_empty_rows_are_zeros_and_others_are_not" > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
python3 bench/attention.py "$@" 2>&1 | tee "$OUT/bench_attention.txt"
echo "--- portable path (SAEXPORT_BSA_PATH=sm80) ---"
SAEXPORT_BSA_PATH=sm80 python3 bench/attention.py "$@" 2>&1 | tail -11 | tee "$OUT/bench_attention_sm80.txt"
