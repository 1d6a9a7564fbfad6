// Block-sparse attention forward, sm_80+ path (mma.sync m16n8k16, cp.async double buffering).
//
// One CTA per (query block, head, batch): kBlockM query rows (= the mask block size), one warp per 16 rows.
// Q stays in registers; K and V tiles of kBlockN rows stream through two shared-memory stages, in the order
// the row's bitmask gives (KeyTileWalker); online softmax in fp32, base 2.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "bsa_params.h"
#include "epilogue.cuh"
#include "key_tile_walker.cuh"
#include "online_softmax.cuh"
#include "sm80_primitives.cuh"

namespace saexport::sm80 {

constexpr int kBlockN = 64;

template <int kRows, int kHeadDim, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int tok0, int seq_len, long long token_stride) {
    constexpr int kChunks = kHeadDim / 8;
#pragma unroll
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
        const int row = idx / kChunks;
        const int chunk = idx % kChunks;
        const int tok = tok0 + row;
        const T* src = gmem + static_cast<long long>(tok < seq_len ? tok : seq_len - 1) * token_stride + chunk * 8;
        cp_async_16(smem + swizzled<kHeadDim>(row, chunk), src, tok < seq_len ? 16 : 0);
    }
}

template <typename T, int kHeadDim, int kBlockM>
__global__ void __launch_bounds__(kBlockM * 2) bsa_forward_kernel(BsaParams p) {
    constexpr int kThreads = kBlockM * 2;  // kBlockM / 16 warps
    constexpr int kTileElems = kBlockN * kHeadDim;
    using Mma = MmaTraits<T>;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* s_q = reinterpret_cast<T*>(smem_raw);
    T* s_k = s_q + kBlockM * kHeadDim;  // two stages
    T* s_v = s_k + 2 * kTileElems;      // two stages

    const int u = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long token_stride = static_cast<long long>(p.heads) * kHeadDim;
    const long long base = static_cast<long long>(b) * p.seq_len * token_stride + h * kHeadDim;
    const T* q = static_cast<const T*>(p.q) + base;
    const T* k = static_cast<const T*>(p.k) + base;
    const T* v = static_cast<const T*>(p.v) + base;
    T* out = static_cast<T*>(p.out) + base;
    const int q0 = u * kBlockM;

    KeyTileWalker<kBlockM / kBlockN> walker(
        p.row_masks + (static_cast<long long>(h) * p.num_blocks + u) * p.mask_words, p.mask_words,
        (p.seq_len + kBlockN - 1) / kBlockN);
    int tile = walker.next();
    if (tile < 0) {
        write_zero_rows<kBlockM, kHeadDim, kThreads>(out, q0, p.seq_len, token_stride, threadIdx.x);
        return;
    }

    load_tile<kBlockM, kHeadDim, kThreads>(s_q, q, q0, p.seq_len, token_stride);
    cp_async_commit();
    load_tile<kBlockN, kHeadDim, kThreads>(s_k, k, tile * kBlockN, p.seq_len, token_stride);
    load_tile<kBlockN, kHeadDim, kThreads>(s_v, v, tile * kBlockN, p.seq_len, token_stride);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // This warp's 16 query rows as A fragments, for the whole kernel.
    uint32_t q_frag[kHeadDim / 16][4];
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        ldmatrix_x4(q_frag[kk], s_q + swizzled<kHeadDim>(warp * 16 + lane % 16, kk * 2 + lane / 16));
    }

    float acc_o[kHeadDim / 8][4] = {};
    SoftmaxState softmax;
    int stage = 0;

    while (tile >= 0) {
        const int next = walker.next();
        if (next >= 0) {
            load_tile<kBlockN, kHeadDim, kThreads>(s_k + (stage ^ 1) * kTileElems, k, next * kBlockN, p.seq_len,
                                                   token_stride);
            load_tile<kBlockN, kHeadDim, kThreads>(s_v + (stage ^ 1) * kTileElems, v, next * kBlockN, p.seq_len,
                                                   token_stride);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* tile_k = s_k + stage * kTileElems;
        const T* tile_v = s_v + stage * kTileElems;

        // S = Q K^T for this warp's 16 rows x kBlockN keys.
        float acc_s[kBlockN / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
#pragma unroll
            for (int j = 0; j < kBlockN / 8; j += 2) {
                uint32_t frag[4];
                ldmatrix_x4(frag, tile_k + swizzled<kHeadDim>(j * 8 + lane % 8 + (lane / 16) * 8,
                                                              kk * 2 + (lane / 8) % 2));
                Mma::mma(acc_s[j], q_frag[kk], frag[0], frag[1]);
                Mma::mma(acc_s[j + 1], q_frag[kk], frag[2], frag[3]);
            }
        }

        float correction[2];
        softmax.update(acc_s, correction, p.scale_log2, tile * kBlockN, p.seq_len, lane);
        rescale(acc_o, correction);

        // O += P V: the S accumulators become A fragments in registers.
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
            uint32_t p_frag[4];
            probabilities_fragment<Mma>(acc_s, kk, p_frag);
#pragma unroll
            for (int n = 0; n < kHeadDim / 8; n += 2) {
                uint32_t frag[4];
                ldmatrix_x4_trans(frag, tile_v + swizzled<kHeadDim>(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8,
                                                                    n + lane / 16));
                Mma::mma(acc_o[n], p_frag, frag[0], frag[1]);
                Mma::mma(acc_o[n + 1], p_frag, frag[2], frag[3]);
            }
        }
        __syncthreads();  // the stage just read is refilled by the next iteration
        stage ^= 1;
        tile = next;
    }

    float inverse[2];
    softmax.finish(inverse);
    store_rows<Mma>(out, acc_o, inverse, q0 + warp * 16, p.seq_len, token_stride, lane);
}

}  // namespace saexport::sm80

namespace saexport {

template <typename T, int kHeadDim, int kBlockM>
void launch_bsa_forward(const BsaParams& params, cudaStream_t stream) {
    constexpr int kSmem = (kBlockM + 4 * sm80::kBlockN) * kHeadDim * sizeof(T);
    auto kernel = sm80::bsa_forward_kernel<T, kHeadDim, kBlockM>;
    // Idempotent and cheap; needed once per kernel for more than 48 KB of shared memory.
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    const dim3 grid(params.num_blocks, params.heads, params.batch);
    kernel<<<grid, kBlockM * 2, kSmem, stream>>>(params);
}

}  // namespace saexport
