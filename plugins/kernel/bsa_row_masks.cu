// Topology levels + one step's budgets -> per-row bitmasks in the workspace.
#include <cuda_runtime.h>

#include "bsa_params.h"

namespace saexport {
namespace {

// One thread per 32-bit mask word: (head, query block, word).
__global__ void build_row_masks_kernel(const int32_t* __restrict__ topology, const int32_t* __restrict__ budgets,
                                       int steps, const int32_t* __restrict__ step_index, int heads,
                                       int num_blocks, int mask_words, uint32_t* __restrict__ row_masks,
                                       uint32_t* __restrict__ tile_counter) {
    const long long total = static_cast<long long>(heads) * num_blocks * mask_words;
    const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx == 0) *tile_counter = 0;
    if (idx >= total) return;
    const int word = static_cast<int>(idx % mask_words);
    const long long row = idx / mask_words;  // h * num_blocks + u
    const int h = static_cast<int>(row / num_blocks);
    // The plugin cannot raise: an out-of-range step is clamped (docs/ARCHITECTURE.md).
    const int step = min(max(step_index[0], 0), steps - 1);
    const int budget = budgets[step * heads + h];
    const int packed_words = (num_blocks + 3) / 4;
    const int32_t* levels = topology + row * packed_words;
    uint32_t bits = 0;
    const int first = word * 32;
    const int last = min(first + 32, num_blocks);
    for (int v = first; v < last; ++v) {
        const int level = (levels[v >> 2] >> ((v & 3) * 8)) & 0xFF;
        bits |= static_cast<uint32_t>(level <= budget) << (v - first);
    }
    row_masks[idx] = bits;
}

}  // namespace

void build_row_masks(const int32_t* topology, const int32_t* budgets, int steps, const int32_t* step_index,
                     int heads, int num_blocks, int mask_words, uint32_t* row_masks, uint32_t* tile_counter,
                     cudaStream_t stream) {
    const long long total = static_cast<long long>(heads) * num_blocks * mask_words;
    const int threads = 256;
    const int blocks = static_cast<int>((total + threads - 1) / threads);
    build_row_masks_kernel<<<blocks, threads, 0, stream>>>(topology, budgets, steps, step_index, heads, num_blocks,
                                                           mask_words, row_masks, tile_counter);
}

}  // namespace saexport
