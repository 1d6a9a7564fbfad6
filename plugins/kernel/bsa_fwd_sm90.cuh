// Block-sparse attention forward, Hopper path (sm_90a): wgmma for both products, head_dim 128, block 128.
//
// One CTA per (query block of 128, head, batch): two warpgroups of 64 query rows each. Q, and the K and V
// tiles of 128 keys, sit in shared memory in the 128-byte-swizzled layout wgmma reads (two 64-column
// panels per tile); K/V tiles stream through two stages with cp.async, the next tile loading while the
// current one is computed. S = Q K^T reads both operands from shared memory; O += P V takes P from
// registers, where the softmax left it, and V transposed from shared memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "bsa_params.h"
#include "epilogue.cuh"
#include "key_tile_walker.cuh"
#include "online_softmax.cuh"
#include "sm80_primitives.cuh"
#include "sm90_wgmma.cuh"

namespace saexport::sm90 {

constexpr int kRows = 128;                   // query rows per CTA = keys per tile = the mask block
constexpr int kHeadDim = 128;
constexpr int kThreads = 256;                // two warpgroups
constexpr int kPanelBytes = kRows * 128;     // one 64-column panel of a 128-row tile: 16 KB
constexpr int kTileBytes = 2 * kPanelBytes;  // a 128 x 128 tile of 16-bit values: 32 KB
constexpr int kSmemBytes = 5 * kTileBytes;   // Q, two K stages, two V stages: 160 KB

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a swizzled tile: the TMA / wgmma
// SWIZZLE_128B pattern, rows of 128 bytes in 1024-byte atoms of 8 rows, chunk ^= row % 8.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
    return (chunk >> 3) * kPanelBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

template <typename T>
__device__ __forceinline__ void load_tile(unsigned char* tile, const T* gmem, int tok0, int seq_len,
                                          long long token_stride) {
#pragma unroll
    for (int idx = threadIdx.x; idx < kRows * 16; idx += kThreads) {
        const int row = idx / 16, chunk = idx % 16;
        const int tok = tok0 + row;
        const T* src = gmem + static_cast<long long>(tok < seq_len ? tok : seq_len - 1) * token_stride + chunk * 8;
        sm80::cp_async_16(tile + swizzled_offset(row, chunk), src, tok < seq_len ? 16 : 0);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) bsa_forward_kernel(BsaParams p) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Pack = sm80::MmaTraits<T>;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* s_q = smem;
    unsigned char* s_k = smem + kTileBytes;      // two stages
    unsigned char* s_v = smem + 3 * kTileBytes;  // two stages

    const int u = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long token_stride = static_cast<long long>(p.heads) * kHeadDim;
    const long long base = static_cast<long long>(b) * p.seq_len * token_stride + h * kHeadDim;
    const T* q = static_cast<const T*>(p.q) + base;
    const T* k = static_cast<const T*>(p.k) + base;
    const T* v = static_cast<const T*>(p.v) + base;
    T* out = static_cast<T*>(p.out) + base;
    const int q0 = u * kRows;

    KeyTileWalker<1> walker(p.row_masks + (static_cast<long long>(h) * p.num_blocks + u) * p.mask_words,
                            p.mask_words, p.num_blocks);
    int tile = walker.next();
    if (tile < 0) {
        write_zero_rows<kRows, kHeadDim, kThreads>(out, q0, p.seq_len, token_stride);
        return;
    }
    load_tile(s_q, q, q0, p.seq_len, token_stride);
    load_tile(s_k, k, tile * kRows, p.seq_len, token_stride);
    load_tile(s_v, v, tile * kRows, p.seq_len, token_stride);
    sm80::cp_async_commit();

    const uint32_t q_addr = sm80::smem_addr(s_q) + warpgroup * 64 * 128;  // this warpgroup's 64 rows
    float acc_o[kHeadDim / 8][4] = {};
    SoftmaxState softmax;
    int stage = 0;
    while (tile >= 0) {
        sm80::cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // the tile has landed for everyone, and the other stage is free
        const int next = walker.next();
        if (next >= 0) {
            load_tile(s_k + (stage ^ 1) * kTileBytes, k, next * kRows, p.seq_len, token_stride);
            load_tile(s_v + (stage ^ 1) * kTileBytes, v, next * kRows, p.seq_len, token_stride);
        }
        sm80::cp_async_commit();
        const uint32_t k_addr = sm80::smem_addr(s_k + stage * kTileBytes);
        const uint32_t v_addr = sm80::smem_addr(s_v + stage * kTileBytes);

        // S = Q K^T: 8 steps of 16 along head_dim; a step is 32 bytes into a swizzled row, 4 per panel.
        float acc_s[kRows / 8][4] = {};
        float(&s_flat)[64] = reinterpret_cast<float(&)[64]>(acc_s);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
            const uint32_t offset = (kk / 4) * kPanelBytes + (kk % 4) * 32;
            wgmma_ss<T>(s_flat, smem_desc(q_addr + offset, 16, 1024), smem_desc(k_addr + offset, 16, 1024));
        }
        wgmma_commit();
        wgmma_wait_all();

        softmax.update(acc_s, acc_o, p.scale_log2, tile * kRows, p.seq_len, lane);

        // O += P V: 8 steps of 16 keys (2 atoms of 8 rows); V is MN-major: its two 64-column panels are
        // the leading-dimension stride, 8-row atoms the stride dimension.
        // All of P is packed before the first wgmma: registers written between wgmmas force a fence each.
        uint32_t p_frag[kRows / 16][4];
#pragma unroll
        for (int kk = 0; kk < kRows / 16; ++kk) probabilities_fragment<Pack>(acc_s, kk, p_frag[kk]);
        float(&o_flat)[64] = reinterpret_cast<float(&)[64]>(acc_o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kRows / 16; ++kk) {
            wgmma_rs_transb<T>(o_flat, p_frag[kk], smem_desc(v_addr + kk * 16 * 128, kPanelBytes, 1024));
        }
        wgmma_commit();
        wgmma_wait_all();
        stage ^= 1;
        tile = next;
    }

    float inverse[2];
    softmax.finish(inverse);
    store_rows<Pack>(out, acc_o, inverse, q0 + warp * 16, p.seq_len, token_stride, lane);
#else
    __trap();  // built for another architecture: the dispatcher only launches this on sm_90
#endif
}

}  // namespace saexport::sm90

namespace saexport {

template <typename T>
void launch_bsa_forward_sm90(const BsaParams& params, cudaStream_t stream) {
    auto kernel = sm90::bsa_forward_kernel<T>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sm90::kSmemBytes);
    const dim3 grid(params.num_blocks, params.heads, params.batch);
    kernel<<<grid, sm90::kThreads, sm90::kSmemBytes, stream>>>(params);
}

}  // namespace saexport
