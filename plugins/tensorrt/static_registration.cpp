// Static registration: loading this library (ctypes.CDLL, trtexec --staticPlugins, polygraphy --plugins,
// Triton's plugins= or LD_PRELOAD) registers the creator with TensorRT's global plugin registry.
#include "BlockSparseAttentionPlugin.h"

namespace saexport::trt {
REGISTER_TENSORRT_PLUGIN(BlockSparseAttentionCreator);
}  // namespace saexport::trt
