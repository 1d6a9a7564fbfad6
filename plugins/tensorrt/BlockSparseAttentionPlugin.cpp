#include "BlockSparseAttentionPlugin.h"

#include <cstdio>
#include <cstring>

#include "saexport_bsa.h"

using namespace nvinfer1;

namespace saexport::trt {
namespace {

// Input positions (docs/ARCHITECTURE.md): q, k, v, topology, budgets, step_index; then the output.
enum : int32_t { kQ = 0, kK, kV, kTopology, kBudgets, kStepIndex, kNbInputs, kOut = kNbInputs };

void reportError(char const* what) noexcept { std::fprintf(stderr, "[saexport BlockSparseAttention] %s\n", what); }

int32_t kernelDtype(DataType type) noexcept {
    switch (type) {
        case DataType::kHALF: return SAEXPORT_BSA_FP16;
        case DataType::kBF16: return SAEXPORT_BSA_BF16;
        default: return -1;
    }
}

// ONNX integer attributes arrive as INT32 or INT64 fields depending on the parser version.
bool readInt(PluginField const& field, int32_t& value) noexcept {
    if (field.data == nullptr || field.length < 1) return false;
    if (field.type == PluginFieldType::kINT32) {
        value = *static_cast<int32_t const*>(field.data);
    } else if (field.type == PluginFieldType::kINT64) {
        value = static_cast<int32_t>(*static_cast<int64_t const*>(field.data));
    } else {
        return false;
    }
    return true;
}

bool sameOrUnknown(int64_t extent, int64_t expected) noexcept {
    return extent < 0 || expected < 0 || extent == expected;
}

// Shapes of the six inputs and the output (docs/ARCHITECTURE.md, "The ONNX node"); an extent of -1 (not known yet while
// building) passes. Returns what is wrong, or nullptr. A topology or budgets tensor smaller than the node's
// num_heads and L imply would have the kernel read past it.
char const* shapeError(Dims const (&dims)[kNbInputs + 1], BlockSparseAttentionConfig const& config) noexcept {
    Dims const& q = dims[kQ];
    if (q.nbDims != 4 || !sameOrUnknown(q.d[2], config.numHeads) || !sameOrUnknown(q.d[3], config.headDim)) {
        return "q must be [batch, L, num_heads, head_dim] with the node's num_heads and head_dim";
    }
    int32_t const sameAsQ[] = {kK, kV, kOut};
    for (int32_t const i : sameAsQ) {
        if (dims[i].nbDims != 4) return "k, v and the output must have q's shape";
        for (int32_t j = 0; j < 4; ++j) {
            if (!sameOrUnknown(dims[i].d[j], q.d[j])) return "k, v and the output must have q's shape";
        }
    }
    Dims const& topology = dims[kTopology];
    int64_t const blocks = q.d[1] >= 0 ? (q.d[1] + config.blockSize - 1) / config.blockSize : topology.d[1];
    if (topology.nbDims != 3 || !sameOrUnknown(topology.d[0], config.numHeads) ||
        !sameOrUnknown(topology.d[1], blocks) || !sameOrUnknown(topology.d[2], blocks >= 0 ? (blocks + 3) / 4 : -1)) {
        return "topology must be [num_heads, n, ceil(n/4)] with n = ceil(L / block_size)";
    }
    Dims const& budgets = dims[kBudgets];
    if (budgets.nbDims != 2 || budgets.d[0] == 0 || !sameOrUnknown(budgets.d[1], config.numHeads)) {
        return "budgets must be [steps, num_heads] with at least one step";
    }
    Dims const& step = dims[kStepIndex];
    if (step.nbDims != 1 || !sameOrUnknown(step.d[0], 1)) return "step_index must be [1]";
    return nullptr;
}

}  // namespace

BlockSparseAttentionPlugin::BlockSparseAttentionPlugin(BlockSparseAttentionConfig config, std::string nameSpace)
    : mConfig(config), mNamespace(std::move(nameSpace)), mKernelAbi(saexport_bsa_abi_version()) {}

IPluginCapability* BlockSparseAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* BlockSparseAttentionPlugin::clone() noexcept {
    auto* copy = new (std::nothrow) BlockSparseAttentionPlugin(mConfig, mNamespace);
    if (copy != nullptr) copy->mShape = mShape;
    return copy;
}

int32_t BlockSparseAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                       DataType const* inputTypes, int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs != kNbInputs) return -1;
    outputTypes[0] = inputTypes[kQ];
    return 0;
}

int32_t BlockSparseAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*,
                                                    int32_t, DimsExprs* outputs, int32_t nbOutputs,
                                                    IExprBuilder&) noexcept {
    if (nbOutputs != 1 || nbInputs != kNbInputs || inputs[kQ].nbDims != 4) return -1;
    outputs[0] = inputs[kQ];
    return 0;
}

bool BlockSparseAttentionPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                           int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos > kOut) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
        case kQ: return kernelDtype(desc.type) >= 0;
        case kK:
        case kV:
        case kOut: return desc.type == inOut[kQ].desc.type;
        default: return desc.type == DataType::kINT32;  // topology, budgets, step_index
    }
}

int32_t BlockSparseAttentionPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                                    DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
    // -1 means "not known yet" during building; the checks apply to what is known.
    Dims const dims[kNbInputs + 1] = {in[kQ].desc.dims,      in[kK].desc.dims,       in[kV].desc.dims,
                                      in[kTopology].desc.dims, in[kBudgets].desc.dims, in[kStepIndex].desc.dims,
                                      out[0].desc.dims};
    if (char const* error = shapeError(dims, mConfig)) {
        reportError(error);
        return -1;
    }
    return 0;
}

