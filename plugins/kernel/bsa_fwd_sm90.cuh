// Block-sparse attention forward, Hopper path (sm_90a): wgmma for both products, head_dim 128, block 128.
//
// A persistent grid: one CTA per SM, each serving query blocks ("units": batch, head, query block) one after
// another as the tile scheduler hands them out (tile_scheduler.cuh). Three warpgroups:
// - a producer warpgroup (one thread of it) fetches the next unit, publishes it in shared memory with its Q
//   tile, and streams the K and V tiles of the unit's kept blocks (KeyTileWalker) into a ring of
//   shared-memory stages with TMA: two bulk tensor copies of a 64-column panel per tile, completing on the
//   stage's "full" mbarrier (rows past the sequence end arrive as zeros). The ring runs on across units, so
//   the next unit's Q and first K/V tiles load while the consumers finish the last one and write it out;
// - two consumer warpgroups of 64 query rows each compute S = Q K^T (wgmma, both operands from shared
//   memory), the online softmax, and O += P V (wgmma, P from registers, V transposed from shared memory),
//   then release the stage through an "empty" mbarrier, and Q through "q_empty" once its last product is
//   issued and done. The P V of one tile is in flight while the scores of the next are exponentiated.
// The producer alone reads the row masks (global memory): it publishes each unit (with an empty-row flag) and
// each stage's key tile (with a last-tile flag) in shared memory, so no mask load stalls the consumers.
// No block-wide barrier after set-up: the consumers drift apart, so one's softmax runs under the other's
// matrix products. setmaxnreg moves registers from the producer to the consumers.
// Tiles use the 128-byte-swizzled layout wgmma reads: rows of 128 bytes in 1024-byte atoms of 8 rows,
// two 64-column panels per 128-column tile.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <type_traits>

#include "bsa_params.h"
#include "epilogue.cuh"
#include "key_tile_walker.cuh"
#include "online_softmax.cuh"
#include "sm80_primitives.cuh"
#include "sm90_pipeline.cuh"
#include "sm90_wgmma.cuh"
#include "tile_scheduler.cuh"

namespace saexport::sm90 {

constexpr int kRows = 128;                   // query rows per unit = keys per tile = the mask block
constexpr int kHeadDim = 128;
constexpr int kThreads = 384;                // producer warpgroup + two consumer warpgroups
constexpr int kConsumerThreads = 256;
constexpr int kStages = 3;
constexpr int kPanelBytes = kRows * 128;     // one 64-column panel of a 128-row tile: 16 KB
constexpr int kTileBytes = 2 * kPanelBytes;  // a 128 x 128 tile of 16-bit values: 32 KB
constexpr int kControlBytes = 128;           // mbarriers, the published unit and the stages' key tiles
constexpr int kSmemBytes = (1 + 2 * kStages) * kTileBytes + kControlBytes;  // Q, K and V stages, control
static_assert((2 + 2 * kStages) * sizeof(uint64_t) + (1 + kStages) * sizeof(int) <= kControlBytes,
              "the control block's mbarriers and published words must fit kControlBytes");

// Shared memory: the Q tile, the K and V rings, then the control block.
struct SharedState {
    unsigned char* q;
    unsigned char* k;        // kStages tiles
    unsigned char* v;        // kStages tiles
    uint64_t* q_full;        // the unit is published (and its Q tile landed, unless its row is empty)
    uint64_t* q_empty;       // both consumers are done with the unit's Q tile and its published index
    uint64_t* full;          // kStages: the producer's copies of a stage have landed
    uint64_t* empty;         // kStages: both consumers are done with a stage
    volatile int* unit;      // the published unit index (| kEmptyRow), -1 when the CTA is done
    volatile int* key_tile;  // kStages: the key tile in a stage (| kLastTile for its unit's last)

