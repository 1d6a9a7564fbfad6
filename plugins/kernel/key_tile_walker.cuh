// The scheduler of one query block: walks the set bits of its row bitmask (find-next-bit) and yields the
// key tiles of each kept block, skipping every dropped block and every tile past the sequence end.
#pragma once

#include <cstdint>

namespace saexport {

template <int kTilesPerBlock>
struct KeyTileWalker {
    const uint32_t* words;
    int num_words;
    int num_tiles;  // ceil(seq_len / tile rows)
    int word = 0;
    uint32_t bits;
    int block = -1;
    int sub = 0;

    __device__ KeyTileWalker(const uint32_t* row_words, int row_num_words, int total_tiles)
        : words(row_words), num_words(row_num_words), num_tiles(total_tiles), bits(row_words[0]) {}

    // The next key tile index, or -1 when the row is done. Uniform across the CTA.
    __device__ __forceinline__ int next() {
        if (block >= 0 && ++sub < kTilesPerBlock) {
            const int tile = block * kTilesPerBlock + sub;
            if (tile < num_tiles) return tile;
        }
        while (bits == 0) {
            if (++word >= num_words) return -1;
            bits = words[word];
        }
        block = word * 32 + __ffs(bits) - 1;
        bits &= bits - 1;
        sub = 0;
        return block * kTilesPerBlock;
    }
};

}  // namespace saexport
