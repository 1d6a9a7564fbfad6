// Block-sparse attention forward, sm_80+ path (mma.sync m16n8k16, cp.async double buffering).
//
// One CTA per (query block, head, batch): kBlockM query rows (= the mask block size), one warp per 16 rows.
// Q stays in registers; K and V tiles of kBlockN rows stream through two shared-memory stages, in the order
// the row's bitmask gives (KeyTileWalker); online softmax in fp32, base 2.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "bsa_params.h"
#include "key_tile_walker.cuh"
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

// Rows of a query block whose mask row is empty: zeros (DESIGN.md).
template <int kBlockM, int kHeadDim, int kThreads, typename T>
__device__ void write_zero_rows(T* out, int q0, int seq_len, long long token_stride) {
    constexpr int kChunks = kHeadDim / 8;
    for (int idx = threadIdx.x; idx < kBlockM * kChunks; idx += kThreads) {
        const int tok = q0 + idx / kChunks;
        if (tok < seq_len) {
            *reinterpret_cast<uint4*>(out + tok * token_stride + (idx % kChunks) * 8) = make_uint4(0, 0, 0, 0);
        }
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
        write_zero_rows<kBlockM, kHeadDim, kThreads>(out, q0, p.seq_len, token_stride);
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
    float row_max[2] = {-FLT_MAX, -FLT_MAX};  // of the scaled (base-2) scores; thread rows lane/4, lane/4 + 8
    float row_sum[2] = {0.f, 0.f};            // partial over this thread's columns, reduced in the epilogue
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

        // Keys past the sequence end get -inf (only the last tile has any).
        const int key0 = tile * kBlockN;
        if (key0 + kBlockN > p.seq_len) {
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (key0 + j * 8 + 2 * (lane % 4) + (e & 1) >= p.seq_len) acc_s[j][e] = -INFINITY;
                }
            }
        }

        // Online softmax in base 2 on raw scores: p = 2^(s * scale_log2 - max * scale_log2), one FFMA + EX2.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float tile_max = -FLT_MAX;
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) tile_max = fmaxf(tile_max, fmaxf(acc_s[j][2 * r], acc_s[j][2 * r + 1]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
            const float new_max = fmaxf(row_max[r], tile_max * p.scale_log2);
            const float correction = fast_exp2(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= correction;
#pragma unroll
            for (int n = 0; n < kHeadDim / 8; ++n) {
                acc_o[n][2 * r] *= correction;
                acc_o[n][2 * r + 1] *= correction;
            }
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    acc_s[j][e] = fast_exp2(fmaf(acc_s[j][e], p.scale_log2, -new_max));
                    row_sum[r] += acc_s[j][e];
                }
            }
        }

        // O += P V: the S accumulators become A fragments in registers.
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
            const uint32_t p_frag[4] = {
                Mma::pack(acc_s[2 * kk][0], acc_s[2 * kk][1]), Mma::pack(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                Mma::pack(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                Mma::pack(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
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

    // Epilogue: finish the row sums across the quad, normalise, store.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
        const float inv = 1.f / row_sum[r];
        const int tok = q0 + warp * 16 + lane / 4 + r * 8;
        if (tok < p.seq_len) {
            T* row = out + tok * token_stride + 2 * (lane % 4);
#pragma unroll
            for (int n = 0; n < kHeadDim / 8; ++n) {
                *reinterpret_cast<uint32_t*>(row + n * 8) =
                    Mma::pack(acc_o[n][2 * r] * inv, acc_o[n][2 * r + 1] * inv);
            }
        }
    }
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
