#include <algorithm>
#include <atomic>
#include <new>

#include "block_sparse_attention_cpu.h"
#include "kernels.h"

namespace saexport::ort {
namespace {

struct ParallelJob {
    const CpuAttentionProblem* problem;
    std::atomic<bool>* failed;
};

// ONNX Runtime's thread pool calls these once per task index, on its worker threads.
void runPackTask(void* data, size_t task) {
    packKeysValues(*static_cast<const ParallelJob*>(data)->problem, task);
}

void runAttendTask(void* data, size_t task) {
    const ParallelJob& job = *static_cast<const ParallelJob*>(data);
    if (!attendQueryBlock(*job.problem, task)) job.failed->store(true, std::memory_order_relaxed);
}

}  // namespace

OrtStatus* CpuKernel::create(const OrtApi& api, const OrtKernelInfo*, NodeConfig config, void** kernel) noexcept {
    *kernel = new (std::nothrow) CpuKernel(api, std::move(config));
    return *kernel != nullptr ? nullptr : api.CreateStatus(ORT_FAIL, "BlockSparseAttention: out of memory");
}

OrtStatus* CpuKernel::ComputeV2(OrtKernelContext* context) noexcept {
    CallShape shape;
    if (OrtStatus* status = checkInputs(mApi, mConfig, context, shape)) return status;
    return guarded(mApi, mConfig.nodeName, [&]() -> OrtStatus* {
        Ort::KernelContext ctx(context);
        const int64_t dims[4] = {shape.batch, shape.seqLen, mConfig.numHeads, mConfig.headDim};
        Ort::UnownedValue out = ctx.GetOutput(0, dims, 4);
        if (shape.batch == 0 || shape.seqLen == 0) return nullptr;

        // A step outside [0, steps) is clamped into it, as the TensorRT plugin does (it cannot raise).
        const int32_t requested = *ctx.GetInput(kStepIndex).GetTensorData<int32_t>();
        const int64_t step = std::clamp<int64_t>(requested, 0, shape.steps - 1);

        CpuAttentionProblem problem;
        problem.dtype = shape.dtype;
        problem.q = ctx.GetInput(kQ).GetTensorRawData();
        problem.k = ctx.GetInput(kK).GetTensorRawData();
        problem.v = ctx.GetInput(kV).GetTensorRawData();
        problem.out = out.GetTensorMutableRawData();
        problem.batch = shape.batch;
        problem.seqLen = shape.seqLen;
        problem.heads = mConfig.numHeads;
        problem.headDim = mConfig.headDim;
        problem.blockSize = mConfig.blockSize;
        problem.blocks = shape.blocks;
        problem.words = shape.words;
        problem.scale = mConfig.scale;
        problem.topology = ctx.GetInput(kTopology).GetTensorData<int32_t>();
        problem.budgets = ctx.GetInput(kBudgets).GetTensorData<int32_t>() + step * mConfig.numHeads;

        if (!reservePackedKeysValues(problem)) {
            return nodeError(mApi, ORT_FAIL, mConfig.nodeName, "out of memory for the packed keys and values");
        }
        std::atomic<bool> failed{false};
        ParallelJob job{&problem, &failed};
        ctx.ParallelFor(&runPackTask, packTaskCount(problem), 0, &job);
        ctx.ParallelFor(&runAttendTask, attendTaskCount(problem), 0, &job);
        if (failed.load()) {
            return nodeError(mApi, ORT_FAIL, mConfig.nodeName, "out of memory for the attention's scratch");
        }
        return nullptr;
    });
}

}  // namespace saexport::ort
