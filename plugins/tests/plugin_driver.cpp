// Drives the TensorRT plugin BlockSparseAttention v1 the way TensorRT does, without TensorRT.
//
// What it does (one PASS/FAIL line per check; the exit status is non-zero when any check fails):
//  - Loads the dynamic plugin library (libsaexport_trt_plugin_dynamic.so) with dlopen(RTLD_NOW) and takes the
//    creator from its exported getCreators(), the entry point IPluginRegistry::loadLibrary calls; checks the
//    creator's interface kind, name, version and namespace as the registry's lookup by the node's op_type,
//    plugin_version and plugin_namespace would.
//  - Builds the PluginFieldCollection as onnx-tensorrt's plugin importer does (FallbackPluginImporter ->
//    addPluginWithCreator -> loadFields, onnxOpImporters.cpp): one field per name the creator lists in
//    getFieldNames(), in that order, for the attributes the node has (an absent one is skipped with a warning);
//    ONNX INT -> kINT32 (the int64 narrowed to int32), FLOAT -> kFLOAT32, STRING -> kCHAR (with its NUL), INTS /
//    FLOATS -> kINT32 / kFLOAT32 of their length, scalars of length 1; plugin_version and plugin_namespace only
//    select the creator; topology, budgets (INT32 initializers) and step_index are tensor inputs, never fields.
//    Then createPlugin(node name, fields, kBUILD). A missing, mistyped or unsupported attribute must be refused
//    with a message (read back from stderr, where the plugin reports), not a crash.
//  - Build capability: getOutputDataTypes; getOutputShapes through a small IExprBuilder of its own (constants,
//    symbols for unknown extents, operations); supportsFormatCombination over every (DataType, TensorFormat)
//    pair at every position against the expected table; configurePlugin with static and dynamic L, and with
//    inconsistent shapes (refused); getWorkspaceSize against the formula at the profile's largest L.
//  - Runtime capability on the GPU: onShapeChange, enqueue on a stream against a CPU reference in double
//    precision: fresh random inputs (the seed is printed; --seed N replays), outputs poisoned with NaN first,
//    L not a multiple of the block size, a query block with no kept key block in one head (exact zeros),
//    fp16 and bf16, head_dim 64/128, block 64/128 (on an H100 both the Hopper and the portable kernel path),
//    several steps, and step_index outside [0, steps) clamped (bit-identical to the clamped step's output).
//  - getFieldsToSerialize -> a deep copy (what an engine keeps) -> createPlugin(kRUNTIME) -> attachToContext
//    -> onShapeChange -> enqueue: bit-identical output; another kernel ABI or a missing one is refused at
//    runtime; clone() -> enqueue: bit-identical; enqueue captured in a CUDA graph and replayed with other
//    step_index values: bit-identical to the direct runs.
//
// What it does NOT prove: anything TensorRT itself does. Not that TensorRT's builder accepts the network, picks
// these formats, or calls these methods in this order and with these descriptors; not TensorRT's scheduling,
// streams, workspace and memory planning, layer fusion, tactic timing and selection, engine serialization and
// deserialization (the driver copies the fields itself), version-compatible or lean-runtime engines, or the ONNX
// parser as a whole (only its attribute-to-field conversion is re-implemented here, from its source). It does
// not load the static-registration library (that needs libnvinfer's getPluginRegistry). It is compiled against
// the TensorRT headers only and needs a CUDA GPU to run.
//
// Usage: saexport_plugin_driver [--seed N] [path/to/libsaexport_trt_plugin_dynamic.so]
// SAEXPORT_BSA_PATH=sm80 forces the kernel's portable path (as for the Python tests).

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "saexport_bsa.h"  // SAEXPORT_BSA_ABI_VERSION only: the kernel is reached through the plugin alone

#ifndef SAEXPORT_PLUGIN_LIBRARY
#define SAEXPORT_PLUGIN_LIBRARY "libsaexport_trt_plugin_dynamic.so"
#endif

using namespace nvinfer1;

namespace {

// Input positions (docs/ARCHITECTURE.md, "The ONNX node"), then the output.
enum : int32_t { kQ = 0, kK, kV, kTopology, kBudgets, kStepIndex, kNbInputs, kOut = kNbInputs, kNbIO };
char const* const kPositionNames[kNbIO] = {"q", "k", "v", "topology", "budgets", "step_index", "output"};
// The name onnx-tensorrt passes to createPlugin: the node's name (getNodeName).
constexpr char const* kNodeName = "/blocks.0/attn1/BlockSparseAttention";
constexpr char const* kReportPrefix = "[saexport BlockSparseAttention]";

// ---------------------------------------------------------------------------------------------------------------
// Checks and errors

int gFailures = 0;

bool check(bool ok, std::string const& what) {
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
    std::fflush(stdout);
    if (!ok) ++gFailures;
    return ok;
}

// After a CUDA error nothing further can be trusted: report it and stop.
void cudaOk(cudaError_t status, char const* what) {
    if (status != cudaSuccess) {
        std::printf("FAIL CUDA error in %s: %s\n", what, cudaGetErrorString(status));
        std::printf("RESULT: FAIL (stopped at a CUDA error)\n");
        std::exit(1);
    }
}
#define CUDA_OK(call) cudaOk((call), #call)

bool contains(std::string const& text, char const* part) { return text.find(part) != std::string::npos; }

std::string oneLine(std::string text) {
    std::replace(text.begin(), text.end(), '\n', ' ');
    while (!text.empty() && text.back() == ' ') text.pop_back();
    return text;
}

// Runs `body` with stderr (where the plugin reports) redirected to a temporary file; returns what was written.
std::string captureStderr(std::function<void()> const& body) {
    std::fflush(stderr);
    FILE* file = std::tmpfile();
    int const saved = dup(2);
    if (file == nullptr || saved < 0 || dup2(fileno(file), 2) < 0) {
        if (saved >= 0) close(saved);
        if (file != nullptr) std::fclose(file);
        body();
        return "<stderr could not be captured>";
    }
    body();
    std::fflush(stderr);
    dup2(saved, 2);
    close(saved);
    std::string text;
    std::rewind(file);
    char buffer[512];
    size_t n = 0;
    while ((n = std::fread(buffer, 1, sizeof buffer, file)) > 0) text.append(buffer, n);
    std::fclose(file);
    return text;
}

// ---------------------------------------------------------------------------------------------------------------
// fp16 / bf16 on the host (round to nearest even; the inputs are finite and in range)

uint16_t floatToHalf(float value) {
    uint16_t const sign = std::signbit(value) ? 0x8000 : 0;
    float const magnitude = std::fabs(value);
    if (magnitude == 0.f) return sign;
    int exponent = 0;
    std::frexp(magnitude, &exponent);  // magnitude = m * 2^exponent, m in [0.5, 1)
    int e = std::max(exponent - 1, -14);
    double r = std::nearbyint(std::ldexp(static_cast<double>(magnitude), 10 - e));  // ties to even
    if (r >= 2048.0) {
        r /= 2.0;
        ++e;
    }
    if (e > 15) return sign | 0x7c00;
    auto const bits = static_cast<uint32_t>(r);
    if (bits < 1024) return static_cast<uint16_t>(sign | bits);  // subnormal (e == -14)
    return static_cast<uint16_t>(sign | ((e + 15) << 10) | (bits - 1024));
}

double halfToDouble(uint16_t h) {
    int const exponent = (h >> 10) & 0x1f;
    int const mantissa = h & 0x3ff;
    double value = 0.0;
    if (exponent == 0) {
        value = std::ldexp(static_cast<double>(mantissa), -24);
    } else if (exponent == 31) {
        value = mantissa != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
    } else {
        value = std::ldexp(static_cast<double>(mantissa | 0x400), exponent - 25);
    }
    return (h & 0x8000) != 0 ? -value : value;
}

uint16_t floatToBf16(float value) {
    uint32_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

double bf16ToDouble(uint16_t b) {
    uint32_t const bits = static_cast<uint32_t>(b) << 16;
    float value = 0.f;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

char const* typeName(DataType type) {
    switch (type) {
        case DataType::kHALF: return "fp16";
        case DataType::kBF16: return "bf16";
        case DataType::kINT32: return "int32";
        default: return "other";
    }
}

uint16_t encode(float value, DataType type) {
    return type == DataType::kBF16 ? floatToBf16(value) : floatToHalf(value);
}
double decode(uint16_t bits, DataType type) {
    return type == DataType::kBF16 ? bf16ToDouble(bits) : halfToDouble(bits);
}

// ---------------------------------------------------------------------------------------------------------------
// A small IExprBuilder: constants, symbols (extents unknown at build time) and operations on them

class DriverExpr final : public IDimensionExpr {
public:
    DriverExpr(bool constant, int64_t value) : mState(constant, value) { mImpl = &mState; }

private:
    struct State final : apiv::VDimensionExpr {
        State(bool constant_, int64_t value_) : constant(constant_), value(value_) {}
        bool isConstant() const override { return constant; }
        int64_t getConstantValue() const override { return constant ? value : std::numeric_limits<int64_t>::min(); }
        bool isSizeTensor() const override { return false; }
        bool constant;
        int64_t value;
    } mState;
};

class DriverExprBuilder final : public IExprBuilder {
public:
    DriverExprBuilder() { mImpl = &mState; }
    IDimensionExpr const* symbol() { return mState.make(false, 0); }
    size_t made() const { return mState.exprs.size(); }

private:
    struct State final : apiv::VExprBuilder {
        IDimensionExpr const* constant(int64_t value) override { return make(true, value); }
        IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& first,
                                        IDimensionExpr const& second) override {
            if (!first.isConstant() || !second.isConstant()) return make(false, 0);
            int64_t const a = first.getConstantValue();
            int64_t const b = second.getConstantValue();
            switch (op) {
                case DimensionOperation::kSUM: return make(true, a + b);
                case DimensionOperation::kPROD: return make(true, a * b);
                case DimensionOperation::kMAX: return make(true, std::max(a, b));
                case DimensionOperation::kMIN: return make(true, std::min(a, b));
                case DimensionOperation::kSUB: return make(true, a - b);
                case DimensionOperation::kEQUAL: return make(true, a == b ? 1 : 0);
                case DimensionOperation::kLESS: return make(true, a < b ? 1 : 0);
                case DimensionOperation::kFLOOR_DIV:
                    if (b == 0) return nullptr;
                    return make(true, a / b - ((a % b != 0 && ((a < 0) != (b < 0))) ? 1 : 0));
                case DimensionOperation::kCEIL_DIV:
                    if (b == 0) return nullptr;
                    return make(true, a / b + ((a % b != 0 && ((a < 0) == (b < 0))) ? 1 : 0));
            }
            return nullptr;
        }
        IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
            return make(false, 0);
        }
        IDimensionExpr const* make(bool constant, int64_t value) {
            exprs.push_back(std::make_unique<DriverExpr>(constant, value));
            return exprs.back().get();
        }
        std::vector<std::unique_ptr<DriverExpr>> exprs;
    } mState;
};

// What TensorRT hands attachToContext; the plugin needs neither an allocator nor an error recorder.
class DriverResourceContext final : public IPluginResourceContext {
public:
    IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
};

// ---------------------------------------------------------------------------------------------------------------
// The ONNX node's attributes, and the fields onnx-tensorrt's loadFields makes of them

struct OnnxAttribute {
    enum Kind { kInt, kFloat, kString } kind;
    std::string name;
    int64_t i{0};
    float f{0.f};
    std::string s;
};

OnnxAttribute intAttr(char const* name, int64_t value) { return {OnnxAttribute::kInt, name, value, 0.f, ""}; }
OnnxAttribute floatAttr(char const* name, float value) { return {OnnxAttribute::kFloat, name, 0, value, ""}; }
OnnxAttribute stringAttr(char const* name, char const* value) { return {OnnxAttribute::kString, name, 0, 0.f, value}; }

// Owns the field names and values (the parser's fieldData map) so the collection stays valid.
struct FieldSet {
    std::deque<std::string> names;
    std::deque<std::vector<uint8_t>> values;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};
    std::vector<std::string> skipped;  // requested by the creator, absent from the node: the parser warns