    __device__ explicit SharedState(unsigned char* smem)
        : q(smem), k(smem + kTileBytes), v(smem + (1 + kStages) * kTileBytes),
          q_full(reinterpret_cast<uint64_t*>(smem + (1 + 2 * kStages) * kTileBytes)), q_empty(q_full + 1),
          full(q_full + 2), empty(full + kStages), unit(reinterpret_cast<volatile int*>(empty + kStages)),
          key_tile(unit + 1) {}
};

// Flags in the published words.
constexpr int kEmptyRow = 1 << 30;  // in `unit`: the unit's row keeps no block
constexpr int kLastTile = 1 << 30;  // in `key_tile`: the unit's last kept tile

__device__ __forceinline__ KeyTileWalker<1> row_walker(const BsaParams& p, const Unit& unit) {
    return KeyTileWalker<1>(p.row_masks + (static_cast<long long>(unit.head) * p.num_blocks + unit.block) * p.mask_words,
                            p.mask_words, p.num_blocks);
}

// A 128-row tile = two boxes of 64 columns (128 bytes, the swizzle span) x 128 tokens, one per panel.
__device__ __forceinline__ void load_tile(unsigned char* tile, const CUtensorMap* map, int h, int tok0, int b,
                                          uint64_t* bar) {
    tma_load_4d(tile, map, 0, h, tok0, b, bar);
    tma_load_4d(tile + kPanelBytes, map, 64, h, tok0, b, bar);
}

// The producer thread: every unit of this CTA, its Q tile and its K/V tiles, in order.
__device__ __forceinline__ void produce(const BsaParams& p, const SharedState& s, const CUtensorMap* map_q,
                                       const CUtensorMap* map_k, const CUtensorMap* map_v) {
    const TileScheduler scheduler(p);
    int it = 0;  // K/V tiles issued by this CTA, across units: the ring's position
    for (int k = 0;; ++k) {
        const int w = scheduler.fetch(k, p.tile_counter);
        mbarrier_wait(s.q_empty, (k & 1) ^ 1);  // the consumers have read the last unit and its Q tile
        if (w < 0) {
            *s.unit = -1;
            mbarrier_arrive(s.q_full);
            return;
        }
        const Unit unit = TileScheduler::decode(w, p);
        KeyTileWalker<1> walker = row_walker(p, unit);
        int tile = walker.next();
        if (tile < 0) {  // nothing to load: the consumers write zeros
            *s.unit = w | kEmptyRow;
            mbarrier_arrive(s.q_full);
            continue;
        }
        *s.unit = w;
        mbarrier_arrive_expect_tx(s.q_full, kTileBytes);
        load_tile(s.q, map_q, unit.head, unit.block * kRows, unit.batch, s.q_full);
        for (; tile >= 0; ++it) {
            const int next = walker.next();
            const int stage = it % kStages;
            mbarrier_wait(&s.empty[stage], ((it / kStages) & 1) ^ 1);
            s.key_tile[stage] = next < 0 ? tile | kLastTile : tile;
            mbarrier_arrive_expect_tx(&s.full[stage], 2 * kTileBytes);
            load_tile(s.k + stage * kTileBytes, map_k, unit.head, tile * kRows, unit.batch, &s.full[stage]);
            load_tile(s.v + stage * kTileBytes, map_v, unit.head, tile * kRows, unit.batch, &s.full[stage]);
            tile = next;
        }
    }
}

// A consumer warpgroup: 64 query rows of every unit the producer publishes.
template <typename T>
__device__ __forceinline__ void consume(const BsaParams& p, const SharedState& s, int consumer) {
    using Pack = sm80::MmaTraits<T>;
    const int warpgroup = consumer / 128, warp = consumer / 32, lane = consumer % 32;
    const uint32_t q_addr = sm80::smem_addr(s.q) + warpgroup * 64 * 128;  // this warpgroup's 64 rows
    const long long token_stride = static_cast<long long>(p.heads) * kHeadDim;
    float acc_s[kRows / 8][4];  // written first by a wgmma with accumulate = 0
    float acc_o[kHeadDim / 8][4];
    float(&s_flat)[64] = reinterpret_cast<float(&)[64]>(acc_s);
    float(&o_flat)[64] = reinterpret_cast<float(&)[64]>(acc_o);
    uint32_t p_frag[kRows / 16][4];
    float correction[2];

    // S = Q K^T: 8 steps of 16 along head_dim; a step is 32 bytes into a swizzled row, 4 per panel.
    auto issue_scores = [&](int stage) {
        const uint32_t k_addr = sm80::smem_addr(s.k + stage * kTileBytes);
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
            const uint32_t offset = (kk / 4) * kPanelBytes + (kk % 4) * 32;
            wgmma_ss<T>(s_flat, smem_desc(q_addr + offset, 16, 1024), smem_desc(k_addr + offset, 16, 1024), kk);
        }
    };
    // O += P V: 8 steps of 16 keys (2 atoms of 8 rows); V is MN-major: its two 64-column panels are the
    // leading-dimension stride, 8-row atoms the stride dimension.
    auto issue_output = [&](int stage) {
        const uint32_t v_addr = sm80::smem_addr(s.v + stage * kTileBytes);
#pragma unroll
        for (int kk = 0; kk < kRows / 16; ++kk) {
            wgmma_rs_transb<T>(o_flat, p_frag[kk], smem_desc(v_addr + kk * 16 * 128, kPanelBytes, 1024));
        }
    };
    auto pack_probabilities = [&] {
#pragma unroll
        for (int kk = 0; kk < kRows / 16; ++kk) probabilities_fragment<Pack>(acc_s, kk, p_frag[kk]);
    };

