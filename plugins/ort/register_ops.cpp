// libsaexport_ort_ops.so's entry point: ONNX Runtime's SessionOptions.register_custom_ops_library(path) (or
// RegisterCustomOpsLibrary_V2 from C/C++) calls RegisterCustomOps, which adds the `ai.onnx.contrib` domain with
// BlockSparseAttention for the CPU execution provider (float32, float16, bfloat16) and, when built with CUDA, for
// the CUDA execution provider (float16, bfloat16). The library uses only the OrtApi it is handed: it does not link
// against libonnxruntime.
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "kernels.h"
#include "node_config.h"

namespace saexport::ort {
namespace {

// One OrtCustomOp per (execution provider, element type): ONNX Runtime picks the one whose provider runs the node
// and whose q/k/v type matches, and merges them into one schema.
template <typename Kernel>
struct BlockSparseAttentionOp : Ort::CustomOpBase<BlockSparseAttentionOp<Kernel>, Kernel, /*WithStatus=*/true> {
    BlockSparseAttentionOp(const char* provider, ONNXTensorElementDataType type) : mProvider(provider), mType(type) {}

    OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
        *kernel = nullptr;
        NodeConfig config;
        if (OrtStatus* status = readNodeConfig(api, info, config)) return status;
        return Kernel::create(api, info, std::move(config), kernel);
    }

    const char* GetName() const { return kOpName; }
    const char* GetExecutionProviderType() const { return mProvider; }
    size_t GetInputTypeCount() const { return kInputCount; }
    ONNXTensorElementDataType GetInputType(size_t index) const {
        return index <= kV ? mType : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return mType; }

private:
    const char* mProvider;
    ONNXTensorElementDataType mType;
};

std::vector<const OrtCustomOp*>& customOps() {
    static BlockSparseAttentionOp<CpuKernel> cpuFloat("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    static BlockSparseAttentionOp<CpuKernel> cpuHalf("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
    static BlockSparseAttentionOp<CpuKernel> cpuBHalf("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16);
#ifdef SAEXPORT_ORT_WITH_CUDA
    static BlockSparseAttentionOp<CudaKernel> cudaHalf("CUDAExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
    static BlockSparseAttentionOp<CudaKernel> cudaBHalf("CUDAExecutionProvider",
                                                        ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16);
    static std::vector<const OrtCustomOp*> ops = {&cpuFloat, &cpuHalf, &cpuBHalf, &cudaHalf, &cudaBHalf};
#else
    static std::vector<const OrtCustomOp*> ops = {&cpuFloat, &cpuHalf, &cpuBHalf};
#endif
    return ops;
}

OrtStatus* registerDomain(const OrtApi& api, OrtSessionOptions* options) {
    // A domain must outlive every session made from the options; they are few and small, so they are kept for the
    // life of the process rather than released from a static destructor that could run after ONNX Runtime's.
    static std::mutex mutex;
    static auto* domains = new std::vector<OrtCustomOpDomain*>();
    std::lock_guard<std::mutex> lock(mutex);
    Ort::InitApi(&api);  // the C++ wrappers' OrtApi (ORT_API_MANUAL_INIT: nothing is linked)

    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* status = api.CreateCustomOpDomain(kDomain, &domain)) return status;
    for (const OrtCustomOp* op : customOps()) {
        if (OrtStatus* status = api.CustomOpDomain_Add(domain, op)) {
            api.ReleaseCustomOpDomain(domain);
            return status;
        }
    }
    if (OrtStatus* status = api.AddCustomOpDomain(options, domain)) {
        api.ReleaseCustomOpDomain(domain);
        return status;
    }
    domains->push_back(domain);
    return nullptr;
}

}  // namespace
}  // namespace saexport::ort

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* apiBase) {
    if (apiBase == nullptr) return nullptr;  // nothing to report through: ONNX Runtime always passes it
    const OrtApi* api = apiBase->GetApi(ORT_API_VERSION);
    if (api == nullptr) {
        // An older runtime than the headers this library was built with: say so through the oldest API there is.
        const OrtApi* oldest = apiBase->GetApi(1);
        if (oldest == nullptr) return nullptr;
        try {
            const std::string message = std::string("libsaexport_ort_ops needs ONNX Runtime API version ") +
                                        std::to_string(ORT_API_VERSION) + " or later; this ONNX Runtime is " +
                                        apiBase->GetVersionString() + ": upgrade onnxruntime";
            return oldest->CreateStatus(ORT_FAIL, message.c_str());
        } catch (...) {
            return oldest->CreateStatus(ORT_FAIL, "libsaexport_ort_ops needs a newer ONNX Runtime");
        }
    }
    try {
        return saexport::ort::registerDomain(*api, options);
    } catch (const std::exception& e) {
        return api->CreateStatus(ORT_FAIL, e.what());
    } catch (...) {
        return api->CreateStatus(ORT_FAIL, "libsaexport_ort_ops: registration failed");
    }
}
