#include "node_config.h"

#include <cmath>
#include <vector>

namespace saexport::ort {
namespace {

// The message of `status`, released. For folding ORT's own wording into ours.
std::string takeMessage(const OrtApi& api, OrtStatus* status) {
    std::string message = api.GetErrorMessage(status);
    api.ReleaseStatus(status);
    return message;
}

OrtStatus* missing(const OrtApi& api, const std::string& nodeName, const char* kind, const char* name,
                   OrtStatus* cause) {
    const std::string what = std::string("the node lacks the ") + kind + " attribute " + name + " (" +
                             takeMessage(api, cause) + ")";
    return nodeError(api, ORT_INVALID_ARGUMENT, nodeName, what.c_str());
}

OrtStatus* readInt(const OrtApi& api, const OrtKernelInfo* info, const std::string& nodeName, const char* name,
                   int64_t& value) {
    if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, &value)) {
        return missing(api, nodeName, "INT", name, status);
    }
    return nullptr;
}

OrtStatus* readString(const OrtApi& api, const OrtKernelInfo* info, const std::string& nodeName, const char* name,
                      std::string& value) {
    size_t size = 0;  // first the size (with the terminating NUL), then the bytes
    if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
        return missing(api, nodeName, "STRING", name, status);
    }
    std::vector<char> bytes(size + 1, '\0');
    if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, bytes.data(), &size)) {
        return missing(api, nodeName, "STRING", name, status);
    }
    value.assign(bytes.data());
    return nullptr;
}

std::string shapeText(const std::vector<int64_t>& dims) {
    std::string text = "[";
    for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
    return text + "]";
}

const char* typeName(ONNXTensorElementDataType type) {
    switch (type) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
        default: return "another type";
    }
}

}  // namespace

OrtStatus* nodeError(const OrtApi& api, OrtErrorCode code, const std::string& nodeName, const char* what) noexcept {
    try {
        const std::string node =
            nodeName.empty() ? std::string(kOpName) : std::string(kOpName) + " node '" + nodeName + "'";
        const std::string message = node + ": " + what;
        return api.CreateStatus(code, message.c_str());
    } catch (...) {  // no memory for the message: a shorter one
        return api.CreateStatus(code, what);
    }
}