    void add(std::string const& name, void const* data, size_t bytes, PluginFieldType type, int32_t length) {
        names.push_back(name);
        auto const* begin = static_cast<uint8_t const*>(data);
        values.emplace_back(begin, begin + bytes);
        fields.emplace_back(names.back().c_str(), values.back().data(), type, length);
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
    }
};

FieldSet parserFields(IPluginCreatorV3One& creator, std::vector<OnnxAttribute> const& node) {
    FieldSet set;
    PluginFieldCollection const* requested = creator.getFieldNames();
    for (int32_t i = 0; requested != nullptr && i < requested->nbFields; ++i) {
        std::string const name = requested->fields[i].name;
        auto const attribute =
            std::find_if(node.begin(), node.end(), [&](OnnxAttribute const& a) { return a.name == name; });
        if (attribute == node.end()) {
            set.skipped.push_back(name);
            continue;
        }
        switch (attribute->kind) {
            case OnnxAttribute::kInt: {
                auto const value = static_cast<int32_t>(attribute->i);  // OnnxAttrs::get<int32_t>
                set.add(name, &value, sizeof value, PluginFieldType::kINT32, 1);
                break;
            }
            case OnnxAttribute::kFloat:
                set.add(name, &attribute->f, sizeof(float), PluginFieldType::kFLOAT32, 1);
                break;
            case OnnxAttribute::kString:  // the characters and a NUL; length counts both
                set.add(name, attribute->s.c_str(), attribute->s.size() + 1, PluginFieldType::kCHAR,
                        static_cast<int32_t>(attribute->s.size() + 1));
                break;
        }
    }
    return set;
}

std::vector<OnnxAttribute> nodeAttributes(int64_t heads, int64_t headDim, int64_t blockSize, float scale) {
    // As saexport's exporter writes them (docs/ARCHITECTURE.md, "The ONNX node").
    return {stringAttr("plugin_version", "1"), stringAttr("plugin_namespace", ""), intAttr("num_heads", heads),
            intAttr("head_dim", headDim),      intAttr("block_size", blockSize),   floatAttr("scale", scale)};
}

size_t fieldElementSize(PluginFieldType type) {
    switch (type) {
        case PluginFieldType::kFLOAT16:
        case PluginFieldType::kBF16:
        case PluginFieldType::kINT16: return 2;
        case PluginFieldType::kFLOAT32:
        case PluginFieldType::kINT32: return 4;
        case PluginFieldType::kFLOAT64:
        case PluginFieldType::kINT64: return 8;
        case PluginFieldType::kINT8:
        case PluginFieldType::kCHAR:
        case PluginFieldType::kFP8: return 1;
        case PluginFieldType::kDIMS: return sizeof(Dims);
        default: return 0;
    }
}

// What an engine keeps of getFieldsToSerialize(): names, types, lengths and a copy of the bytes.
bool serializeFields(PluginFieldCollection const* fc, FieldSet& out) {
    if (fc == nullptr || fc->nbFields < 0 || (fc->nbFields > 0 && fc->fields == nullptr)) return false;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        PluginField const& field = fc->fields[i];
        size_t const size = fieldElementSize(field.type);
        if (field.name == nullptr || field.data == nullptr || field.length < 0 || size == 0) return false;
        out.add(field.name, field.data, size * static_cast<size_t>(field.length), field.type, field.length);
    }
    return true;
}

PluginField const* findField(PluginFieldCollection const* fc, char const* name) {
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        if (fc->fields[i].name != nullptr && std::strcmp(fc->fields[i].name, name) == 0) return &fc->fields[i];
    }
    return nullptr;
}

bool intFieldIs(PluginFieldCollection const* fc, char const* name, int32_t value) {
    PluginField const* field = findField(fc, name);
    return field != nullptr && field->type == PluginFieldType::kINT32 && field->length == 1 &&
           *static_cast<int32_t const*>(field->data) == value;
}

// ---------------------------------------------------------------------------------------------------------------
// Descriptors

Dims makeDims(std::initializer_list<int64_t> extents) {
    Dims dims{};
    dims.nbDims = static_cast<int32_t>(extents.size());
    int32_t i = 0;
    for (int64_t const e : extents) dims.d[i++] = e;
    return dims;
}

