// Writing a query block's output: normalised accumulators, or zeros for a row with no kept block.
#pragma once

#include <cstdint>

namespace saexport {

// Rows of a query block whose mask row is empty (docs/ARCHITECTURE.md: zeros), written by kThreads threads,
// `thread` being this one's index among them.
template <int kBlockM, int kHeadDim, int kThreads, typename T>
__device__ void write_zero_rows(T* out, int q0, int seq_len, long long token_stride, int thread) {
    constexpr int kChunks = kHeadDim / 8;
    for (int idx = thread; idx < kBlockM * kChunks; idx += kThreads) {
        const int tok = q0 + idx / kChunks;
        if (tok < seq_len) {
            *reinterpret_cast<uint4*>(out + tok * token_stride + (idx % kChunks) * 8) = make_uint4(0, 0, 0, 0);
        }
    }
}

// One warp's 16 rows starting at token `row0`, from accumulators in the m16n8 C-fragment layout.
template <typename Pack, int kOutGroups, typename T>
__device__ __forceinline__ void store_rows(T* out, const float (&o)[kOutGroups][4], const float (&inverse)[2],
                                           int row0, int seq_len, long long token_stride, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int tok = row0 + lane / 4 + r * 8;
        if (tok >= seq_len) continue;
        T* row = out + tok * token_stride + 2 * (lane % 4);
#pragma unroll
        for (int n = 0; n < kOutGroups; ++n) {
            *reinterpret_cast<uint32_t*>(row + n * 8) = Pack::pack(o[n][2 * r] * inverse[r], o[n][2 * r + 1] * inverse[r]);
        }
    }
}

}  // namespace saexport
