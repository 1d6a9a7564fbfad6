// The C ABI over the kernel core: validation, the mask pass, dispatch on dtype / head_dim / block size.
#include "saexport_bsa.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "../kernel/bsa_params.h"

namespace {

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The Hopper path serves Wan's case (head_dim 128, block 128) on compute capability 9.0.
// SAEXPORT_BSA_PATH=sm80 forces the portable path (for comparisons).
bool use_hopper_path(int head_dim, int block_size) {
    static const bool forced_portable = [] {
        const char* path = std::getenv("SAEXPORT_BSA_PATH");
        return path != nullptr && std::strcmp(path, "sm80") == 0;
    }();
    if (forced_portable || head_dim != 128 || block_size != 128) return false;
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return major == 9 && minor == 0;
}

template <typename T, int kHeadDim>
void dispatch_block(const saexport::BsaParams& p, int block_size, cudaStream_t stream) {
    if (block_size == 128) {
        saexport::launch_bsa_forward<T, kHeadDim, 128>(p, stream);
    } else {
        saexport::launch_bsa_forward<T, kHeadDim, 64>(p, stream);
    }
}

template <typename T>
void dispatch_head_dim(const saexport::BsaParams& p, int head_dim, int block_size, cudaStream_t stream) {
    if (use_hopper_path(head_dim, block_size) && saexport::launch_bsa_forward_sm90<T>(p, stream)) {
        return;
    }
    if (head_dim == 128) {
        dispatch_block<T, 128>(p, block_size, stream);
    } else {
        dispatch_block<T, 64>(p, block_size, stream);
    }
}

}  // namespace

extern "C" {

int saexport_bsa_abi_version(void) { return SAEXPORT_BSA_ABI_VERSION; }

const char* saexport_bsa_status_string(int status) {
    switch (status) {
        case SAEXPORT_BSA_OK: return "ok";
        case SAEXPORT_BSA_UNSUPPORTED_HEAD_DIM: return "head_dim must be 64 or 128";
        case SAEXPORT_BSA_UNSUPPORTED_BLOCK: return "block_size must be 64 or 128";
        case SAEXPORT_BSA_UNSUPPORTED_DTYPE: return "dtype must be fp16 or bf16";
        case SAEXPORT_BSA_BAD_SHAPE: return "batch, seq_len, heads and steps must be positive";
        case SAEXPORT_BSA_CUDA_ERROR: return "a CUDA launch failed";
        default: return "unknown status";
    }
}

size_t saexport_bsa_workspace_size(int heads, int seq_len, int block_size) {
    if (heads <= 0 || seq_len <= 0 || block_size <= 0) return 0;
    const int n = ceil_div(seq_len, block_size);
    return (static_cast<size_t>(heads) * n * ceil_div(n, 32) + 1) * sizeof(uint32_t);  // row masks, tile counter
}

int saexport_bsa_forward(const void* q, const void* k, const void* v, void* out, int dtype, int batch, int seq_len,
                         int heads, int head_dim, int block_size, float scale, const int32_t* topology,
                         const int32_t* budgets, int steps, const int32_t* step_index, void* workspace,
                         void* stream_handle) {
    if (head_dim != 64 && head_dim != 128) return SAEXPORT_BSA_UNSUPPORTED_HEAD_DIM;
    if (block_size != 64 && block_size != 128) return SAEXPORT_BSA_UNSUPPORTED_BLOCK;
    if (dtype != SAEXPORT_BSA_FP16 && dtype != SAEXPORT_BSA_BF16) return SAEXPORT_BSA_UNSUPPORTED_DTYPE;
    if (batch <= 0 || seq_len <= 0 || heads <= 0 || steps <= 0) return SAEXPORT_BSA_BAD_SHAPE;
    auto stream = static_cast<cudaStream_t>(stream_handle);

    saexport::BsaParams p{};
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.batch = batch;
    p.seq_len = seq_len;
    p.heads = heads;
    p.num_blocks = ceil_div(seq_len, block_size);
    p.mask_words = ceil_div(p.num_blocks, 32);
    p.scale_log2 = scale * 1.4426950408889634f;
    auto* row_masks = static_cast<uint32_t*>(workspace);
    p.row_masks = row_masks;
    p.tile_counter = row_masks + static_cast<size_t>(heads) * p.num_blocks * p.mask_words;

    saexport::build_row_masks(topology, budgets, steps, step_index, heads, p.num_blocks, p.mask_words, row_masks,
                              p.tile_counter, stream);
    if (dtype == SAEXPORT_BSA_BF16) {
        dispatch_head_dim<__nv_bfloat16>(p, head_dim, block_size, stream);
    } else {
        dispatch_head_dim<__half>(p, head_dim, block_size, stream);
    }
    return cudaPeekAtLastError() == cudaSuccess ? SAEXPORT_BSA_OK : SAEXPORT_BSA_CUDA_ERROR;
}

}  // extern "C"
