// Entry point for IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, version-compatible engines with
// plugins_to_serialize): TensorRT asks for the creators instead of the library registering them itself.
#include "BlockSparseAttentionPlugin.h"

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static saexport::trt::BlockSparseAttentionCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
