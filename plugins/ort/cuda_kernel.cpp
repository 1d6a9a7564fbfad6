// The CUDA execution provider's kernel: the kernel library's C ABI (plugins/capi/saexport_bsa.h) on ONNX Runtime's
// compute stream, with the workspace from ONNX Runtime's device allocator. Like the TensorRT plugin's enqueue, it
// allocates nothing else and never synchronises.
#include <climits>
#include <new>
#include <string>

#include "kernels.h"
#include "saexport_bsa.h"

namespace saexport::ort {

OrtStatus* CudaKernel::create(const OrtApi& api, const OrtKernelInfo* info, NodeConfig config, void** kernel) noexcept {
    *kernel = nullptr;
    return guarded(api, config.nodeName, [&]() -> OrtStatus* {
        if ((config.headDim != 64 && config.headDim != 128) || (config.blockSize != 64 && config.blockSize != 128)) {
            const std::string what = "the CUDA kernel needs head_dim and block_size of 64 or 128, got " +
                                     std::to_string(config.headDim) + " and " + std::to_string(config.blockSize);
            return nodeError(api, ORT_INVALID_ARGUMENT, config.nodeName, what.c_str());
        }
        OrtAllocator* allocator = nullptr;
        if (OrtStatus* status = api.KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator)) return status;
        *kernel = new (std::nothrow) CudaKernel(api, std::move(config), allocator);
        if (*kernel == nullptr) {
            api.ReleaseAllocator(allocator);
            return api.CreateStatus(ORT_FAIL, "BlockSparseAttention: out of memory");
        }
        return nullptr;
    });
}

CudaKernel::~CudaKernel() { mApi.ReleaseAllocator(mAllocator); }

OrtStatus* CudaKernel::ComputeV2(OrtKernelContext* context) noexcept {
    CallShape shape;
    if (OrtStatus* status = checkInputs(mApi, mConfig, context, shape)) return status;
    return guarded(mApi, mConfig.nodeName, [&]() -> OrtStatus* {
        int dtype = -1;
        if (shape.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) dtype = SAEXPORT_BSA_FP16;
        if (shape.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) dtype = SAEXPORT_BSA_BF16;
        if (dtype < 0) {
            return nodeError(mApi, ORT_INVALID_ARGUMENT, mConfig.nodeName, "the CUDA kernel runs fp16 and bf16");
        }
        if (shape.batch > INT_MAX || shape.seqLen > INT_MAX || shape.steps > INT_MAX) {
            return nodeError(mApi, ORT_INVALID_ARGUMENT, mConfig.nodeName, "an extent exceeds the kernel's int range");
        }

        Ort::KernelContext ctx(context);
        const int64_t dims[4] = {shape.batch, shape.seqLen, mConfig.numHeads, mConfig.headDim};
        Ort::UnownedValue out = ctx.GetOutput(0, dims, 4);
        if (shape.batch == 0 || shape.seqLen == 0) return nullptr;

        const int heads = static_cast<int>(mConfig.numHeads);
        const int seqLen = static_cast<int>(shape.seqLen);
        const int blockSize = static_cast<int>(mConfig.blockSize);
        // The scratch buffer is tied to ONNX Runtime's compute stream, so its memory is not handed to another
        // stream before this launch has finished with it; it is returned to the allocator right after the launch
        // (stream order keeps that safe, as for ONNX Runtime's own kernels).
        void* workspace = nullptr;
        if (OrtStatus* status = mApi.KernelContext_GetScratchBuffer(
                context, mAllocator->Info(mAllocator), saexport_bsa_workspace_size(heads, seqLen, blockSize),
                &workspace)) {
            return status;
        }
        // step_index is read on the device and clamped there into [0, steps), as the TensorRT plugin does.
        const int result = saexport_bsa_forward(
            ctx.GetInput(kQ).GetTensorRawData(), ctx.GetInput(kK).GetTensorRawData(),
            ctx.GetInput(kV).GetTensorRawData(), out.GetTensorMutableRawData(), dtype, static_cast<int>(shape.batch),
            seqLen, heads, static_cast<int>(mConfig.headDim), blockSize, mConfig.scale,
            ctx.GetInput(kTopology).GetTensorData<int32_t>(), ctx.GetInput(kBudgets).GetTensorData<int32_t>(),
            static_cast<int>(shape.steps), ctx.GetInput(kStepIndex).GetTensorData<int32_t>(), workspace,
            ctx.GetGPUComputeStream());
        if (OrtStatus* status = mApi.AllocatorFree(mAllocator, workspace)) mApi.ReleaseStatus(status);
        if (result != SAEXPORT_BSA_OK) {
            const std::string what = std::string("saexport_bsa_forward: ") + saexport_bsa_status_string(result);
            return nodeError(mApi, ORT_EP_FAIL, mConfig.nodeName, what.c_str());
        }
        return nullptr;
    });
}

}  // namespace saexport::ort
