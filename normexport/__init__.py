"""normexport: export PyTorch models with RMSNorm to ONNX / TensorRT with every RMSNorm fused.

The Python API (imported on first use, so ``import normexport`` stays light)::

    result = normexport.convert(module, {"input_ids": ids}, output="model.onnx")
    model, fusion = normexport.fuse("model.onnx", target="ort")
    report = normexport.validate(module, "model.onnx", {"input_ids": ids})
    timing = normexport.bench(module, "model.onnx", {"input_ids": ids})
    rms_module, ln_report = normexport.ln2rms(module, {"input_ids": ids})

and, for pytest, ``normexport.testing.assert_onnx_matches``. Every user error raises a
``NormexportError`` subclass (``normexport.errors``).

``fuse``, ``validate`` and ``bench`` are also the names of submodules: on the package they
stay the API functions (importing a submodule does not rebind them); reach the submodules with
``from normexport.fuse import fuse_model`` and the like.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from normexport.errors import NormexportError, ValidationFailed

__version__ = "0.1.0"

_API = ("convert", "fuse", "validate", "bench", "ln2rms", "ConvertResult")

if TYPE_CHECKING:
    from normexport.api import ConvertResult, bench, convert, fuse, ln2rms, validate


def __getattr__(name: str):
    if name in _API:
        from normexport import api

        return getattr(api, name)
    if name == "testing":
        import importlib

        return importlib.import_module("normexport.testing")
    raise AttributeError(f"module 'normexport' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``normexport.fuse`` (or ``validate``,
    ``bench``) leaves ``normexport.fuse`` the API function instead of binding the submodule."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "testing"])


__all__ = [*_API, "NormexportError", "ValidationFailed", "__version__"]
