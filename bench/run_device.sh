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

# The TensorRT plugin driven as TensorRT would drive it, without TensorRT (plugins/tests/plugin_driver.cpp: what it
# checks and what it does not prove). TensorRT is not installed on the device machine and its headers are never
# committed: they travel with the call in the ignored folder $TRT_HEADERS (default .trt-headers/include; carry
# ".trt-headers"): NvInferRuntime.h, NvInferRuntimeBase.h, NvInferRuntimeCommon.h, NvInferRuntimePlugin.h,
# NvInferPluginBase.h, NvInferImpl.h, NvInferLegacyDims.h, NvInferVersion.h from github.com/NVIDIA/TensorRT include/.
# A build folder of its own (build/trt), so that the main build never depends on headers a later call may not carry.
TRT_HEADERS=${TRT_HEADERS:-.trt-headers/include}
if [ -f "$TRT_HEADERS/NvInferRuntime.h" ]; then
  TRT_HEADERS=$(cd "$TRT_HEADERS" && pwd)
  # FindTensorRT.cmake looks for NvInfer.h, which neither the plugin nor the driver includes: name the folder itself.
  rm -f build/trt/plugins/tests/saexport_plugin_driver
  if { cmake -S . -B build/trt -G Ninja -DCMAKE_CUDA_ARCHITECTURES="80;90a" -DTensorRT_ROOT="$TRT_HEADERS" \
         -DTensorRT_INCLUDE_DIR="$TRT_HEADERS" && cmake --build build/trt --target saexport_plugin_driver; } \
       > "$OUT/plugin_driver_build.log" 2>&1; then
    driver=(build/trt/plugins/tests/saexport_plugin_driver build/trt/plugins/tensorrt/libsaexport_trt_plugin_dynamic.so)
    "${driver[@]}" > "$OUT/plugin_driver.log" 2>&1
    echo "plugin driver rc=$?: $(grep -c '^PASS' "$OUT/plugin_driver.log") PASS, $(grep -c '^FAIL' "$OUT/plugin_driver.log") FAIL"
    grep -v '^PASS' "$OUT/plugin_driver.log"
    SAEXPORT_BSA_PATH=sm80 "${driver[@]}" > "$OUT/plugin_driver_sm80.log" 2>&1
    echo "plugin driver, portable path (SAEXPORT_BSA_PATH=sm80) rc=$?"; grep -E '^(FAIL|RESULT)' "$OUT/plugin_driver_sm80.log"
  else
    echo "plugin driver: build failed"; tail -30 "$OUT/plugin_driver_build.log"
  fi
else
  echo "plugin driver: skipped, no TensorRT headers in $TRT_HEADERS (put them there and carry .trt-headers)"
fi
