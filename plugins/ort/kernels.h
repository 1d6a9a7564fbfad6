// The BlockSparseAttention kernels ONNX Runtime creates per node: the CPU one (float32, float16, bfloat16) and,
// where the library is built with CUDA, the CUDA one (float16, bfloat16) on the kernel library's C ABI.
#pragma once

#include "node_config.h"

namespace saexport::ort {

class CpuKernel {
public:
    // Called once per node when the session is created; `config` is already checked.
    static OrtStatus* create(const OrtApi& api, const OrtKernelInfo* info, NodeConfig config, void** kernel) noexcept;
    OrtStatus* ComputeV2(OrtKernelContext* context) noexcept;

private:
    CpuKernel(const OrtApi& api, NodeConfig config) : mApi(api), mConfig(std::move(config)) {}
    const OrtApi& mApi;
    NodeConfig mConfig;
};

#ifdef SAEXPORT_ORT_WITH_CUDA
class CudaKernel {
public:
    static OrtStatus* create(const OrtApi& api, const OrtKernelInfo* info, NodeConfig config, void** kernel) noexcept;
    OrtStatus* ComputeV2(OrtKernelContext* context) noexcept;
    ~CudaKernel();
    CudaKernel(const CudaKernel&) = delete;
    CudaKernel& operator=(const CudaKernel&) = delete;

private:
    CudaKernel(const OrtApi& api, NodeConfig config, OrtAllocator* allocator)
        : mApi(api), mConfig(std::move(config)), mAllocator(allocator) {}
    const OrtApi& mApi;
    NodeConfig mConfig;
    OrtAllocator* mAllocator;  // the execution provider's device allocator, for the workspace
};
#endif

}  // namespace saexport::ort
