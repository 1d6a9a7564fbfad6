// Block-sparse attention forward, Hopper path (sm_90a): wgmma for both products, head_dim 128, block 128.
//
// One CTA per (query block of 128, head, batch), three warpgroups:
// - a producer warpgroup streams the K and V tiles of the row's kept blocks (KeyTileWalker) into a ring of
//   shared-memory stages with cp.async, and hands each one over through a "full" mbarrier;
// - two consumer warpgroups of 64 query rows each compute S = Q K^T (wgmma, both operands from shared
//   memory), the online softmax, and O += P V (wgmma, P from registers, V transposed from shared memory),
//   then release the stage through an "empty" mbarrier. The P V of one tile is in flight while the scores
//   of the next are exponentiated.
// No block-wide barrier inside the loop: the consumers drift apart, so one's softmax runs under the other's
// matrix products. setmaxnreg moves registers from the producer to the consumers.
// Tiles use the 128-byte-swizzled layout wgmma reads: rows of 128 bytes in 1024-byte atoms of 8 rows,
// two 64-column panels per 128-column tile.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "bsa_params.h"
#include "epilogue.cuh"
#include "key_tile_walker.cuh"
#include "online_softmax.cuh"
#include "sm80_primitives.cuh"
#include "sm90_pipeline.cuh"
#include "sm90_wgmma.cuh"

