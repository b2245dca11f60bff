"""Build, find and call the RMSNorm CUDA kernel and TensorRT plugin whose sources live in plugins/rmsnorm/.

- `building`: `build()` runs CMake (configure + build) and says what was built and what was skipped and why;
  `find_kernel_library()` / `find_plugin_library()` locate the built libraries (env overrides
  NORMEXPORT_KERNEL_LIB / NORMEXPORT_PLUGIN_LIB);
- `kernel`: `rmsnorm_forward()` calls the kernel on torch CUDA tensors through ctypes; `kernel_plan()` says how it
  would launch;
- `tensorrt`: `load_plugin()` registers the TensorRT plugin with TensorRT's plugin registry;
- `cli`: `plugin_cli`, the `normexport plugin` click group.

torch and tensorrt are imported inside the functions that need them.
"""

from __future__ import annotations

from normexport.plugin.building import (
    BUILD_COMMAND,
    KERNEL_LIB_ENV,
    PLUGIN_LIB_ENV,
    BuildResult,
    build,
    find_kernel_library,
    find_nvcc,
    find_plugin_library,
)
from normexport.plugin.kernel import DTYPE_CODES, KERNEL_ABI_VERSION, KernelPlan, kernel_plan, load_kernel_library, rmsnorm_forward
from normexport.plugin.tensorrt import load_plugin

__all__ = [
    "BUILD_COMMAND",
    "DTYPE_CODES",
    "KERNEL_ABI_VERSION",
    "KERNEL_LIB_ENV",
    "PLUGIN_LIB_ENV",
    "BuildResult",
    "KernelPlan",
    "build",
    "find_kernel_library",
    "find_nvcc",
    "find_plugin_library",
    "kernel_plan",
    "load_kernel_library",
    "load_plugin",
    "rmsnorm_forward",
]
