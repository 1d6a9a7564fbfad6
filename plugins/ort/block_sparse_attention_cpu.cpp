#include "block_sparse_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "onnxruntime_cxx_api.h"  // Ort::Float16_t, Ort::BFloat16_t: round-to-nearest-even conversions

namespace saexport::ort {
namespace {

static_assert(sizeof(Ort::Float16_t) == 2 && sizeof(Ort::BFloat16_t) == 2, "16-bit storage types");

inline float toFloat(float x) { return x; }
inline float toFloat(Ort::Float16_t x) { return x.ToFloat(); }
inline float toFloat(Ort::BFloat16_t x) { return x.ToFloat(); }

template <typename T>
inline T fromFloat(float x) {
    return T(x);
}

// The hot loops are inlined into one entry point per instruction set (below), each compiled for its target.
#if defined(__GNUC__)
#define SAEXPORT_INLINE inline __attribute__((always_inline))
#else
#define SAEXPORT_INLINE inline
#endif

// Layout: a query block's rows lie along the vector lanes ("transposed": [feature, query]), so the scores of a key
// against kLanes queries, their softmax statistics and the output accumulators are all whole vectors, and keys and
// values enter as broadcast scalars from their rows. The query lanes are padded with zeros to whole vectors.
constexpr int64_t kLanes = 16;

inline int64_t roundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// kLanes floats as one value (GCC/Clang vector extension): one zmm, two ymm or four xmm as the target allows.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

SAEXPORT_INLINE void loadLanes(Lanes& to, const float* from) { std::memcpy(&to, from, sizeof(to)); }
SAEXPORT_INLINE void storeLanes(float* to, const Lanes& x) { std::memcpy(to, &x, sizeof(x)); }

// Float storage whose data starts on a 64-byte boundary, so that vector loads take whole cache lines.
class AlignedFloats {
public:
    // `count` floats (their values unspecified), valid until the next call.
    float* get(size_t count) {
        mStorage.resize(count + 16);
        const uintptr_t address = reinterpret_cast<uintptr_t>(mStorage.data());
        return mStorage.data() + (64 - address % 64) % 64 / sizeof(float);
    }

private:
    std::vector<float> mStorage;
};

// Per-thread working memory, grown on demand and reused across tasks and calls.
struct Scratch {
    AlignedFloats queryT;      // [headDim, lanesP]: the block's queries times `scale`, transposed
    AlignedFloats probT;       // [block, lanesP]: scores, then exp(score - max), transposed
    AlignedFloats accT;        // [headDim, lanesP]: the running sum of exp(score - max) times values
    AlignedFloats rowMax;      // [lanesP]: running maximum score per query
    AlignedFloats rowSum;      // [lanesP]: running sum of exp(score - max) per query
    AlignedFloats correction;  // [lanesP]: exp(old max - new max) per query
    AlignedFloats newMaxima;   // [lanesP]: the maximum score per query with one more key block
    std::vector<int64_t> kept;  // the key blocks the query block attends to
};

// Level of block pair (h, u, v): byte v % 4 (byte 0 = lowest bits) of word [h, u, v / 4]; shifts on the unsigned
// word make this independent of the machine's byte order.
inline int32_t levelOf(const int32_t* row, int64_t v) {
    const uint32_t word = static_cast<uint32_t>(row[v >> 2]);
    return static_cast<int32_t>((word >> (8 * (v & 3))) & 0xFFu);
}

// exp(x) for x <= 0 (a score minus its query's maximum), branch-free so that it vectorises: x = n ln2 + r with
// |r| <= ln2/2, exp(r) by its Taylor series to r^7 (relative error < 1e-8 there), 2^n through the exponent bits.
// Below -87 the result is clamped to about 1e-38 instead of 0: nothing against a sum >= 1.
SAEXPORT_INLINE float expNonPositive(float x) {
    x = std::max(x, -87.f);
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;  // ln2 in two parts
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// A key block's keys and values: float32 rows `stride` apart.
struct KeyBlock {
    const float* keys;
    const float* values;
    int64_t stride;
    int64_t count;  // keys in the block (the last block may be partial)
};

// The two products of attention, with the queries on the lanes, as one kernel: out[t] (Count rows, LP apart, of
// QV query vectors) = start + sum over d < depth of broadcast[t * tStride + d * dStride] * vectors[d * LP].
// Scores: vectors = the queries (d: features), broadcast = the keys (t: keys). Values: vectors = the probabilities
// (d: keys), broadcast = the values (t: features). `start` is zero, or out's old value times scale (per query).
// A tile keeps Count x QV accumulators in registers and loads QV vectors and Count scalars per step of d. With
// `maxOut`, it also folds its results into a running maximum per query (the scores' maxima, without another pass).
template <int64_t QV, int64_t Count>
SAEXPORT_INLINE void productTile(const float* __restrict vectors, const float* __restrict broadcast, int64_t tStride,
                                 int64_t dStride, int64_t depth, int64_t LP, const float* __restrict scale,
                                 float* __restrict out, float* __restrict maxOut) {
    Lanes acc[Count][QV];
    for (int64_t v = 0; v < QV; ++v) {
        Lanes factor = {};
        if (scale != nullptr) loadLanes(factor, scale + v * kLanes);
        for (int64_t t = 0; t < Count; ++t) {
            acc[t][v] = Lanes{};
            if (scale != nullptr) {
                loadLanes(acc[t][v], out + t * LP + v * kLanes);
                acc[t][v] *= factor;
            }
        }
    }
    for (int64_t d = 0; d < depth; ++d) {
        Lanes x[QV];
        for (int64_t v = 0; v < QV; ++v) loadLanes(x[v], vectors + d * LP + v * kLanes);
        for (int64_t t = 0; t < Count; ++t) {
            const float b = broadcast[t * tStride + d * dStride];
            for (int64_t v = 0; v < QV; ++v) acc[t][v] += b * x[v];
        }
    }
    for (int64_t t = 0; t < Count; ++t) {
        for (int64_t v = 0; v < QV; ++v) storeLanes(out + t * LP + v * kLanes, acc[t][v]);
    }
    if (maxOut != nullptr) {
        for (int64_t v = 0; v < QV; ++v) {
            Lanes running;
            loadLanes(running, maxOut + v * kLanes);
            for (int64_t t = 0; t < Count; ++t) running = running > acc[t][v] ? running : acc[t][v];
            storeLanes(maxOut + v * kLanes, running);
        }
    }
}

// productTile over `count` rows and V query vectors from v0: whole tiles, then the remainder one row at a time (so
// no key or feature past the data is ever read).
template <int64_t V, int64_t Count>
SAEXPORT_INLINE void productRows(int64_t v0, int64_t count, const float* vectors, const float* broadcast,
                                 int64_t tStride, int64_t dStride, int64_t depth, int64_t LP, const float* scale,
                                 float* out, float* maxOut) {
    vectors += v0 * kLanes;
    out += v0 * kLanes;
    if (scale != nullptr) scale += v0 * kLanes;
    if (maxOut != nullptr) maxOut += v0 * kLanes;
    int64_t t0 = 0;
    for (; t0 + Count <= count; t0 += Count) {
        productTile<V, Count>(vectors, broadcast + t0 * tStride, tStride, dStride, depth, LP, scale, out + t0 * LP,
                              maxOut);
    }
    for (; t0 < count; ++t0) {
        productTile<V, 1>(vectors, broadcast + t0 * tStride, tStride, dStride, depth, LP, scale, out + t0 * LP,
                          maxOut);
    }
}

// ... and over `vectorCount` query vectors: QV at a time, then the remainder one at a time.
template <int64_t QV, int64_t Count>
SAEXPORT_INLINE void product(int64_t vectorCount, int64_t count, const float* vectors, const float* broadcast,
                             int64_t tStride, int64_t dStride, int64_t depth, int64_t LP, const float* scale,
                             float* out, float* maxOut) {
    int64_t v0 = 0;
    for (; v0 + QV <= vectorCount; v0 += QV) {
        productRows<QV, Count>(v0, count, vectors, broadcast, tStride, dStride, depth, LP, scale, out, maxOut);
    }
    for (; v0 < vectorCount; ++v0) {
        productRows<1, Count>(v0, count, vectors, broadcast, tStride, dStride, depth, LP, scale, out, maxOut);
    }
}

// One kept key block into the running softmax of the block's queries (FlashAttention's recurrence, in float32).
// `correction` and `newMaxima` are scratch of lanesP floats.
template <int64_t QV, int64_t Count>
SAEXPORT_INLINE void addKeyBlock(const float* __restrict queryT, const KeyBlock& block, int64_t headDim,
                                 int64_t lanesP, float* __restrict probT, float* __restrict accT,
                                 float* __restrict rowMax, float* __restrict rowSum, float* __restrict correction,
                                 float* __restrict newMaxima) {
    const int64_t LP = lanesP;
    const int64_t vectorCount = LP / kLanes;
    // probT[j] = scores of key j against every query; newMaxima = the maxima of the old ones and these.
    std::memcpy(newMaxima, rowMax, LP * sizeof(float));
    product<QV, Count>(vectorCount, block.count, queryT, block.keys, block.stride, 1, headDim, LP, nullptr, probT,
                       newMaxima);

    // Per query: exp of the scores against the new maximum, the old sum rescaled to it (and, below, the old
    // accumulators).
    for (int64_t i0 = 0; i0 < LP; i0 += kLanes) {
        Lanes oldMax, newMax, sum, rescale;
        loadLanes(oldMax, rowMax + i0);
        loadLanes(newMax, newMaxima + i0);
        // ~0 at the first kept block, where the sums are 0 anyway.
        for (int64_t l = 0; l < kLanes; ++l) rescale[l] = expNonPositive(oldMax[l] - newMax[l]);
        loadLanes(sum, rowSum + i0);
        sum *= rescale;
        for (int64_t j = 0; j < block.count; ++j) {
            float* row = probT + j * LP + i0;
            for (int64_t l = 0; l < kLanes; ++l) row[l] = expNonPositive(row[l] - newMax[l]);
            Lanes p;
            loadLanes(p, row);
            sum += p;
        }
        storeLanes(rowMax + i0, newMax);
        storeLanes(rowSum + i0, sum);
        storeLanes(correction + i0, rescale);
    }

    // accT[d] = accT[d] * correction + sum over keys j of values[j][d] * probT[j].
    product<QV, Count>(vectorCount, headDim, probT, block.values, 1, block.stride, block.count, LP, correction, accT,
                       nullptr);
}

// One entry point per instruction set, with the register tile that suits its registers (AVX-512, 32 zmm: 4 keys x 4
// query vectors; AVX2, 16 ymm: 4 x 1 of two ymm each; the baseline: 2 x 1), chosen once from what the CPU supports.
using AddKeyBlockFn = void (*)(const float*, const KeyBlock&, int64_t, int64_t, float*, float*, float*, float*,
                               float*, float*);

void addKeyBlockBaseline(const float* queryT, const KeyBlock& block, int64_t headDim, int64_t lanesP, float* probT,
                         float* accT, float* rowMax, float* rowSum, float* correction, float* newMaxima) {
    addKeyBlock<1, 2>(queryT, block, headDim, lanesP, probT, accT, rowMax, rowSum, correction, newMaxima);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64-v3"))) void addKeyBlockAvx2(const float* queryT, const KeyBlock& block,
                                                               int64_t headDim, int64_t lanesP, float* probT,
                                                               float* accT, float* rowMax, float* rowSum,
                                                               float* correction, float* newMaxima) {
    addKeyBlock<1, 4>(queryT, block, headDim, lanesP, probT, accT, rowMax, rowSum, correction, newMaxima);
}

__attribute__((target("arch=x86-64-v4"))) void addKeyBlockAvx512(const float* queryT, const KeyBlock& block,
                                                                 int64_t headDim, int64_t lanesP, float* probT,
                                                                 float* accT, float* rowMax, float* rowSum,
                                                                 float* correction, float* newMaxima) {
    addKeyBlock<4, 4>(queryT, block, headDim, lanesP, probT, accT, rowMax, rowSum, correction, newMaxima);
}
#endif

// SAEXPORT_ORT_CPU_KERNEL=baseline|avx2 picks a lesser one (for tests of every path on one machine).
AddKeyBlockFn selectAddKeyBlock() {
    const char* requested = std::getenv("SAEXPORT_ORT_CPU_KERNEL");
    const std::string limit = requested != nullptr ? requested : "";
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (limit.empty() && __builtin_cpu_supports("x86-64-v4")) return &addKeyBlockAvx512;
    if (limit != "baseline" && __builtin_cpu_supports("x86-64-v3")) return &addKeyBlockAvx2;
#endif
    return &addKeyBlockBaseline;
}

template <typename T>
void attend(const CpuAttentionProblem& p, size_t task, Scratch& s) {
    static const AddKeyBlockFn addKeyBlockFor = selectAddKeyBlock();
    const int64_t u = static_cast<int64_t>(task) % p.blocks;
    const int64_t batchHead = static_cast<int64_t>(task) / p.blocks;
    const int64_t h = batchHead % p.heads;
    const int64_t b = batchHead / p.heads;
    const int64_t B = p.blockSize;
    const int64_t D = p.headDim;
    const int64_t tokenStride = p.heads * D;              // between consecutive tokens of one head
    const int64_t origin = b * p.seqLen * tokenStride + h * D;  // token 0 of (b, h)
    const int64_t firstRow = u * B;
    const int64_t rows = std::min(B, p.seqLen - firstRow);

    const T* q = static_cast<const T*>(p.q) + origin;
    T* out = static_cast<T*>(p.out) + origin;

    // The row mask: the key blocks whose level is within this head's budget at this step.
    const int32_t budget = p.budgets[h];
    const int32_t* topologyRow = p.topology + (h * p.blocks + u) * p.words;
    s.kept.clear();
    for (int64_t vb = 0; vb < p.blocks; ++vb) {
        if (levelOf(topologyRow, vb) <= budget) s.kept.push_back(vb);
    }
    if (s.kept.empty()) {  // nothing kept: the rows are zeros
        for (int64_t i = 0; i < rows; ++i) {
            T* o = out + (firstRow + i) * tokenStride;
            for (int64_t d = 0; d < D; ++d) o[d] = fromFloat<T>(0.f);
        }
        return;
    }

    const int64_t LP = roundUp(rows, kLanes);
    // Queries past the block's end are zero lanes: computed alongside, never written out.
    float* queryT = s.queryT.get(D * LP);
    float* accT = s.accT.get(D * LP);
    float* probT = s.probT.get(B * LP);
    float* rowMax = s.rowMax.get(LP);
    float* rowSum = s.rowSum.get(LP);
    float* correction = s.correction.get(LP);
    float* newMaxima = s.newMaxima.get(LP);
    std::fill(queryT, queryT + D * LP, 0.f);
    std::fill(accT, accT + D * LP, 0.f);
    std::fill(rowMax, rowMax + LP, -std::numeric_limits<float>::infinity());
    std::fill(rowSum, rowSum + LP, 0.f);
    for (int64_t i = 0; i < rows; ++i) {
        const T* src = q + (firstRow + i) * tokenStride;
        for (int64_t d = 0; d < D; ++d) queryT[d * LP + i] = toFloat(src[d]) * p.scale;
    }

    const int64_t headOffset = (b * p.heads + h) * p.seqLen * D;  // of (b, h) in the packed keys and values
    for (const int64_t vb : s.kept) {
        const int64_t firstKey = vb * B;
        const KeyBlock block{p.packedKeys + headOffset + firstKey * D, p.packedValues + headOffset + firstKey * D, D,
                             std::min(B, p.seqLen - firstKey)};
        addKeyBlockFor(queryT, block, D, LP, probT, accT, rowMax, rowSum, correction, newMaxima);
    }

    for (int64_t i = 0; i < rows; ++i) {
        const float inverse = 1.f / rowSum[i];
        T* o = out + (firstRow + i) * tokenStride;
        for (int64_t d = 0; d < D; ++d) o[d] = fromFloat<T>(accT[d * LP + i] * inverse);
    }
}

template <typename T>
void pack(const CpuAttentionProblem& p, size_t task) {
    const int64_t h = static_cast<int64_t>(task) % p.heads;
    const int64_t b = static_cast<int64_t>(task) / p.heads;
    const int64_t D = p.headDim;
    const int64_t tokenStride = p.heads * D;
    const int64_t origin = b * p.seqLen * tokenStride + h * D;
    const T* k = static_cast<const T*>(p.k) + origin;
    const T* v = static_cast<const T*>(p.v) + origin;
    float* keys = p.packedKeys + static_cast<int64_t>(task) * p.seqLen * D;
    float* values = p.packedValues + static_cast<int64_t>(task) * p.seqLen * D;
    for (int64_t j = 0; j < p.seqLen; ++j) {
        if constexpr (std::is_same_v<T, float>) {
            std::memcpy(keys + j * D, k + j * tokenStride, D * sizeof(float));
            std::memcpy(values + j * D, v + j * tokenStride, D * sizeof(float));
        } else {
            for (int64_t d = 0; d < D; ++d) {
                keys[j * D + d] = toFloat(k[j * tokenStride + d]);
                values[j * D + d] = toFloat(v[j * tokenStride + d]);
            }
        }
    }
}

}  // namespace

bool reservePackedKeysValues(CpuAttentionProblem& problem) noexcept {
    try {
        thread_local AlignedFloats storage;
        const size_t floats = static_cast<size_t>(problem.batch * problem.heads * problem.seqLen * problem.headDim);
        problem.packedKeys = storage.get(2 * floats + 16);
        problem.packedValues = problem.packedKeys + roundUp(static_cast<int64_t>(floats), 16);  // 64-byte aligned
        return true;
    } catch (...) {  // std::bad_alloc
        return false;
    }
}

void packKeysValues(const CpuAttentionProblem& problem, size_t task) noexcept {
    switch (problem.dtype) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: pack<float>(problem, task); break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: pack<Ort::Float16_t>(problem, task); break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: pack<Ort::BFloat16_t>(problem, task); break;
        default: break;
    }
}

bool attendQueryBlock(const CpuAttentionProblem& problem, size_t task) noexcept {
    // Called on ONNX Runtime's worker threads: nothing may throw out of here.
    try {
        thread_local Scratch scratch;
        switch (problem.dtype) {
            case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: attend<float>(problem, task, scratch); break;
            case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: attend<Ort::Float16_t>(problem, task, scratch); break;
            case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: attend<Ort::BFloat16_t>(problem, task, scratch); break;
            default: return false;
        }
        return true;
    } catch (...) {  // std::bad_alloc from the scratch
        return false;
    }
}

}  // namespace saexport::ort
