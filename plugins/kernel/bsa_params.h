// Parameters shared by the block-sparse attention kernels (see docs/ARCHITECTURE.md, "Kernel").
#pragma once

#include <cstdint>

namespace saexport {

// One forward launch. q, k, v and out are contiguous [batch, seq_len, heads, head_dim].
struct BsaParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    int batch;
    int seq_len;
    int heads;
    int num_blocks;      // ceil(seq_len / block_size)
    int mask_words;      // 32-bit words per row bitmask: ceil(num_blocks / 32)
    float scale_log2;    // softmax scale * log2(e): the kernel works in base 2
    const uint32_t* row_masks;  // [heads, num_blocks, mask_words], built by build_row_masks
    uint32_t* tile_counter;     // the persistent grid's next-unit counter, zeroed by build_row_masks
};

// Row bitmasks of one step: bit v of row (h, u) is set when level(h, u, v) <= budgets[step, h]; also zeroes
// the tile counter of the forward launch that follows on the stream.
// step_index is read on the device (clamped to [0, steps)), so the launch is graph-capturable.
void build_row_masks(const int32_t* topology, const int32_t* budgets, int steps, const int32_t* step_index,
                     int heads, int num_blocks, int mask_words, uint32_t* row_masks, uint32_t* tile_counter,
                     cudaStream_t stream);

// The portable path (mma.sync, sm_80 and newer): head_dim 64/128, block 64/128.
template <typename T, int kHeadDim, int kBlockM>
void launch_bsa_forward(const BsaParams& params, cudaStream_t stream);

// The Hopper path (TMA + wgmma, sm_90a): head_dim 128, block 128. Returns false, launching nothing, when its
// tensor maps cannot be made (then the portable path serves the call).
template <typename T>
bool launch_bsa_forward_sm90(const BsaParams& params, cudaStream_t stream);

}  // namespace saexport