int64_t ceilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geometry {
    int32_t batch, seqLen, heads, headDim, blockSize, steps;
    int32_t blocks() const { return static_cast<int32_t>(ceilDiv(seqLen, blockSize)); }
    int32_t words() const { return static_cast<int32_t>(ceilDiv(blocks(), 4)); }
    // The shapes of the six inputs and the output for a sequence length `l` (-1: dynamic, while building).
    std::vector<Dims> shapes(int64_t l) const {
        Dims const qkv = makeDims({batch, l, heads, headDim});
        return {qkv,
                qkv,
                qkv,
                makeDims({heads, blocks(), words()}),
                makeDims({steps, heads}),
                makeDims({1}),
                qkv};
    }
};

std::vector<PluginTensorDesc> runtimeDescs(Geometry const& g, DataType type) {
    std::vector<Dims> const shapes = g.shapes(g.seqLen);
    std::vector<PluginTensorDesc> descs(kNbIO);
    for (int32_t i = 0; i < kNbIO; ++i) {
        descs[i] = PluginTensorDesc{};
        descs[i].dims = shapes[i];
        descs[i].type = (i == kTopology || i == kBudgets || i == kStepIndex) ? DataType::kINT32 : type;
        descs[i].format = TensorFormat::kLINEAR;
    }
    return descs;
}

// As TensorRT describes the tensors to configurePlugin / getWorkspaceSize: desc.dims with -1 where the extent is
// dynamic, and the optimisation profile's min / opt / max.
std::vector<DynamicPluginTensorDesc> buildDescs(Geometry const& g, DataType type, int64_t minL, int64_t optL,
                                                int64_t maxL) {
    bool const dynamic = minL != maxL;
    std::vector<Dims> const declared = g.shapes(dynamic ? -1 : optL);
    std::vector<Dims> const mins = g.shapes(minL);
    std::vector<Dims> const opts = g.shapes(optL);
    std::vector<Dims> const maxs = g.shapes(maxL);
    std::vector<DynamicPluginTensorDesc> descs(kNbIO);
    for (int32_t i = 0; i < kNbIO; ++i) {
        descs[i] = DynamicPluginTensorDesc{};
        descs[i].desc.dims = declared[i];
        descs[i].desc.type = (i == kTopology || i == kBudgets || i == kStepIndex) ? DataType::kINT32 : type;
        descs[i].desc.format = TensorFormat::kLINEAR;
        // The topology is an initializer: its shape is static even where L is dynamic.
        descs[i].min = i == kTopology ? opts[i] : mins[i];
        descs[i].opt = opts[i];
        descs[i].max = i == kTopology ? opts[i] : maxs[i];
        if (i == kTopology) descs[i].desc.dims = opts[i];
    }
    return descs;
}

size_t expectedWorkspace(Geometry const& g, int64_t seqLen) {
    int64_t const n = ceilDiv(seqLen, g.blockSize);
    // The row bitmasks, then the persistent kernel's tile counter (plugins/capi/saexport_bsa.h).
    return (static_cast<size_t>(g.heads) * static_cast<size_t>(n) * static_cast<size_t>(ceilDiv(n, 32)) + 1) * 4;
}

// ---------------------------------------------------------------------------------------------------------------
// One test case: inputs, the CPU reference, device buffers

struct CaseSpec {
    char const* name;
    DataType type;
    Geometry geometry;
    float scale;
};

struct CaseData {
    CaseSpec spec;
    std::vector<uint16_t> q, k, v;              // [batch, L, heads, head_dim] of spec.type
    std::vector<double> qd, kd, vd;             // the same values, decoded
    std::vector<uint8_t> levels;                // [heads, n, n]
    std::vector<int32_t> topology;              // packed [heads, n, ceil(n/4)]
    std::vector<int32_t> budgets;               // [steps, heads]
    int32_t emptyHead{0}, emptyBlock{0};        // a query block with no kept key block, at every step

    uint8_t level(int h, int u, int key) const {
        int const n = spec.geometry.blocks();
        return levels[(static_cast<size_t>(h) * n + u) * n + key];
    }
};

CaseData makeCase(CaseSpec const& spec, std::mt19937_64& rng) {
    Geometry const& g = spec.geometry;
    CaseData c{};
    c.spec = spec;
    size_t const elements = static_cast<size_t>(g.batch) * g.seqLen * g.heads * g.headDim;
    std::normal_distribution<float> normal(0.f, 1.f);
    for (auto* pair : {&c.q, &c.k, &c.v}) {
        pair->resize(elements);
        for (auto& x : *pair) x = encode(normal(rng), spec.type);
    }
    auto decodeAll = [&](std::vector<uint16_t> const& in, std::vector<double>& out) {
        out.resize(in.size());
        for (size_t i = 0; i < in.size(); ++i) out[i] = decode(in[i], spec.type);
    };
    decodeAll(c.q, c.qd);
    decodeAll(c.k, c.kd);
    decodeAll(c.v, c.vd);

    int const n = g.blocks();
    std::uniform_int_distribution<int> anyLevel(1, 254);
    c.levels.resize(static_cast<size_t>(g.heads) * n * n);
    for (int h = 0; h < g.heads; ++h) {
        for (int u = 0; u < n; ++u) {
            for (int v = 0; v < n; ++v) c.levels[(static_cast<size_t>(h) * n + u) * n + v] = u == v ? 0 : anyLevel(rng);
        }
    }
    // The last head's middle query block keeps nothing below the dense level, and that head is never dense.
    c.emptyHead = g.heads - 1;
    c.emptyBlock = n / 2;
    for (int v = 0; v < n; ++v) c.levels[(static_cast<size_t>(c.emptyHead) * n + c.emptyBlock) * n + v] = 255;

    int const words = g.words();
    c.topology.assign(static_cast<size_t>(g.heads) * n * words, 0);
    for (int h = 0; h < g.heads; ++h) {
        for (int u = 0; u < n; ++u) {
            for (int w = 0; w < words; ++w) {
                uint32_t word = 0;
                for (int byte = 0; byte < 4; ++byte) {
                    int const v = 4 * w + byte;
                    uint32_t const lvl = v < n ? c.level(h, u, v) : 255;  // padding bytes are 255
                    word |= lvl << (8 * byte);
                }
                int32_t packed = 0;
                std::memcpy(&packed, &word, sizeof packed);
                c.topology[(static_cast<size_t>(h) * n + u) * words + w] = packed;
            }
        }
    }

    // Step 0: head 0 dense; step 1 (the main check): head 0 keeps only its diagonal, head 1 about half, the last
    // head about a quarter; other steps and heads random. The last head stays below 255 at every step.
    std::uniform_int_distribution<int> anyBudget(0, 254);
    c.budgets.resize(static_cast<size_t>(g.steps) * g.heads);
    for (int s = 0; s < g.steps; ++s) {
        for (int h = 0; h < g.heads; ++h) c.budgets[static_cast<size_t>(s) * g.heads + h] = anyBudget(rng);
    }
    c.budgets[0] = 255;
    c.budgets[static_cast<size_t>(g.heads) + 0] = 0;
    if (g.heads > 2) c.budgets[static_cast<size_t>(g.heads) + 1] = 128;
    c.budgets[static_cast<size_t>(g.heads) + g.heads - 1] = 64;
    // The last step: head 0 keeps only its diagonal, so that the first and the last step differ.
    if (g.steps > 1) c.budgets[static_cast<size_t>(g.steps - 1) * g.heads] = 0;
    return c;
}

