# Finds TensorRT's headers and nvinfer library.
#   TensorRT_ROOT     install prefix (also read from the environment)
# Defines TensorRT_FOUND (headers found), TensorRT_VERSION, TensorRT_INCLUDE_DIR, and, where libnvinfer is
# found too, the imported target TensorRT::nvinfer. A plugin library needs only the headers: the process that
# loads it (trtexec, Triton, the Python runtime) has libnvinfer loaded already.
find_path(TensorRT_INCLUDE_DIR NvInfer.h
  HINTS ${TensorRT_ROOT} $ENV{TensorRT_ROOT} PATH_SUFFIXES include)
find_library(TensorRT_LIBRARY NAMES nvinfer nvinfer_10 nvinfer_11
  HINTS ${TensorRT_ROOT} $ENV{TensorRT_ROOT} PATH_SUFFIXES lib lib64 targets/x86_64-linux/lib)

if(TensorRT_INCLUDE_DIR AND EXISTS "${TensorRT_INCLUDE_DIR}/NvInferVersion.h")
  file(STRINGS "${TensorRT_INCLUDE_DIR}/NvInferVersion.h" _trt_lines REGEX "#define (NV_TENSORRT|TRT)_(MAJOR|MINOR|PATCH)(_ENTERPRISE)? ")
  foreach(_part MAJOR MINOR PATCH)
    string(REGEX MATCH "_${_part}(_ENTERPRISE)? +([0-9]+)" _m "${_trt_lines}")
    set(_trt_${_part} ${CMAKE_MATCH_2})
  endforeach()
  set(TensorRT_VERSION "${_trt_MAJOR}.${_trt_MINOR}.${_trt_PATCH}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(TensorRT REQUIRED_VARS TensorRT_INCLUDE_DIR
  VERSION_VAR TensorRT_VERSION)

if(TensorRT_FOUND AND TensorRT_LIBRARY AND NOT TARGET TensorRT::nvinfer)
  add_library(TensorRT::nvinfer UNKNOWN IMPORTED)
  set_target_properties(TensorRT::nvinfer PROPERTIES
    IMPORTED_LOCATION "${TensorRT_LIBRARY}" INTERFACE_INCLUDE_DIRECTORIES "${TensorRT_INCLUDE_DIR}")
endif()