namespace saexport::sm90 {

constexpr int kRows = 128;                   // query rows per CTA = keys per tile = the mask block
constexpr int kHeadDim = 128;
constexpr int kThreads = 384;                // producer warpgroup + two consumer warpgroups
constexpr int kStages = 3;
constexpr int kPanelBytes = kRows * 128;     // one 64-column panel of a 128-row tile: 16 KB
constexpr int kTileBytes = 2 * kPanelBytes;  // a 128 x 128 tile of 16-bit values: 32 KB
constexpr int kBarrierBytes = 64;
constexpr int kSmemBytes = (1 + 2 * kStages) * kTileBytes + kBarrierBytes;  // Q, K and V stages, barriers

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a swizzled tile (SWIZZLE_128B: chunk ^= row % 8).
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
    return (chunk >> 3) * kPanelBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// The producer warpgroup's copy of one 128-row tile: 16 chunks of 16 bytes per row, 16 per thread.
template <typename T>
__device__ __forceinline__ void load_tile(unsigned char* tile, const T* gmem, int tok0, int seq_len,
                                          long long token_stride, int thread) {
#pragma unroll
    for (int idx = thread; idx < kRows * 16; idx += 128) {
        const int row = idx / 16, chunk = idx % 16;
        const int tok = tok0 + row;
        const T* src = gmem + static_cast<long long>(tok < seq_len ? tok : seq_len - 1) * token_stride + chunk * 8;
        sm80::cp_async_16(tile + swizzled_offset(row, chunk), src, tok < seq_len ? 16 : 0);
    }
}

// Makes this thread's finished copies visible to wgmma (the async proxy), then signals the barrier.
__device__ __forceinline__ void publish(uint64_t* full) {
    cp_async_wait_all();
    fence_proxy_async();
    mbarrier_arrive(full);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) bsa_forward_kernel(BsaParams p) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using Pack = sm80::MmaTraits<T>;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* s_q = smem;
    unsigned char* s_k = smem + kTileBytes;                 // kStages tiles
    unsigned char* s_v = smem + (1 + kStages) * kTileBytes;  // kStages tiles
    uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + (1 + 2 * kStages) * kTileBytes);
    uint64_t* full = q_full + 1;         // kStages: the producer's copies of a stage have landed
    uint64_t* empty = full + kStages;    // kStages: both consumers are done with a stage

    const int u = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const long long token_stride = static_cast<long long>(p.heads) * kHeadDim;
    const long long base = static_cast<long long>(b) * p.seq_len * token_stride + h * kHeadDim;
    T* out = static_cast<T*>(p.out) + base;
    const int q0 = u * kRows;

    KeyTileWalker<1> walker(p.row_masks + (static_cast<long long>(h) * p.num_blocks + u) * p.mask_words,
                            p.mask_words, p.num_blocks);
    int tile = walker.next();
    if (tile < 0) {
        write_zero_rows<kRows, kHeadDim, kThreads>(out, q0, p.seq_len, token_stride);
        return;
    }
    if (threadIdx.x == 0) {
        mbarrier_init(q_full, 128);
        for (int s = 0; s < kStages; ++s) {
            mbarrier_init(&full[s], 128);
            mbarrier_init(&empty[s], 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {  // producer
        registers_decrease<40>();
        const T* k = static_cast<const T*>(p.k) + base;
        const T* v = static_cast<const T*>(p.v) + base;
        load_tile(s_q, static_cast<const T*>(p.q) + base, q0, p.seq_len, token_stride, threadIdx.x);
        publish(q_full);
        for (int i = 0; tile >= 0; ++i, tile = walker.next()) {
            const int stage = i % kStages;
            mbarrier_wait(&empty[stage], ((i / kStages) & 1) ^ 1);
            load_tile(s_k + stage * kTileBytes, k, tile * kRows, p.seq_len, token_stride, threadIdx.x);
            load_tile(s_v + stage * kTileBytes, v, tile * kRows, p.seq_len, token_stride, threadIdx.x);
            publish(&full[stage]);
        }
        return;
    }

    // consumers: the P V of tile i runs while the scores of tile i+1 are exponentiated.
    registers_increase<232>();
    const int consumer = threadIdx.x - 128;
    const int warpgroup = consumer / 128, warp = consumer / 32, lane = consumer % 32;
    const uint32_t q_addr = sm80::smem_addr(s_q) + warpgroup * 64 * 128;  // this warpgroup's 64 rows
    float acc_s[kRows / 8][4];  // written first by a wgmma with accumulate = 0
    float acc_o[kHeadDim / 8][4] = {};
    float(&s_flat)[64] = reinterpret_cast<float(&)[64]>(acc_s);
    float(&o_flat)[64] = reinterpret_cast<float(&)[64]>(acc_o);
    uint32_t p_frag[kRows / 16][4];
    float correction[2];
    SoftmaxState softmax;

    // S = Q K^T: 8 steps of 16 along head_dim; a step is 32 bytes into a swizzled row, 4 per panel.
    auto issue_scores = [&](int stage) {
        const uint32_t k_addr = sm80::smem_addr(s_k + stage * kTileBytes);
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
            const uint32_t offset = (kk / 4) * kPanelBytes + (kk % 4) * 32;
            wgmma_ss<T>(s_flat, smem_desc(q_addr + offset, 16, 1024), smem_desc(k_addr + offset, 16, 1024), kk);
        }
    };
    // O += P V: 8 steps of 16 keys (2 atoms of 8 rows); V is MN-major: its two 64-column panels are the
    // leading-dimension stride, 8-row atoms the stride dimension.
    auto issue_output = [&](int stage) {
        const uint32_t v_addr = sm80::smem_addr(s_v + stage * kTileBytes);
#pragma unroll
        for (int kk = 0; kk < kRows / 16; ++kk) {
            wgmma_rs_transb<T>(o_flat, p_frag[kk], smem_desc(v_addr + kk * 16 * 128, kPanelBytes, 1024));
        }
    };
    auto pack_probabilities = [&] {
#pragma unroll
        for (int kk = 0; kk < kRows / 16; ++kk) probabilities_fragment<Pack>(acc_s, kk, p_frag[kk]);
    };

    mbarrier_wait(q_full, 0);
    mbarrier_wait(&full[0], 0);
    wgmma_fence();
    issue_scores(0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s_flat);
    softmax.update(acc_s, correction, p.scale_log2, tile * kRows, p.seq_len, lane);
    pack_probabilities();
    for (int i = 0;; ++i) {
        const int stage = i % kStages;
        const int next = walker.next();
        if (next < 0) {  // the last tile: only its P V is left
            wgmma_fence();
            fence_operands(o_flat);
            issue_output(stage);
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(o_flat);
            break;
        }
        const int next_stage = (i + 1) % kStages;
        mbarrier_wait(&full[next_stage], ((i + 1) / kStages) & 1);
        wgmma_fence();  // the output accumulators and P were just written by ordinary instructions
        fence_operands(o_flat);
        issue_scores(next_stage);
        wgmma_commit();
        issue_output(stage);
        wgmma_commit();
        wgmma_wait<1>();  // the scores of tile i+1 (the older group) are ready; P V of tile i still runs
        fence_operands(s_flat);
        softmax.update(acc_s, correction, p.scale_log2, next * kRows, p.seq_len, lane);
        wgmma_wait<0>();
        fence_operands(o_flat);
        mbarrier_arrive(&empty[stage]);
        rescale(acc_o, correction);
        pack_probabilities();
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