// Block-sparse attention of one step in double precision: row u of head h attends to the key blocks v with
// level(h, u, v) <= budgets[step, h]; a row with none is zeros (docs/ARCHITECTURE.md, "Kernel").
std::vector<double> reference(CaseData const& c, int step) {
    Geometry const& g = c.spec.geometry;
    int const n = g.blocks();
    double const scale = c.spec.scale;
    std::vector<double> out(c.qd.size(), 0.0);
    std::vector<double> weights(g.seqLen);
    std::vector<int> keys;
    auto at = [&](int b, int t, int h) {
        return ((static_cast<size_t>(b) * g.seqLen + t) * g.heads + h) * static_cast<size_t>(g.headDim);
    };
    for (int b = 0; b < g.batch; ++b) {
        for (int h = 0; h < g.heads; ++h) {
            int const budget = c.budgets[static_cast<size_t>(step) * g.heads + h];
            for (int u = 0; u < n; ++u) {
                keys.clear();
                for (int v = 0; v < n; ++v) {
                    if (c.level(h, u, v) > budget) continue;
                    for (int t = v * g.blockSize; t < std::min(g.seqLen, (v + 1) * g.blockSize); ++t) keys.push_back(t);
                }
                if (keys.empty()) continue;
                for (int i = u * g.blockSize; i < std::min(g.seqLen, (u + 1) * g.blockSize); ++i) {
                    double const* qi = &c.qd[at(b, i, h)];
                    double best = -std::numeric_limits<double>::infinity();
                    for (size_t j = 0; j < keys.size(); ++j) {
                        double const* kj = &c.kd[at(b, keys[j], h)];
                        double dot = 0.0;
                        for (int d = 0; d < g.headDim; ++d) dot += qi[d] * kj[d];
                        weights[j] = dot * scale;
                        best = std::max(best, weights[j]);
                    }
                    double total = 0.0;
                    for (size_t j = 0; j < keys.size(); ++j) total += (weights[j] = std::exp(weights[j] - best));
                    double* oi = &out[at(b, i, h)];
                    for (size_t j = 0; j < keys.size(); ++j) {
                        double const* vj = &c.vd[at(b, keys[j], h)];
                        double const w = weights[j] / total;
                        for (int d = 0; d < g.headDim; ++d) oi[d] += w * vj[d];
                    }
                }
            }
        }
    }
    return out;
}

struct Comparison {
    double relative{0.0};  // ||got - want|| / ||want||
    double worst{0.0};     // max |got - want| - (atol + rtol |want|), <= 0 when every element is within
    size_t outside{0};
    size_t nonFinite{0};
};

Comparison compare(std::vector<uint16_t> const& got, DataType type, std::vector<double> const& want, double atol,
                   double rtol) {
    Comparison r;
    double diff2 = 0.0, want2 = 0.0;
    r.worst = -std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < got.size(); ++i) {
        double const x = decode(got[i], type);
        if (!std::isfinite(x)) {
            ++r.nonFinite;
            continue;
        }
        double const e = std::fabs(x - want[i]);
        diff2 += e * e;
        want2 += want[i] * want[i];
        double const excess = e - (atol + rtol * std::fabs(want[i]));
        r.worst = std::max(r.worst, excess);
        if (excess > 0) ++r.outside;
    }
    r.relative = std::sqrt(diff2 / std::max(want2, 1e-300));
    return r;
}

struct DeviceCase {
    void* q{nullptr};
    void* k{nullptr};
    void* v{nullptr};
    void* out{nullptr};
    int32_t* topology{nullptr};
    int32_t* budgets{nullptr};
    int32_t* step{nullptr};
    void* workspace{nullptr};
    size_t outBytes{0};

