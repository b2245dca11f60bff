"""Register the RMSNorm plugin library with TensorRT's plugin registry. tensorrt is imported inside load_plugin()."""

from __future__ import annotations

from pathlib import Path

from normexport.errors import NormexportError
from normexport.fuse.ops import TRT_PLUGIN_NAME as PLUGIN_NAME  # one definition, shared with the ONNX node
from normexport.fuse.ops import TRT_PLUGIN_NAMESPACE as PLUGIN_NAMESPACE
from normexport.fuse.ops import TRT_PLUGIN_VERSION as PLUGIN_VERSION
from normexport.plugin.building import find_plugin_library


def load_plugin(path: Path | None = None):
    """Register the RMSNorm plugin with TensorRT's plugin registry (IPluginRegistry.load_library); idempotent.

    Returns the registry's creator for RMSNorm/1. Needs TensorRT >= 10 (IPluginV3) and its Python package.
    """
    library = Path(path) if path is not None else find_plugin_library()
    try:
        import tensorrt as trt
    except ImportError as error:
        raise NormexportError(
            "TensorRT's Python package is not installed", hint="pip install tensorrt (TensorRT >= 10)"
        ) from error
    registry = trt.get_plugin_registry()
    creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        if registry.load_library(str(library)) is None:
            raise NormexportError(
                f"TensorRT could not load the plugin library {library}",
                hint="check TensorRT's log; the library must be built against this TensorRT major version",
            )
        creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        raise NormexportError(f"{library} did not register {PLUGIN_NAME} version {PLUGIN_VERSION}", hint=None)
    return creator
