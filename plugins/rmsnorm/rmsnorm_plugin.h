/*
 * normexport RMSNorm TensorRT plugin (IPluginV3, TensorRT >= 10).
 *
 * Plugin "RMSNorm", version "1", namespace "" - the op type and attributes of the ONNX node that
 * `normexport fuse --target trt-plugin` writes, which TensorRT's ONNX parser maps to this plugin:
 *
 *   inputs   x [..., hidden], gamma [hidden], residual [..., hidden] (has_residual=1), bias [hidden] (has_bias=1)
 *   outputs  y [..., hidden], and with a residual: the sum x + residual [..., hidden]
 *   fields   epsilon (float, default 1e-5), has_residual (int, default 0), has_bias (int, default 0)
 *   types    FP32, FP16 or BF16, the same for every input and output; linear format
 *
 * Entry points of the shared library (C linkage):
 *   getCreators / setLoggerFinder   for IPluginRegistry::loadLibrary (Python: registry.load_library), trtexec
 *                                   --dynamicPlugins and --setPluginsToSerialize
 *   initLibNormexportRmsnormPlugin  registers the creator by hand (after ctypes.CDLL / dlopen); idempotent
 * With -DNORMEXPORT_RMSNORM_STATIC_REGISTRATION=ON the creator is also registered when the library is loaded.
 */
#ifndef NORMEXPORT_RMSNORM_PLUGIN_H
#define NORMEXPORT_RMSNORM_PLUGIN_H

#include <NvInferRuntime.h>

#include <cstdint>

#define NORMEXPORT_RMSNORM_PLUGIN_NAME "RMSNorm"
#define NORMEXPORT_RMSNORM_PLUGIN_VERSION "1"

#if defined(_WIN32)
#define NORMEXPORT_PLUGIN_API __declspec(dllexport)
#else
#define NORMEXPORT_PLUGIN_API __attribute__((visibility("default")))
#endif

extern "C"
{
    NORMEXPORT_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
    NORMEXPORT_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
    // Registers the RMSNorm creator with getPluginRegistry() under libNamespace ("" when null); `logger` is an
    // optional nvinfer1::ILogger* for messages. Returns true when the creator is (or already was) registered.
    NORMEXPORT_PLUGIN_API bool initLibNormexportRmsnormPlugin(void* logger, char const* libNamespace);
}

#endif // NORMEXPORT_RMSNORM_PLUGIN_H
