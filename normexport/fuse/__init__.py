"""Fuse every RMSNorm subgraph of an ONNX model into one node for a target runtime.

    fuse_model(model, target) -> FuseReport     (model: onnx_ir.Model, rewritten in place)
    fuse_file(src, dst, target) -> FuseReport   (atomic write, external data for > 2 GB)

The names below are imported on first use (from ``fusion``, ``registry``, ``report``), so that
reading the target registry (the CLI's ``--target`` choices) imports no onnx_ir or onnxscript.
"""

from __future__ import annotations

from normexport.lazy import lazy_names

_WHERE = {
    "fuse_model": "fusion", "fuse_file": "fusion", "find_near_misses": "fusion", "load_onnx": "fusion", "save_onnx": "fusion",
    "check_proto": "fusion", "checked_proto": "fusion",
    "TARGETS": "registry", "FUSED_OPS": "registry", "target_record": "registry",
    "FuseReport": "report",
}

__all__ = ["TARGETS", "FUSED_OPS", "target_record", "FuseReport", "fuse_model", "fuse_file", "find_near_misses", "load_onnx", "save_onnx",
           "check_proto", "checked_proto"]


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
