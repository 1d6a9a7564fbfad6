# ONNX Runtime's public C/C++ API headers for the custom-op library (plugins/ort). They are never committed: the
# build takes them from ONNXRUNTIME_INCLUDE_DIR, or fetches a pinned release of them at configure time.
#
#   ONNXRUNTIME_INCLUDE_DIR      a folder holding onnxruntime_c_api.h, onnxruntime_cxx_api.h, onnxruntime_cxx_inline.h
#                                and onnxruntime_float16.h (a release's include/, /usr/include/onnxruntime, ...)
#   SAEXPORT_FETCH_ORT_HEADERS   fetch the pinned headers when ONNXRUNTIME_INCLUDE_DIR is not given (default ON)
#
# Defines OnnxRuntimeHeaders_FOUND, ONNXRUNTIME_INCLUDE_DIR and ONNXRUNTIME_API_VERSION (the headers' ORT_API_VERSION).
#
# The fetched headers are ONNX Runtime 1.21.0's (ORT_API_VERSION 21): a library built on them runs on every ONNX
# Runtime from 1.21 on, since a newer runtime serves every older API version. They come from Debian's
# libonnxruntime-dev package (ONNX Runtime's public API headers as Debian ships them, 85 kB), a source the project's
# machines and CI reach; the download is checked against its SHA-256 and only the headers are unpacked, under the
# build folder.
set(SAEXPORT_ORT_HEADERS_VERSION 1.21.0)
set(SAEXPORT_ORT_HEADERS_URL
    "https://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0%2Bdfsg-1_amd64.deb")
set(SAEXPORT_ORT_HEADERS_SHA256 14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08)
# The oldest API the library's code needs (KernelContext_ParallelFor, KernelContext_GetScratchBuffer,
# KernelInfoGetAllocator: ONNX Runtime 1.18).
set(SAEXPORT_ORT_MIN_API_VERSION 18)

set(ONNXRUNTIME_INCLUDE_DIR "" CACHE PATH "ONNX Runtime C/C++ API headers (a folder holding onnxruntime_c_api.h)")
option(SAEXPORT_FETCH_ORT_HEADERS "Fetch ONNX Runtime's API headers at configure time when not given" ON)

set(OnnxRuntimeHeaders_FOUND FALSE)
set(_ort_why "")

function(_saexport_fetch_ort_headers out_dir)
  set(_root "${CMAKE_BINARY_DIR}/_deps/onnxruntime-headers-${SAEXPORT_ORT_HEADERS_VERSION}")
  set(_include "${_root}/usr/include/onnxruntime")
  if(NOT EXISTS "${_include}/onnxruntime_cxx_api.h")
    set(_package "${_root}/libonnxruntime-dev.deb")
    # The hash is checked here rather than by file(DOWNLOAD EXPECTED_HASH), which fails the whole configure.
    file(DOWNLOAD "${SAEXPORT_ORT_HEADERS_URL}" "${_package}" STATUS _status TIMEOUT 60)
    list(GET _status 0 _code)
    list(GET _status 1 _message)
    if(_code EQUAL 0)
      file(SHA256 "${_package}" _hash)
      if(NOT _hash STREQUAL SAEXPORT_ORT_HEADERS_SHA256)
        set(_code 1)
        set(_message "SHA-256 ${_hash}, expected ${SAEXPORT_ORT_HEADERS_SHA256}")
      endif()
    endif()
    if(NOT _code EQUAL 0)
      file(REMOVE "${_package}")
      set(${out_dir} "" PARENT_SCOPE)
      set(_ort_why "the download of ${SAEXPORT_ORT_HEADERS_URL} failed: ${_message}" PARENT_SCOPE)
      return()
    endif()
    # A .deb is an ar archive holding data.tar.xz; CMake's tar reads both.
    execute_process(COMMAND ${CMAKE_COMMAND} -E tar xf "${_package}" WORKING_DIRECTORY "${_root}"
                    RESULT_VARIABLE _unpacked OUTPUT_QUIET ERROR_QUIET)
    file(GLOB _data "${_root}/data.tar.*")
    if(_unpacked EQUAL 0 AND _data)
      execute_process(COMMAND ${CMAKE_COMMAND} -E tar xf "${_data}" -- ./usr/include/onnxruntime
                      WORKING_DIRECTORY "${_root}" RESULT_VARIABLE _unpacked OUTPUT_QUIET ERROR_QUIET)
    endif()
    file(REMOVE "${_package}" "${_root}/control.tar.xz" "${_root}/debian-binary" ${_data})
    if(NOT EXISTS "${_include}/onnxruntime_cxx_api.h")
      set(${out_dir} "" PARENT_SCOPE)
      set(_ort_why "${SAEXPORT_ORT_HEADERS_URL} did not unpack to the headers" PARENT_SCOPE)
      return()
    endif()
  endif()
  set(${out_dir} "${_include}" PARENT_SCOPE)
endfunction()

set(_ort_include "${ONNXRUNTIME_INCLUDE_DIR}")
if(NOT _ort_include AND SAEXPORT_FETCH_ORT_HEADERS)
  _saexport_fetch_ort_headers(_ort_include)
elseif(NOT _ort_include)
  set(_ort_why "ONNXRUNTIME_INCLUDE_DIR is not set and SAEXPORT_FETCH_ORT_HEADERS is OFF")
endif()

if(_ort_include)
  set(ONNXRUNTIME_API_VERSION "")
  foreach(_header onnxruntime_c_api.h onnxruntime_cxx_api.h onnxruntime_cxx_inline.h onnxruntime_float16.h)
    if(NOT _ort_why AND NOT EXISTS "${_ort_include}/${_header}")
      set(_ort_why "${_ort_include} has no ${_header}")
    endif()
  endforeach()
  if(NOT _ort_why)
    file(STRINGS "${_ort_include}/onnxruntime_c_api.h" _api_line REGEX "^#define ORT_API_VERSION [0-9]+")
    string(REGEX MATCH "[0-9]+" ONNXRUNTIME_API_VERSION "${_api_line}")
    if(NOT ONNXRUNTIME_API_VERSION OR ONNXRUNTIME_API_VERSION LESS SAEXPORT_ORT_MIN_API_VERSION)
      set(_ort_why "${_ort_include} holds API version '${ONNXRUNTIME_API_VERSION}' (ORT_API_VERSION), the library \
needs ${SAEXPORT_ORT_MIN_API_VERSION} or later")
    else()
      set(OnnxRuntimeHeaders_FOUND TRUE)
      set(ONNXRUNTIME_INCLUDE_DIR "${_ort_include}")
    endif()
  endif()
endif()

if(NOT OnnxRuntimeHeaders_FOUND)
  set(OnnxRuntimeHeaders_WHY "${_ort_why}")
endif()