    int it = 0;      // the ring's position, as the producer's
    int tile_word;   // the key tile in stage `it`, with kLastTile on its unit's last
    auto wait_stage = [&](int i) {  // tile i's K and V have landed: its key tile word
        mbarrier_wait(&s.full[i % kStages], (i / kStages) & 1);
        return s.key_tile[i % kStages];
    };
    for (int k = 0;; ++k) {
        mbarrier_wait(s.q_full, k & 1);
        const int w = *s.unit;
        if (w < 0) return;
        const Unit unit = TileScheduler::decode(w & ~kEmptyRow, p);
        T* out = static_cast<T*>(p.out) + static_cast<long long>(unit.batch) * p.seq_len * token_stride +
                 unit.head * kHeadDim;
        const int q0 = unit.block * kRows;
        if (w & kEmptyRow) {
            mbarrier_arrive(s.q_empty);
            write_zero_rows<kRows, kHeadDim, kConsumerThreads>(out, q0, p.seq_len, token_stride, consumer);
            continue;
        }

        SoftmaxState softmax;
#pragma unroll
        for (int i = 0; i < 64; ++i) o_flat[i] = 0.f;
        tile_word = wait_stage(it);
        wgmma_fence();
        issue_scores(it % kStages);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(s_flat);
        softmax.update(acc_s, correction, p.scale_log2, (tile_word & ~kLastTile) * kRows, p.seq_len, lane);
        pack_probabilities();
        for (;; ++it) {
            const int stage = it % kStages;
            if (tile_word & kLastTile) {  // only its P V is left, and Q is free for the next unit
                mbarrier_arrive(s.q_empty);
                wgmma_fence();
                fence_operands(o_flat);
                issue_output(stage);
                wgmma_commit();
                wgmma_wait<0>();
                fence_operands(o_flat);
                mbarrier_arrive(&s.empty[stage]);
                ++it;
                break;
            }
            const int next_stage = (it + 1) % kStages;
            tile_word = wait_stage(it + 1);
            wgmma_fence();  // the output accumulators and P were just written by ordinary instructions
            fence_operands(o_flat);
            issue_scores(next_stage);
            wgmma_commit();
            issue_output(stage);
            wgmma_commit();
            wgmma_wait<1>();  // the scores of tile i+1 (the older group) are ready; P V of tile i still runs
            fence_operands(s_flat);
            softmax.update(acc_s, correction, p.scale_log2, (tile_word & ~kLastTile) * kRows, p.seq_len, lane);
            wgmma_wait<0>();
            fence_operands(o_flat);
            mbarrier_arrive(&s.empty[stage]);
            rescale(acc_o, correction);
            pack_probabilities();
        }
        float inverse[2];
        softmax.finish(inverse);
        store_rows<Pack>(out, acc_o, inverse, q0 + warp * 16, p.seq_len, token_stride, lane);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    bsa_forward_kernel(BsaParams p, const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                       const __grid_constant__ CUtensorMap map_v) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem[];
    const SharedState s(smem);
    if (threadIdx.x == 0) {
        mbarrier_init(s.q_full, 1);  // the producer's arrival (with the Q tile's bytes when it loads one)
        mbarrier_init(s.q_empty, kConsumerThreads);
        for (int i = 0; i < kStages; ++i) {
            mbarrier_init(&s.full[i], 1);  // the producer's arrive.expect_tx; the copies' bytes complete it
            mbarrier_init(&s.empty[i], kConsumerThreads);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {  // producer: one thread issues every copy
        registers_decrease<40>();
        if (threadIdx.x == 0) produce(p, s, &map_q, &map_k, &map_v);
        return;
    }
    registers_increase<232>();
    consume<T>(p, s, threadIdx.x - 128);
#else
    __trap();  // built for another architecture: the dispatcher only launches this on sm_90
#endif
}

}  // namespace saexport::sm90

namespace saexport {

namespace sm90 {

// cuTensorMapEncodeTiled through the runtime's driver entry point: no link against libcuda.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult status;
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status);
        return status == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
                                                      : nullptr;
    }();
    return encode;
}

// [batch, L, heads, 128] viewed as 4-D (innermost first: dim, head, token, batch); boxes of 64 x 1 x 128 x 1.
template <typename T>
bool make_tensor_map(CUtensorMap* map, const void* data, const BsaParams& p) {
    auto encode = tensor_map_encoder();
    if (encode == nullptr) return false;
    const cuuint64_t dims[4] = {kHeadDim, static_cast<cuuint64_t>(p.heads), static_cast<cuuint64_t>(p.seq_len),
                                static_cast<cuuint64_t>(p.batch)};
    const cuuint64_t strides[3] = {kHeadDim * sizeof(T), static_cast<cuuint64_t>(p.heads) * kHeadDim * sizeof(T),
                                   static_cast<cuuint64_t>(p.seq_len) * p.heads * kHeadDim * sizeof(T)};
    const cuuint32_t box[4] = {64, 1, kRows, 1};
    const cuuint32_t element_strides[4] = {1, 1, 1, 1};
    const auto type = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return encode(map, type, 4, const_cast<void*>(data), dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sm90

// Returns false when the tensor maps cannot be made (no driver entry point, misaligned inputs).
template <typename T>
bool launch_bsa_forward_sm90(const BsaParams& params, cudaStream_t stream) {
    CUtensorMap map_q, map_k, map_v;
    if (!sm90::make_tensor_map<T>(&map_q, params.q, params) || !sm90::make_tensor_map<T>(&map_k, params.k, params) ||
        !sm90::make_tensor_map<T>(&map_v, params.v, params)) {
        return false;
    }
    auto kernel = sm90::bsa_forward_kernel<T>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sm90::kSmemBytes);
    // Persistent: one CTA per SM (its shared memory allows no second), never more CTAs than units.
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const long long units = static_cast<long long>(params.batch) * params.heads * params.num_blocks;
    const int grid = static_cast<int>(units < sms ? units : sms);
    kernel<<<grid, sm90::kThreads, sm90::kSmemBytes, stream>>>(params, map_q, map_k, map_v);
    return true;
}

}  // namespace saexport
