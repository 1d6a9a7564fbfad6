// Online softmax over one key tile, on accumulators in the m16n8 C-fragment layout (mma.sync and wgmma
// alike): each thread holds rows lane/4 and lane/4 + 8 of its warp's 16, two columns per 8-key group.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace saexport {

// 2^x on the special-function unit (one MUFU.EX2); exp2f would add range handling on every score.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

struct SoftmaxState {
    float row_max[2] = {-FLT_MAX, -FLT_MAX};  // running max of scaled (base-2) scores
    float row_sum[2] = {0.f, 0.f};            // partial over this thread's columns; reduced in finish()

    // s: raw scores of one tile (keys key0 ...), turned into unnormalised probabilities in place. Returns, in
    // `correction`, the factor by which the output accumulators must be rescaled (see rescale()); kept
    // apart so that the Hopper path can exponentiate while the previous tile's P V is still in flight.
    template <int kKeyGroups>
    __device__ __forceinline__ void update(float (&s)[kKeyGroups][4], float (&correction)[2], float scale_log2,
                                           int key0, int seq_len, int lane) {
        if (key0 + kKeyGroups * 8 > seq_len) {  // keys past the sequence end: -inf (only the last tile)
#pragma unroll
            for (int j = 0; j < kKeyGroups; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (key0 + j * 8 + 2 * (lane % 4) + (e & 1) >= seq_len) s[j][e] = -INFINITY;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float tile_max = -FLT_MAX;
#pragma unroll
            for (int j = 0; j < kKeyGroups; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
            const float new_max = fmaxf(row_max[r], tile_max * scale_log2);
            correction[r] = fast_exp2(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= correction[r];
            // p = 2^(s * scale_log2 - max): one FFMA and one EX2 per score.
#pragma unroll
            for (int j = 0; j < kKeyGroups; ++j) {
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    s[j][e] = fast_exp2(fmaf(s[j][e], scale_log2, -new_max));
                    row_sum[r] += s[j][e];
                }
            }
        }
    }

    // 1 / row sum for rows r = 0, 1, after reducing the partial sums across the quad.
    __device__ __forceinline__ void finish(float (&inverse)[2]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float total = row_sum[r];
            total += __shfl_xor_sync(0xffffffff, total, 1);
            total += __shfl_xor_sync(0xffffffff, total, 2);
            inverse[r] = 1.f / total;
        }
    }
};

// Output accumulators brought to the new running max.
template <int kOutGroups>
__device__ __forceinline__ void rescale(float (&o)[kOutGroups][4], const float (&correction)[2]) {
#pragma unroll
    for (int n = 0; n < kOutGroups; ++n) {
        o[n][0] *= correction[0];
        o[n][1] *= correction[0];
        o[n][2] *= correction[1];
        o[n][3] *= correction[1];
    }
}

// Probabilities of keys 16kk .. 16kk+15 as the A operand of P V (the m16n8k16 A-fragment layout, which the
// C fragments of two adjacent 8-key groups already have: only the packing to 16-bit pairs is left).
template <typename Pack, int kKeyGroups>
__device__ __forceinline__ void probabilities_fragment(const float (&s)[kKeyGroups][4], int kk, uint32_t (&a)[4]) {
    a[0] = Pack::pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = Pack::pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = Pack::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = Pack::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

}  // namespace saexport