OrtStatus* readNodeConfig(const OrtApi& api, const OrtKernelInfo* info, NodeConfig& config) noexcept {
    return guarded(api, config.nodeName, [&]() -> OrtStatus* {
        // The node's name, for messages only: a node without one is still served.
        size_t size = 0;
        OrtStatus* status = api.KernelInfo_GetNodeName(info, nullptr, &size);
        if (status == nullptr && size > 0) {
            std::vector<char> name(size + 1, '\0');
            status = api.KernelInfo_GetNodeName(info, name.data(), &size);
            if (status == nullptr) config.nodeName = name.data();
        }
        if (status != nullptr) api.ReleaseStatus(status);
        const std::string& node = config.nodeName;

        std::string pluginVersion;
        std::string pluginNamespace;
        if (OrtStatus* s = readString(api, info, node, "plugin_version", pluginVersion)) return s;
        if (OrtStatus* s = readString(api, info, node, "plugin_namespace", pluginNamespace)) return s;
        if (OrtStatus* s = readInt(api, info, node, "num_heads", config.numHeads)) return s;
        if (OrtStatus* s = readInt(api, info, node, "head_dim", config.headDim)) return s;
        if (OrtStatus* s = readInt(api, info, node, "block_size", config.blockSize)) return s;
        if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, "scale", &config.scale)) {
            return missing(api, node, "FLOAT", "scale", status);
        }

        if (pluginVersion != kPluginVersion) {
            const std::string what = "plugin_version is '" + pluginVersion + "'; this library serves version " +
                                     kPluginVersion + ": export the graph again with this saexport";
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        if (!pluginNamespace.empty()) {  // the TensorRT plugin is registered in the empty namespace
            const std::string what = "plugin_namespace is '" + pluginNamespace + "'; it must be empty";
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        // Bounds keep every index of the kernels inside int64 and the row scratch small.
        if (config.numHeads <= 0 || config.numHeads > 4096 || config.headDim <= 0 || config.headDim > 1024 ||
            config.blockSize <= 0 || config.blockSize > 4096) {
            const std::string what = "num_heads (" + std::to_string(config.numHeads) + "), head_dim (" +
                                     std::to_string(config.headDim) + ") and block_size (" +
                                     std::to_string(config.blockSize) +
                                     ") must be positive (at most 4096, 1024 and 4096)";
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        if (!(config.scale > 0.f) || !std::isfinite(config.scale)) {
            const std::string what = "scale must be positive and finite, got " + std::to_string(config.scale);
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        return nullptr;
    });
}

OrtStatus* checkInputs(const OrtApi& api, const NodeConfig& config, OrtKernelContext* context,
                       CallShape& shape) noexcept {
    return guarded(api, config.nodeName, [&]() -> OrtStatus* {
        const std::string& node = config.nodeName;
        Ort::KernelContext ctx(context);
        if (ctx.GetInputCount() != kInputCount || ctx.GetOutputCount() != 1) {
            return nodeError(api, ORT_INVALID_ARGUMENT, node,
                             "the node must have six inputs (q, k, v, topology, budgets, step_index) and one output");
        }
        std::vector<int64_t> dims[kInputCount];
        ONNXTensorElementDataType types[kInputCount];
        static const char* const kNames[kInputCount] = {"q", "k", "v", "topology", "budgets", "step_index"};
        for (size_t i = 0; i < kInputCount; ++i) {
            Ort::ConstValue input = ctx.GetInput(i);
            if (input == nullptr || !input.IsTensor()) {
                const std::string what = std::string("input ") + kNames[i] + " must be a tensor";
                return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
            }
            Ort::TensorTypeAndShapeInfo info = input.GetTensorTypeAndShapeInfo();
            dims[i] = info.GetShape();
            types[i] = info.GetElementType();
        }

        const std::vector<int64_t>& q = dims[kQ];
        if (q.size() != 4 || q[2] != config.numHeads || q[3] != config.headDim) {
            const std::string what = "q must be [batch, L, num_heads=" + std::to_string(config.numHeads) +
                                     ", head_dim=" + std::to_string(config.headDim) + "], got " + shapeText(q);
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        for (size_t i : {kK, kV}) {
            if (dims[i] != q || types[i] != types[kQ]) {
                const std::string what = std::string(kNames[i]) + " must have q's shape " + shapeText(q) +
                                         " and type " + typeName(types[kQ]) + ", got " + shapeText(dims[i]) + " " +
                                         typeName(types[i]);
                return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
            }
        }
        if (types[kQ] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && types[kQ] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
            types[kQ] != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
            return nodeError(api, ORT_INVALID_ARGUMENT, node, "q, k and v must be float32, float16 or bfloat16");
        }
        for (size_t i : {kTopology, kBudgets, kStepIndex}) {
            if (types[i] != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
                const std::string what = std::string(kNames[i]) + " must be int32, got " + typeName(types[i]);
                return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
            }
        }

        shape.batch = q[0];
        shape.seqLen = q[1];
        if (shape.batch < 0 || shape.seqLen < 0) {
            return nodeError(api, ORT_INVALID_ARGUMENT, node, "q has a negative extent");
        }
        shape.blocks = (shape.seqLen + config.blockSize - 1) / config.blockSize;
        shape.words = (shape.blocks + 3) / 4;
        const std::vector<int64_t> topologyWant = {config.numHeads, shape.blocks, shape.words};
        if (dims[kTopology] != topologyWant) {
            const std::string what = "topology must be [num_heads, n, ceil(n/4)] = " + shapeText(topologyWant) +
                                     " (n = ceil(L / block_size)), got " + shapeText(dims[kTopology]);
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        const std::vector<int64_t>& budgets = dims[kBudgets];
        if (budgets.size() != 2 || budgets[0] < 1 || budgets[1] != config.numHeads) {
            const std::string what = "budgets must be [steps >= 1, num_heads=" + std::to_string(config.numHeads) +
                                     "], got " + shapeText(budgets);
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        if (dims[kStepIndex] != std::vector<int64_t>{1}) {
            const std::string what = "step_index must be [1], got " + shapeText(dims[kStepIndex]);
            return nodeError(api, ORT_INVALID_ARGUMENT, node, what.c_str());
        }
        shape.steps = budgets[0];
        shape.dtype = types[kQ];
        return nullptr;
    });
}

}  // namespace saexport::ort
