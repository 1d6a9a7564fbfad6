// What every BlockSparseAttention kernel of this library shares: the node's attributes, read and checked when
// ONNX Runtime creates the kernel, the input shapes, checked at every call, and ORT error statuses that name the
// node (docs/ARCHITECTURE.md, "The ONNX node").
#pragma once

#include <cstdint>
#include <string>

#include "onnxruntime_cxx_api.h"

namespace saexport::ort {

inline constexpr char kOpName[] = "BlockSparseAttention";
inline constexpr char kDomain[] = "ai.onnx.contrib";
inline constexpr char kPluginVersion[] = "1";  // the TensorRT plugin's version, written by the exporter

// Input positions: q, k, v, topology, budgets, step_index; one output.
enum InputIndex : size_t { kQ = 0, kK, kV, kTopology, kBudgets, kStepIndex, kInputCount };

struct NodeConfig {
    std::string nodeName;
    int64_t numHeads = 0;
    int64_t headDim = 0;
    int64_t blockSize = 0;
    float scale = 0.f;
};

// The sizes of one call, from the input shapes.
struct CallShape {
    int64_t batch = 0;
    int64_t seqLen = 0;
    int64_t blocks = 0;  // n = ceil(seqLen / blockSize)
    int64_t words = 0;   // ceil(n / 4): int32 words per topology row
    int64_t steps = 0;
    ONNXTensorElementDataType dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
};

// An error status naming the node: "BlockSparseAttention node 'NAME': WHAT" ("BlockSparseAttention: WHAT" for a
// node without a name). Never throws.
OrtStatus* nodeError(const OrtApi& api, OrtErrorCode code, const std::string& nodeName, const char* what) noexcept;

// Reads and checks the attributes; nullptr or the error status.
OrtStatus* readNodeConfig(const OrtApi& api, const OrtKernelInfo* info, NodeConfig& config) noexcept;

// Checks the six inputs' element types and shapes against the node (the contract's shapes); fills `shape`.
OrtStatus* checkInputs(const OrtApi& api, const NodeConfig& config, OrtKernelContext* context,
                       CallShape& shape) noexcept;

// Runs `body` (returning OrtStatus*) and turns any exception it throws into an error status naming the node, so
// that nothing escapes into ONNX Runtime (an exception through its C API would terminate the process).
template <typename Body>
OrtStatus* guarded(const OrtApi& api, const std::string& nodeName, Body&& body) noexcept {
    try {
        return body();
    } catch (const Ort::Exception& e) {
        return nodeError(api, e.GetOrtErrorCode(), nodeName, e.what());
    } catch (const std::exception& e) {
        return nodeError(api, ORT_FAIL, nodeName, e.what());
    } catch (...) {
        return nodeError(api, ORT_FAIL, nodeName, "unknown error");
    }
}

}  // namespace saexport::ort
