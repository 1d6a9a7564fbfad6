// Block-sparse attention on the CPU, computed in float32 whatever the storage type (float32, float16, bfloat16):
// the contract's semantics (docs/ARCHITECTURE.md, "The ONNX node"). Two stages of independent tasks, for ONNX
// Runtime's thread pool: first K and V of each (batch, head) into contiguous float32 rows (once per call, so that a
// key block is neither converted nor gathered again for every query block that keeps it), then one task per
// (batch, head, query block).
#pragma once

#include <cstddef>
#include <cstdint>

#include "onnxruntime_c_api.h"

namespace saexport::ort {

struct CpuAttentionProblem {
    ONNXTensorElementDataType dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const void* q = nullptr;  // [batch, seqLen, heads, headDim], contiguous, of dtype; k, v and out alike
    const void* k = nullptr;
    const void* v = nullptr;
    void* out = nullptr;
    int64_t batch = 0;
    int64_t seqLen = 0;
    int64_t heads = 0;
    int64_t headDim = 0;
    int64_t blockSize = 0;
    int64_t blocks = 0;  // n = ceil(seqLen / blockSize)
    int64_t words = 0;   // ceil(n / 4)
    float scale = 0.f;
    const int32_t* topology = nullptr;  // [heads, n, words]: level of (h, u, v) is byte v % 4 of word [h, u, v / 4]
    const int32_t* budgets = nullptr;   // [heads]: the (clamped) step's row of the budgets
    float* packedKeys = nullptr;        // [batch, heads, seqLen, headDim]: filled by the first stage
    float* packedValues = nullptr;      // likewise
};

// Points packedKeys and packedValues at storage of the calling thread, kept for its later calls (concurrent runs
// of a session call from different threads). Returns false when it cannot be allocated.
bool reservePackedKeysValues(CpuAttentionProblem& problem) noexcept;

// First stage: one task per (batch, head).
inline size_t packTaskCount(const CpuAttentionProblem& p) { return static_cast<size_t>(p.batch * p.heads); }
void packKeysValues(const CpuAttentionProblem& problem, size_t task) noexcept;

// Second stage: one task per (batch, head, query block).
inline size_t attendTaskCount(const CpuAttentionProblem& p) {
    return static_cast<size_t>(p.batch * p.heads * p.blocks);
}

// Writes the output rows of one task. Returns false only when the task's scratch memory could not be allocated
// (its rows are then left unwritten and the caller reports the failure).
bool attendQueryBlock(const CpuAttentionProblem& problem, size_t task) noexcept;

}  // namespace saexport::ort
