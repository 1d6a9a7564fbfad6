// The persistent grid's tile scheduler: which query block (a "unit": batch, head, query block) a CTA serves next.
// Units are numbered batch-major, then head, then query block, so the CTAs in flight at any time work on the
// neighbouring query blocks of one or two heads and share those heads' K and V in L2. Each CTA starts at its
// own index and then takes the next free unit from a counter in the workspace (zeroed by the row-mask pass
// of the same launch), so a CTA that drew short rows takes more of them: uneven masks balance themselves.
#pragma once

#include <cstdint>

#include "bsa_params.h"

namespace saexport {

struct Unit {
    int batch, head, block;
};

struct TileScheduler {
    int units;  // batch * heads * num_blocks

    __device__ explicit TileScheduler(const BsaParams& p) : units(p.batch * p.heads * p.num_blocks) {}

    // The k-th unit this CTA serves, or -1 when none is left. Called by one thread (the producer).
    __device__ __forceinline__ int fetch(int k, uint32_t* counter) const {
        const int w = k == 0 ? static_cast<int>(blockIdx.x) : static_cast<int>(gridDim.x + atomicAdd(counter, 1u));
        return w < units ? w : -1;
    }

    __device__ __forceinline__ static Unit decode(int w, const BsaParams& p) {
        const int head_row = w / p.num_blocks;
        return {head_row / p.heads, head_row % p.heads, w % p.num_blocks};
    }
};

}  // namespace saexport