    void upload(CaseData const& c, size_t workspaceBytes) {
        size_t const bytes = c.q.size() * sizeof(uint16_t);
        outBytes = bytes;
        CUDA_OK(cudaMalloc(&q, bytes));
        CUDA_OK(cudaMalloc(&k, bytes));
        CUDA_OK(cudaMalloc(&v, bytes));
        CUDA_OK(cudaMalloc(&out, bytes));
        CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&topology), c.topology.size() * sizeof(int32_t)));
        CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&budgets), c.budgets.size() * sizeof(int32_t)));
        CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&step), sizeof(int32_t)));
        CUDA_OK(cudaMalloc(&workspace, std::max<size_t>(workspaceBytes, 4)));
        CUDA_OK(cudaMemcpy(q, c.q.data(), bytes, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(k, c.k.data(), bytes, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(v, c.v.data(), bytes, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(topology, c.topology.data(), c.topology.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(budgets, c.budgets.data(), c.budgets.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
        // The workspace is scratch: poison it too, the plugin must not rely on its contents.
        CUDA_OK(cudaMemset(workspace, 0xA5, std::max<size_t>(workspaceBytes, 4)));
    }
    void release() {
        for (void* p : {q, k, v, out, static_cast<void*>(topology), static_cast<void*>(budgets),
                        static_cast<void*>(step), workspace}) {
            if (p != nullptr) CUDA_OK(cudaFree(p));
        }
        *this = DeviceCase{};
    }
};

// Sets step_index on the device, poisons the output with NaN (0xFFFF in fp16 and bf16), runs the plugin's
// enqueue on `stream`, and returns the output. enqueue's status goes to `status`.
std::vector<uint16_t> enqueueOnce(IPluginV3OneRuntime& runtime, std::vector<PluginTensorDesc> const& descs,
                                  DeviceCase& d, int32_t step, cudaStream_t stream, int32_t& status) {
    CUDA_OK(cudaMemcpyAsync(d.step, &step, sizeof step, cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemsetAsync(d.out, 0xFF, d.outBytes, stream));
    void const* inputs[kNbInputs] = {d.q, d.k, d.v, d.topology, d.budgets, d.step};
    void* outputs[1] = {d.out};
    status = runtime.enqueue(descs.data(), descs.data() + kNbInputs, inputs, outputs, d.workspace, stream);
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaGetLastError());
    std::vector<uint16_t> host(d.outBytes / sizeof(uint16_t));
    CUDA_OK(cudaMemcpy(host.data(), d.out, d.outBytes, cudaMemcpyDeviceToHost));
    return host;
}

// ---------------------------------------------------------------------------------------------------------------
// Capabilities

struct Capabilities {
    IPluginV3OneCore* core{nullptr};
    IPluginV3OneBuild* build{nullptr};
    IPluginV3OneRuntime* runtime{nullptr};
};

bool kindIs(IPluginCapability* capability, char const* kind) {
    if (capability == nullptr) return false;
    InterfaceInfo const info = capability->getInterfaceInfo();
    return info.kind != nullptr && std::strcmp(info.kind, kind) == 0 && info.major == 1;
}

// TensorRT reads the capability interfaces and checks their kind before casting (version 1 of each).
Capabilities capabilities(IPluginV3* plugin) {
    Capabilities caps;
    if (plugin == nullptr) return caps;
    IPluginCapability* core = plugin->getCapabilityInterface(PluginCapabilityType::kCORE);
    IPluginCapability* build = plugin->getCapabilityInterface(PluginCapabilityType::kBUILD);
    IPluginCapability* runtime = plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME);
    if (kindIs(core, "PLUGIN_V3ONE_CORE")) caps.core = static_cast<IPluginV3OneCore*>(core);
    if (kindIs(build, "PLUGIN_V3ONE_BUILD")) caps.build = static_cast<IPluginV3OneBuild*>(build);
    if (kindIs(runtime, "PLUGIN_V3ONE_RUNTIME")) caps.runtime = static_cast<IPluginV3OneRuntime*>(runtime);
    return caps;
}

struct PluginDeleter {
    void operator()(IPluginV3* plugin) const { delete plugin; }
};
using PluginPtr = std::unique_ptr<IPluginV3, PluginDeleter>;

// createPlugin under stderr capture: the plugin and what it reported.
PluginPtr createCaptured(IPluginCreatorV3One& creator, PluginFieldCollection const* fc, TensorRTPhase phase,
                         std::string& report) {
    IPluginV3* plugin = nullptr;
    report = captureStderr([&] { plugin = creator.createPlugin(kNodeName, fc, phase); });
    return PluginPtr(plugin);
}

bool refusedAndReported(PluginPtr const& plugin, std::string const& report, char const* expected) {
    return plugin == nullptr && contains(report, kReportPrefix) && contains(report, expected);
}

// ---------------------------------------------------------------------------------------------------------------
// Checks that need no GPU

void checkCreatorAndFields(IPluginCreatorV3One& creator) {
    PluginFieldCollection const* names = creator.getFieldNames();
    bool listed = names != nullptr && names->nbFields == 4;
    char const* const expected[] = {"num_heads", "head_dim", "block_size", "scale"};
    for (int32_t i = 0; listed && i < 4; ++i) {
        listed = names->fields[i].name != nullptr && std::strcmp(names->fields[i].name, expected[i]) == 0;
    }
    check(listed, "getFieldNames lists the node's attributes num_heads, head_dim, block_size, scale (the parser "
                  "passes only listed names)");

    std::vector<OnnxAttribute> const node = nodeAttributes(12, 128, 128, 0.088f);
    FieldSet const set = parserFields(creator, node);
    bool typed = set.collection.nbFields == 4 && set.skipped.empty();
    for (int32_t i = 0; typed && i < 4; ++i) {
        PluginField const& f = set.fields[i];
        typed = f.length == 1 && f.type == (i == 3 ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32);
    }
    check(typed, "the parser's fields for the exported node: num_heads/head_dim/block_size kINT32[1], scale "
                 "kFLOAT32[1]; plugin_version/plugin_namespace not passed");

    std::string report;
    PluginPtr plugin = createCaptured(creator, &set.collection, TensorRTPhase::kBUILD, report);
    Capabilities const caps = capabilities(plugin.get());
    check(plugin != nullptr && caps.core != nullptr && caps.build != nullptr && caps.runtime != nullptr,
          "createPlugin(kBUILD) from the parser's fields; core, build and runtime capabilities of version 1");
    if (caps.core != nullptr) {
        check(std::strcmp(caps.core->getPluginName(), "BlockSparseAttention") == 0 &&
                  std::strcmp(caps.core->getPluginVersion(), "1") == 0 &&
                  std::strcmp(caps.core->getPluginNamespace(), "") == 0,
              "the plugin's name, version and namespace are the node's op_type, plugin_version, plugin_namespace");
    }

    // Each required attribute missing in turn: the parser skips it (warning) and createPlugin must refuse.
    for (char const* missing : expected) {
        std::vector<OnnxAttribute> partial;
        for (OnnxAttribute const& a : node) {
            if (a.name != missing) partial.push_back(a);
        }
        FieldSet const fewer = parserFields(creator, partial);
        PluginPtr refused = createCaptured(creator, &fewer.collection, TensorRTPhase::kBUILD, report);
        std::string const expectedText = std::string("lacks the ") + missing;
        check(fewer.skipped.size() == 1 && refusedAndReported(refused, report, expectedText.c_str()),
              std::string("a node without ") + missing + " is refused and reported: " + oneLine(report));
    }
    {
        PluginPtr refused = createCaptured(creator, nullptr, TensorRTPhase::kBUILD, report);
        check(refusedAndReported(refused, report, "lacks the"),
              "createPlugin with no field collection is refused and reported: " + oneLine(report));
    }
    // scale exported as an INT attribute would arrive as kINT32.
    {
        std::vector<OnnxAttribute> wrong = node;
        wrong.back() = intAttr("scale", 1);
        FieldSet const fields = parserFields(creator, wrong);
        PluginPtr refused = createCaptured(creator, &fields.collection, TensorRTPhase::kBUILD, report);
        check(refusedAndReported(refused, report, "unexpected type"),
              "scale as an INT attribute (kINT32 field) is refused and reported: " + oneLine(report));
    }
    // A field with no value (length 0) must not be read.
    {
        FieldSet fields = parserFields(creator, node);
        fields.fields[0].length = 0;
        fields.fields[0].data = nullptr;
        PluginPtr refused = createCaptured(creator, &fields.collection, TensorRTPhase::kBUILD, report);
        check(refusedAndReported(refused, report, "no value"),
              "a num_heads field with no value is refused and reported: " + oneLine(report));
    }
    // An INT64 field (what an older parser produced) is read as well.
    {
        FieldSet fields;
        int64_t const heads = 12, dim = 128, block = 128;
        float const scale = 0.088f;
        fields.add("num_heads", &heads, sizeof heads, PluginFieldType::kINT64, 1);
        fields.add("head_dim", &dim, sizeof dim, PluginFieldType::kINT64, 1);
        fields.add("block_size", &block, sizeof block, PluginFieldType::kINT64, 1);
        fields.add("scale", &scale, sizeof scale, PluginFieldType::kFLOAT32, 1);
        PluginPtr accepted = createCaptured(creator, &fields.collection, TensorRTPhase::kBUILD, report);
        check(accepted != nullptr, "kINT64 integer fields are accepted too");
    }
    // Values the kernel does not support.
    struct Bad {
        char const* what;
        std::vector<OnnxAttribute> node;
    } const bad[] = {
        {"head_dim 96", nodeAttributes(12, 96, 128, 0.1f)},
        {"block_size 32", nodeAttributes(12, 128, 32, 0.1f)},
        {"num_heads 0", nodeAttributes(0, 128, 128, 0.1f)},
        {"scale 0", nodeAttributes(12, 128, 128, 0.f)},
        {"scale NaN", nodeAttributes(12, 128, 128, std::numeric_limits<float>::quiet_NaN())},
    };
    for (Bad const& b : bad) {
        FieldSet const fields = parserFields(creator, b.node);
        PluginPtr refused = createCaptured(creator, &fields.collection, TensorRTPhase::kBUILD, report);
        check(refusedAndReported(refused, report, "unsupported attributes"),
              std::string(b.what) + " is refused and reported: " + oneLine(report));
    }
}

void checkOutputTypesAndShapes(IPluginV3OneBuild& build) {
    check(build.getNbOutputs() == 1, "getNbOutputs is 1");
    for (DataType const type : {DataType::kHALF, DataType::kBF16}) {
        DataType const in[kNbInputs] = {type, type, type, DataType::kINT32, DataType::kINT32, DataType::kINT32};
        DataType out[1] = {DataType::kFLOAT};
        int32_t const status = build.getOutputDataTypes(out, 1, in, kNbInputs);
        check(status == 0 && out[0] == type,
              std::string("getOutputDataTypes: the output is ") + typeName(type) + " for " + typeName(type) + " q");
    }
    {
        DataType const in[5] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kINT32, DataType::kINT32};
        DataType out[1] = {DataType::kFLOAT};
        check(build.getOutputDataTypes(out, 1, in, 5) != 0, "getOutputDataTypes refuses five inputs");
    }

    // Static extents, then L as a symbol (a dynamic dimension): the output is q's shape, expression for expression.
    for (bool const dynamic : {false, true}) {
        DriverExprBuilder builder;
        IDimensionExpr const* batch = builder.constant(2);
        IDimensionExpr const* length = dynamic ? builder.symbol() : builder.constant(1000);
        IDimensionExpr const* heads = builder.constant(12);
        IDimensionExpr const* dim = builder.constant(128);
        IDimensionExpr const* blocks = builder.operation(DimensionOperation::kCEIL_DIV, *builder.constant(1000),
                                                         *builder.constant(128));
        IDimensionExpr const* words = builder.operation(DimensionOperation::kCEIL_DIV, *blocks, *builder.constant(4));
        DimsExprs in[kNbInputs]{};
        for (int32_t i = kQ; i <= kV; ++i) {
            in[i].nbDims = 4;
            in[i].d[0] = batch;
            in[i].d[1] = length;
            in[i].d[2] = heads;
            in[i].d[3] = dim;
        }
        in[kTopology].nbDims = 3;
        in[kTopology].d[0] = heads;
        in[kTopology].d[1] = blocks;
        in[kTopology].d[2] = words;
        in[kBudgets].nbDims = 2;
        in[kBudgets].d[0] = builder.constant(50);
        in[kBudgets].d[1] = heads;
        in[kStepIndex].nbDims = 1;
        in[kStepIndex].d[0] = builder.constant(1);
        DimsExprs out[1]{};
        int32_t const status = build.getOutputShapes(in, kNbInputs, nullptr, 0, out, 1, builder);
        bool same = status == 0 && out[0].nbDims == 4;
        for (int32_t j = 0; same && j < 4; ++j) {
            IDimensionExpr const* e = out[0].d[j];
            IDimensionExpr const* w = in[kQ].d[j];
            same = e != nullptr && (e == w || (e->isConstant() && w->isConstant() &&
                                               e->getConstantValue() == w->getConstantValue()));
        }
        bool const exprsOk = blocks->isConstant() && blocks->getConstantValue() == 8 && words->isConstant() &&
                             words->getConstantValue() == 2;
        check(same && exprsOk, std::string("getOutputShapes through the IExprBuilder: the output is q's shape (") +
                                   (dynamic ? "L symbolic" : "static") + ")");
        DimsExprs bad[kNbInputs];
        std::copy(in, in + kNbInputs, bad);
        bad[kQ].nbDims = 3;
        check(build.getOutputShapes(bad, kNbInputs, nullptr, 0, out, 1, builder) != 0,
              std::string("getOutputShapes refuses a q of rank 3 (") + (dynamic ? "L symbolic" : "static") + ")");
    }
}

bool expectedFormat(int32_t pos, DataType qType, DataType type, TensorFormat format) {
    if (format != TensorFormat::kLINEAR) return false;
    switch (pos) {
        case kQ: return type == DataType::kHALF || type == DataType::kBF16;
        case kK:
        case kV:
        case kOut: return type == qType;
        default: return type == DataType::kINT32;
    }
}

void checkFormats(IPluginV3OneBuild& build) {
    Geometry const g{2, 1000, 12, 128, 128, 50};
    int32_t const nbTypes = EnumMax<DataType>();
    int32_t const nbFormats = EnumMax<TensorFormat>();
    for (DataType const qType : {DataType::kHALF, DataType::kBF16}) {
        for (int32_t pos = 0; pos < kNbIO; ++pos) {
            int32_t accepted = 0, wrong = 0;
            std::string firstWrong;
            for (int32_t t = 0; t < nbTypes; ++t) {
                for (int32_t f = 0; f < nbFormats; ++f) {
                    // Positions before `pos` hold what TensorRT already chose; later ones are not decided yet
                    // (filled with a combination the plugin must not look at).
                    std::vector<DynamicPluginTensorDesc> io = buildDescs(g, qType, g.seqLen, g.seqLen, g.seqLen);
                    for (int32_t later = pos + 1; later < kNbIO; ++later) {
                        io[later].desc.type = DataType::kFLOAT;
                        io[later].desc.format = TensorFormat::kCHW32;
                    }
                    io[pos].desc.type = static_cast<DataType>(t);
                    io[pos].desc.format = static_cast<TensorFormat>(f);
                    bool const got = build.supportsFormatCombination(pos, io.data(), kNbInputs, 1);
                    bool const want =
                        expectedFormat(pos, qType, static_cast<DataType>(t), static_cast<TensorFormat>(f));
                    accepted += got ? 1 : 0;
                    if (got != want && wrong++ == 0) {
                        firstWrong = " (first: type " + std::to_string(t) + ", format " + std::to_string(f) + " " +
                                     (got ? "accepted" : "refused") + ")";
                    }
                }
            }
            check(wrong == 0, std::string("supportsFormatCombination at ") + kPositionNames[pos] + " with " +
                                  typeName(qType) + " q: " + std::to_string(accepted) + " of " +
                                  std::to_string(nbTypes * nbFormats) + " (type, format) pairs accepted, " +
                                  std::to_string(wrong) + " differ from the expected table" + firstWrong);
        }
    }
    std::vector<DynamicPluginTensorDesc> io = buildDescs(g, DataType::kHALF, g.seqLen, g.seqLen, g.seqLen);
    check(!build.supportsFormatCombination(0, io.data(), kNbInputs - 1, 2),
          "supportsFormatCombination refuses five inputs and two outputs");
}

void checkConfigure(IPluginV3OneBuild& build) {
    Geometry const g{2, 1000, 12, 128, 128, 50};
    std::string report;
    auto configure = [&](std::vector<DynamicPluginTensorDesc> const& io) {
        int32_t status = 0;
        report = captureStderr([&] { status = build.configurePlugin(io.data(), kNbInputs, io.data() + kNbInputs, 1); });
        return status;
    };
    check(configure(buildDescs(g, DataType::kBF16, 1000, 1000, 1000)) == 0, "configurePlugin with static shapes");
    check(configure(buildDescs(g, DataType::kHALF, 512, 1000, 1024)) == 0,
          "configurePlugin with a dynamic L (desc -1, profile 512..1024)");

    struct Bad {
        char const* what;
        int32_t pos;
        int32_t axis;
        int64_t extent;
        char const* expected;
    } const bad[] = {
        {"q with num_heads 11", kQ, 2, 11, "q must be"},
        {"q with head_dim 64", kQ, 3, 64, "q must be"},
        {"k with another L", kK, 1, 999, "q's shape"},
        {"the output with another batch", kOut, 0, 3, "q's shape"},
        {"a topology of 9 query blocks for L 1000, block 128", kTopology, 1, 9, "topology must be"},
        {"a topology of 3 words per row for 8 blocks", kTopology, 2, 3, "topology must be"},
        {"a topology for 11 heads", kTopology, 0, 11, "topology must be"},
        {"budgets for 11 heads", kBudgets, 1, 11, "budgets must be"},
        {"budgets of no step", kBudgets, 0, 0, "budgets must be"},
        {"step_index [2]", kStepIndex, 0, 2, "step_index must be"},
    };
    for (Bad const& b : bad) {
        std::vector<DynamicPluginTensorDesc> io = buildDescs(g, DataType::kBF16, 1000, 1000, 1000);
        io[b.pos].desc.dims.d[b.axis] = b.extent;
        io[b.pos].min.d[b.axis] = io[b.pos].opt.d[b.axis] = io[b.pos].max.d[b.axis] = b.extent;
        int32_t const status = configure(io);
        check(status != 0 && contains(report, kReportPrefix) && contains(report, b.expected),
              std::string("configurePlugin refuses ") + b.what + ": " + oneLine(report));
    }
    {
        std::vector<DynamicPluginTensorDesc> io = buildDescs(g, DataType::kBF16, 1000, 1000, 1000);
        io[kTopology].desc.dims = makeDims({12, 8});
        int32_t const status = configure(io);
        check(status != 0 && contains(report, "topology must be"),
              "configurePlugin refuses a topology of rank 2: " + oneLine(report));
    }

    std::vector<DynamicPluginTensorDesc> const fixed = buildDescs(g, DataType::kBF16, 1000, 1000, 1000);
    size_t const staticBytes = build.getWorkspaceSize(fixed.data(), kNbInputs, fixed.data() + kNbInputs, 1);
    check(staticBytes == expectedWorkspace(g, 1000),
          "getWorkspaceSize with static shapes: " + std::to_string(staticBytes) +
              " bytes (heads * n * ceil(n/32) * 4)");
    std::vector<DynamicPluginTensorDesc> const dynamic = buildDescs(g, DataType::kBF16, 512, 1000, 4500);
    size_t const dynamicBytes = build.getWorkspaceSize(dynamic.data(), kNbInputs, dynamic.data() + kNbInputs, 1);
    check(dynamicBytes == expectedWorkspace(g, 4500),
          "getWorkspaceSize with a dynamic L sizes for the profile's largest L: " + std::to_string(dynamicBytes) +
              " bytes");
}

// ---------------------------------------------------------------------------------------------------------------
// One case on the GPU: the build-time plugin, its clone, the runtime plugin from serialized fields, a CUDA graph

bool sameBits(std::vector<uint16_t> const& a, std::vector<uint16_t> const& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(uint16_t)) == 0;
}

void runCase(IPluginCreatorV3One& creator, CaseSpec const& spec, std::mt19937_64& rng) {
    Geometry const& g = spec.geometry;
    std::string const name = std::string("[") + spec.name + "] ";
    DataType const type = spec.type;
    double const relTolerance = type == DataType::kBF16 ? 1e-2 : 5e-3;  // tests/test_kernel_gpu.py's TOLERANCE
    double const elementTolerance = type == DataType::kBF16 ? 2e-2 : 5e-3;
    CaseData const c = makeCase(spec, rng);

    FieldSet const fields = parserFields(creator, nodeAttributes(g.heads, g.headDim, g.blockSize, spec.scale));
    std::string report;
    PluginPtr plugin = createCaptured(creator, &fields.collection, TensorRTPhase::kBUILD, report);
    Capabilities caps = capabilities(plugin.get());
    if (!check(caps.build != nullptr && caps.runtime != nullptr, name + "createPlugin(kBUILD) " + oneLine(report))) {
        return;
    }

    // Build time: types, formats, configuration, workspace, as TensorRT asks for them.
    std::vector<DynamicPluginTensorDesc> const io = buildDescs(g, type, g.seqLen, g.seqLen, g.seqLen);
    bool formats = true;
    for (int32_t pos = 0; pos < kNbIO; ++pos) {
        formats = formats && caps.build->supportsFormatCombination(pos, io.data(), kNbInputs, 1);
    }
    int32_t configured = 0;
    report = captureStderr(
        [&] { configured = caps.build->configurePlugin(io.data(), kNbInputs, io.data() + kNbInputs, 1); });
    size_t const workspaceBytes = caps.build->getWorkspaceSize(io.data(), kNbInputs, io.data() + kNbInputs, 1);
    check(formats && configured == 0 && workspaceBytes == expectedWorkspace(g, g.seqLen),
          name + "supportsFormatCombination, configurePlugin, getWorkspaceSize (" + std::to_string(workspaceBytes) +
              " bytes) " + oneLine(report));

    DeviceCase d;
    d.upload(c, workspaceBytes);
    cudaStream_t stream = nullptr;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::vector<PluginTensorDesc> const descs = runtimeDescs(g, type);

    int32_t shaped = caps.runtime->onShapeChange(descs.data(), kNbInputs, descs.data() + kNbInputs, 1);
    check(shaped == 0, name + "onShapeChange");

    // The main step, the two ends, and out-of-range steps (clamped).
    int const last = g.steps - 1;
    std::vector<std::vector<uint16_t>> byStep(g.steps);
    for (int s : {1, 0, last}) {
        int32_t status = -1;
        report = captureStderr([&] { byStep[s] = enqueueOnce(*caps.runtime, descs, d, s, stream, status); });
        std::vector<double> const want = reference(c, s);
        Comparison const r = compare(byStep[s], type, want, elementTolerance, elementTolerance);
        char detail[256];
        std::snprintf(detail, sizeof detail,
                      "enqueue at step %d vs the double-precision reference: relative error %.2e (< %.0e), "
                      "%zu elements beyond %.0e + %.0e|ref| (worst excess %.2e), %zu non-finite",
                      s, r.relative, relTolerance, r.outside, elementTolerance, elementTolerance, r.worst,
                      r.nonFinite);
        check(status == 0 && r.nonFinite == 0 && r.outside == 0 && r.relative < relTolerance,
              name + detail + (report.empty() ? "" : " " + oneLine(report)));
    }
    {
        // The query block with no kept key block: exact zeros (every bit), in every batch, at every step run.
        size_t nonZero = 0, checked = 0, otherHeadsZero = 0;
        for (int s : {1, 0, last}) {
            for (int b = 0; b < g.batch; ++b) {
                int const end = std::min(g.seqLen, (c.emptyBlock + 1) * g.blockSize);
                for (int t = c.emptyBlock * g.blockSize; t < end; ++t) {
                    size_t const row = ((static_cast<size_t>(b) * g.seqLen + t) * g.heads + c.emptyHead) * g.headDim;
                    for (int e = 0; e < g.headDim; ++e) {
                        nonZero += byStep[s][row + e] != 0 ? 1 : 0;
                        ++checked;
                    }
                    // The same tokens in head 0 keep at least their diagonal block: not all zeros.
                    size_t const other = ((static_cast<size_t>(b) * g.seqLen + t) * g.heads) * g.headDim;
                    bool allZero = true;
                    for (int e = 0; e < g.headDim; ++e) allZero = allZero && decode(byStep[s][other + e], type) == 0.0;
                    otherHeadsZero += allZero ? 1 : 0;
                }
            }
        }
        check(nonZero == 0 && checked > 0 && otherHeadsZero == 0,
              name + "a query block with no kept key block (head " + std::to_string(c.emptyHead) + ", block " +
                  std::to_string(c.emptyBlock) + ") is exact zeros: " + std::to_string(checked - nonZero) + " of " +
                  std::to_string(checked) + "; head 0's rows there are not");
    }
    check(!sameBits(byStep[0], byStep[last]), name + "steps 0 and " + std::to_string(last) +
                                                  " give different outputs (the clamping checks below can tell)");
    int32_t const outOfRange[] = {-5, -1, g.steps, 99, std::numeric_limits<int32_t>::min(),
                                  std::numeric_limits<int32_t>::max()};
    for (int32_t const s : outOfRange) {
        int32_t status = -1;
        std::vector<uint16_t> const got = enqueueOnce(*caps.runtime, descs, d, s, stream, status);
        int const clamped = s < 0 ? 0 : last;
        check(status == 0 && sameBits(got, byStep[clamped]),
              name + "step_index " + std::to_string(s) + " is clamped to step " + std::to_string(clamped) +
                  " (bit-identical output)");
    }
    std::vector<uint16_t> const& mainOut = byStep[1];

    // clone(): carries the configuration and the shape (no onShapeChange on the copy).
    {
        PluginPtr copy(plugin->clone());
        Capabilities const copyCaps = capabilities(copy.get());
        int32_t status = -1;
        std::vector<uint16_t> got;
        if (copyCaps.runtime != nullptr) got = enqueueOnce(*copyCaps.runtime, descs, d, 1, stream, status);
        check(copy != nullptr && copy.get() != plugin.get() && status == 0 && sameBits(got, mainOut),
              name + "clone() -> enqueue: bit-identical output");
    }

    // getFieldsToSerialize: what the engine keeps; then the build-time plugin is gone.
    FieldSet serialized;
    bool const copied = serializeFields(caps.runtime->getFieldsToSerialize(), serialized);
    PluginFieldCollection const* kept = &serialized.collection;
    PluginField const* scale = findField(kept, "scale");
    check(copied && intFieldIs(kept, "num_heads", g.heads) && intFieldIs(kept, "head_dim", g.headDim) &&
              intFieldIs(kept, "block_size", g.blockSize) && intFieldIs(kept, "kernel_abi", SAEXPORT_BSA_ABI_VERSION) &&
              scale != nullptr && scale->type == PluginFieldType::kFLOAT32 && scale->length == 1 &&
              std::memcmp(scale->data, &spec.scale, sizeof(float)) == 0,
          name + "getFieldsToSerialize: num_heads, head_dim, block_size, kernel_abi (kINT32), scale (kFLOAT32)");
    plugin.reset();
    caps = Capabilities{};

    // Deserialization: createPlugin(kRUNTIME) from the kept fields, attachToContext, onShapeChange, enqueue.
    {
        PluginPtr restored = createCaptured(creator, kept, TensorRTPhase::kRUNTIME, report);
        Capabilities const restoredCaps = capabilities(restored.get());
        DriverResourceContext context;
        PluginPtr attached(restoredCaps.runtime != nullptr ? restoredCaps.runtime->attachToContext(&context) : nullptr);
        Capabilities const attachedCaps = capabilities(attached.get());
        int32_t status = -1;
        std::vector<uint16_t> got;
        if (attachedCaps.runtime != nullptr &&
            attachedCaps.runtime->onShapeChange(descs.data(), kNbInputs, descs.data() + kNbInputs, 1) == 0) {
            got = enqueueOnce(*attachedCaps.runtime, descs, d, 1, stream, status);
        }
        check(restored != nullptr && attached != nullptr && status == 0 && sameBits(got, mainOut),
              name + "getFieldsToSerialize -> createPlugin(kRUNTIME) -> attachToContext -> onShapeChange -> "
                     "enqueue: bit-identical output " + oneLine(report));

        // A runtime plugin refuses a shape its node does not fit (L changed, topology not).
        std::vector<PluginTensorDesc> wrong = descs;
        for (int32_t i : {kQ, kK, kV, kOut}) wrong[i].dims.d[1] = static_cast<int64_t>(g.seqLen) + g.blockSize;
        int32_t refused = 0;
        if (attachedCaps.runtime != nullptr) {
            report = captureStderr([&] {
                refused = attachedCaps.runtime->onShapeChange(wrong.data(), kNbInputs, wrong.data() + kNbInputs, 1);
            });
        }
        check(refused != 0 && contains(report, "topology must be"),
              name + "onShapeChange refuses an L the topology does not cover: " + oneLine(report));

        // CUDA graph: capture one enqueue, replay it with other step_index values written before each launch.
        if (attachedCaps.runtime != nullptr &&
            attachedCaps.runtime->onShapeChange(descs.data(), kNbInputs, descs.data() + kNbInputs, 1) == 0) {
            void const* inputs[kNbInputs] = {d.q, d.k, d.v, d.topology, d.budgets, d.step};
            void* outputs[1] = {d.out};
            cudaGraph_t graph = nullptr;
            cudaGraphExec_t exec = nullptr;
            CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
            int32_t const captured = attachedCaps.runtime->enqueue(descs.data(), descs.data() + kNbInputs, inputs,
                                                                    outputs, d.workspace, stream);
            CUDA_OK(cudaStreamEndCapture(stream, &graph));
            size_t nodes = 0;
            CUDA_OK(cudaGraphGetNodes(graph, nullptr, &nodes));
            CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
            check(captured == 0 && nodes > 0, name + "enqueue captured in a CUDA graph (" + std::to_string(nodes) +
                                                  " nodes, global capture mode)");
            for (int32_t const s : {1, 0, 99, last, -3}) {
                CUDA_OK(cudaMemcpyAsync(d.step, &s, sizeof s, cudaMemcpyHostToDevice, stream));
                CUDA_OK(cudaMemsetAsync(d.out, 0xFF, d.outBytes, stream));
                CUDA_OK(cudaGraphLaunch(exec, stream));
                CUDA_OK(cudaStreamSynchronize(stream));
                std::vector<uint16_t> replayed(d.outBytes / sizeof(uint16_t));
                CUDA_OK(cudaMemcpy(replayed.data(), d.out, d.outBytes, cudaMemcpyDeviceToHost));
                int const clamped = std::min(std::max(s, 0), last);
                check(sameBits(replayed, byStep[clamped]), name + "CUDA graph replayed with step_index " +
                                                          std::to_string(s) + ": bit-identical to the direct run");
            }
            CUDA_OK(cudaGraphExecDestroy(exec));
            CUDA_OK(cudaGraphDestroy(graph));
        }
    }

    // An engine built with another kernel ABI, or whose fields lack it, is refused at runtime.
    {
        FieldSet other;
        int32_t const otherAbi = SAEXPORT_BSA_ABI_VERSION + 1;
        for (int32_t i = 0; i < kept->nbFields; ++i) {
            PluginField const& f = kept->fields[i];
            bool const abi = std::strcmp(f.name, "kernel_abi") == 0;
            other.add(f.name, abi ? static_cast<void const*>(&otherAbi) : f.data,
                      fieldElementSize(f.type) * static_cast<size_t>(f.length), f.type, f.length);
        }
        PluginPtr refused = createCaptured(creator, &other.collection, TensorRTPhase::kRUNTIME, report);
        check(refusedAndReported(refused, report, "kernel ABI"),
              name + "createPlugin(kRUNTIME) refuses another kernel_abi: " + oneLine(report));
        FieldSet without;
        for (int32_t i = 0; i < kept->nbFields; ++i) {
            PluginField const& f = kept->fields[i];
            if (std::strcmp(f.name, "kernel_abi") != 0) {
                without.add(f.name, f.data, fieldElementSize(f.type) * static_cast<size_t>(f.length), f.type, f.length);
            }
        }
        PluginPtr refusedToo = createCaptured(creator, &without.collection, TensorRTPhase::kRUNTIME, report);
        check(refusedAndReported(refusedToo, report, "kernel ABI"),
              name + "createPlugin(kRUNTIME) refuses fields without kernel_abi: " + oneLine(report));
    }

    CUDA_OK(cudaStreamDestroy(stream));
    d.release();
}

}  // namespace