size_t BlockSparseAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t,
                                                    DynamicPluginTensorDesc const*, int32_t) const noexcept {
    // Row bitmasks for the longest sequence the profile allows.
    return saexport_bsa_workspace_size(mConfig.numHeads, static_cast<int>(inputs[kQ].max.d[1]), mConfig.blockSize);
}

int32_t BlockSparseAttentionPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs,
                                                  PluginTensorDesc const* out, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
    Dims const dims[kNbInputs + 1] = {in[kQ].dims,       in[kK].dims,         in[kV].dims, in[kTopology].dims,
                                      in[kBudgets].dims, in[kStepIndex].dims, out[0].dims};
    char const* error = shapeError(dims, mConfig);
    for (int32_t i = 0; error == nullptr && i <= kOut; ++i) {
        for (int32_t j = 0; j < dims[i].nbDims; ++j) {
            if (dims[i].d[j] <= 0) error = "every extent must be known and positive when the plugin runs";
        }
    }
    if (error != nullptr) {
        reportError(error);
        return -1;
    }
    mShape.batch = static_cast<int32_t>(in[kQ].dims.d[0]);
    mShape.seqLen = static_cast<int32_t>(in[kQ].dims.d[1]);
    mShape.steps = static_cast<int32_t>(in[kBudgets].dims.d[0]);
    mShape.dtype = kernelDtype(in[kQ].type);
    return mShape.dtype >= 0 ? 0 : -1;
}

int32_t BlockSparseAttentionPlugin::enqueue(PluginTensorDesc const*, PluginTensorDesc const*, void const* const* inputs,
                                            void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    // Allocates nothing and never synchronises: safe under CUDA graph capture.
    int const status = saexport_bsa_forward(
        inputs[kQ], inputs[kK], inputs[kV], outputs[0], mShape.dtype, mShape.batch, mShape.seqLen, mConfig.numHeads,
        mConfig.headDim, mConfig.blockSize, mConfig.scale, static_cast<int32_t const*>(inputs[kTopology]),
        static_cast<int32_t const*>(inputs[kBudgets]), mShape.steps, static_cast<int32_t const*>(inputs[kStepIndex]),
        workspace, stream);
    if (status != SAEXPORT_BSA_OK) {
        reportError(saexport_bsa_status_string(status));
        return -1;
    }
    return 0;
}

IPluginV3* BlockSparseAttentionPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* BlockSparseAttentionPlugin::getFieldsToSerialize() noexcept {
    mSerialized = {
        PluginField("num_heads", &mConfig.numHeads, PluginFieldType::kINT32, 1),
        PluginField("head_dim", &mConfig.headDim, PluginFieldType::kINT32, 1),
        PluginField("block_size", &mConfig.blockSize, PluginFieldType::kINT32, 1),
        PluginField("scale", &mConfig.scale, PluginFieldType::kFLOAT32, 1),
        // The kernel ABI the engine was built with: a runtime with another one refuses the engine.
        PluginField("kernel_abi", &mKernelAbi, PluginFieldType::kINT32, 1),
    };
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerialized.size());
    mSerializedCollection.fields = mSerialized.data();
    return &mSerializedCollection;
}

BlockSparseAttentionCreator::BlockSparseAttentionCreator() {
    mFields = {
        PluginField("num_heads", nullptr, PluginFieldType::kINT32, 1),
        PluginField("head_dim", nullptr, PluginFieldType::kINT32, 1),
        PluginField("block_size", nullptr, PluginFieldType::kINT32, 1),
        PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* BlockSparseAttentionCreator::createPlugin(char const*, PluginFieldCollection const* fc,
                                                     TensorRTPhase phase) noexcept {
    BlockSparseAttentionConfig config;
    int32_t kernelAbi = -1;
    // The ONNX parser passes only the attributes the node has (warning about the others), in getFieldNames' order.
    bool seen[4] = {false, false, false, false};
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr) continue;
        bool ok = true;
        if (std::strcmp(field.name, "num_heads") == 0) {
            ok = seen[0] = readInt(field, config.numHeads);
        } else if (std::strcmp(field.name, "head_dim") == 0) {
            ok = seen[1] = readInt(field, config.headDim);
        } else if (std::strcmp(field.name, "block_size") == 0) {
            ok = seen[2] = readInt(field, config.blockSize);
        } else if (std::strcmp(field.name, "scale") == 0) {
            ok = seen[3] = field.type == PluginFieldType::kFLOAT32 && field.data != nullptr && field.length >= 1;
            if (ok) config.scale = *static_cast<float const*>(field.data);
        } else if (std::strcmp(field.name, "kernel_abi") == 0) {
            ok = readInt(field, kernelAbi);
        }  // plugin_version / plugin_namespace are the parser's; other fields are ignored
        if (!ok) {
            reportError("a field has an unexpected type or no value");
            return nullptr;
        }
    }
    static char const* const kMissing[] = {
        "the node lacks the num_heads attribute", "the node lacks the head_dim attribute",
        "the node lacks the block_size attribute", "the node lacks the scale attribute"};
    for (int32_t i = 0; i < 4; ++i) {
        if (!seen[i]) {
            reportError(kMissing[i]);
            return nullptr;
        }
    }
    if (phase == TensorRTPhase::kRUNTIME && kernelAbi != saexport_bsa_abi_version()) {
        reportError("the engine was built with another kernel ABI version: rebuild the engine with this plugin");
        return nullptr;
    }
    if ((config.headDim != 64 && config.headDim != 128) || (config.blockSize != 64 && config.blockSize != 128) ||
        config.numHeads <= 0 || !(config.scale > 0.f)) {
        reportError("unsupported attributes: head_dim and block_size must be 64 or 128, num_heads and scale positive");
        return nullptr;
    }
    return new (std::nothrow) BlockSparseAttentionPlugin(config, mNamespace);
}

}  // namespace saexport::trt