int main(int argc, char** argv) {
    std::string library = SAEXPORT_PLUGIN_LIBRARY;
    uint64_t seed = std::random_device{}();
    seed = (seed << 32) ^ std::random_device{}();
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
            seed = std::strtoull(argv[++i], nullptr, 10);
        } else if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
            std::printf("usage: %s [--seed N] [path/to/libsaexport_trt_plugin_dynamic.so]\n", argv[0]);
            return 0;
        } else {
            library = argv[i];
        }
    }
    std::printf("plugin driver: TensorRT headers %d.%d.%d, library %s, seed %llu (--seed to replay)\n",
                NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH, library.c_str(),
                static_cast<unsigned long long>(seed));

    // The creator, as IPluginRegistry::loadLibrary finds it: dlopen, then the library's getCreators().
    void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!check(handle != nullptr,
               std::string("dlopen(RTLD_NOW) without libnvinfer: ") + (handle ? "loaded" : dlerror()))) {
        std::printf("RESULT: FAIL\n");
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    auto const getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators != nullptr ? getCreators(nbCreators) : nullptr;
    IPluginCreatorV3One* creator = nullptr;
    if (creators != nullptr && nbCreators == 1 && creators[0] != nullptr) {
        InterfaceInfo const info = creators[0]->getInterfaceInfo();
        if (info.kind != nullptr && std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1) {
            creator = static_cast<IPluginCreatorV3One*>(creators[0]);
        }
    }
    bool const found = creator != nullptr && std::strcmp(creator->getPluginName(), "BlockSparseAttention") == 0 &&
                       std::strcmp(creator->getPluginVersion(), "1") == 0 &&
                       std::strcmp(creator->getPluginNamespace(), "") == 0;
    if (!check(found, "getCreators() gives one IPluginCreatorV3One (\"PLUGIN CREATOR_V3ONE\" v1) for "
                      "BlockSparseAttention, version \"1\", namespace \"\"")) {
        std::printf("RESULT: FAIL\n");
        return 1;
    }

    checkCreatorAndFields(*creator);
    {
        std::string report;
        FieldSet const fields = parserFields(*creator, nodeAttributes(12, 128, 128, 0.088f));
        PluginPtr plugin = createCaptured(*creator, &fields.collection, TensorRTPhase::kBUILD, report);
        Capabilities const caps = capabilities(plugin.get());
        if (check(caps.build != nullptr, "a build-time plugin for the shape and format checks")) {
            checkOutputTypesAndShapes(*caps.build);
            checkFormats(*caps.build);
            checkConfigure(*caps.build);
        }
    }

    int device = 0, count = 0;
    if (!check(cudaGetDeviceCount(&count) == cudaSuccess && count > 0, "a CUDA device is present")) {
        std::printf("RESULT: FAIL (%d failed checks; the GPU checks need a CUDA GPU)\n", gFailures);
        return 1;
    }
    cudaDeviceProp prop{};
    CUDA_OK(cudaGetDevice(&device));
    CUDA_OK(cudaGetDeviceProperties(&prop, device));
    char const* path = std::getenv("SAEXPORT_BSA_PATH");
    std::printf("device: %s (sm_%d%d); SAEXPORT_BSA_PATH=%s\n", prop.name, prop.major, prop.minor,
                path != nullptr ? path : "(unset)");

    // Tails everywhere (L is never a multiple of the block); on sm_90 the head_dim 128 / block 128 cases take the
    // Hopper path, the others the portable one.
    CaseSpec const cases[] = {
        {"fp16 head_dim 64 block 64 L 333 (5 blocks + 13)", DataType::kHALF, {2, 333, 3, 64, 64, 3}, 0.125f},
        {"bf16 head_dim 128 block 128 L 1000 (7 blocks + 104)", DataType::kBF16, {1, 1000, 4, 128, 128, 3}, 0.088f},
        {"fp16 head_dim 128 block 128 L 700 (5 blocks + 60)", DataType::kHALF, {1, 700, 2, 128, 128, 4}, 0.09f},
        {"bf16 head_dim 64 block 128 L 515 (4 blocks + 3)", DataType::kBF16, {2, 515, 3, 64, 128, 3}, 0.125f},
        {"bf16 head_dim 128 block 64 L 1333 (20 blocks + 53)", DataType::kBF16, {1, 1333, 3, 128, 64, 5}, 0.09f},
        {"fp16 head_dim 64 block 128 L 130 (1 block + 2)", DataType::kHALF, {3, 130, 2, 64, 128, 2}, 0.125f},
    };
    std::mt19937_64 rng(seed);
    for (CaseSpec const& spec : cases) runCase(*creator, spec, rng);

    // The creator and its library stay loaded to the end, as in TensorRT's registry.
    std::printf("RESULT: %s (%d failed checks)\n", gFailures == 0 ? "PASS" : "FAIL", gFailures);
    return gFailures == 0 ? 0 : 1;
}
