"""The names of the ops a fused norm becomes, one definition each (the targets' records in
registry.py list which target emits which)."""

from __future__ import annotations

MS_DOMAIN = "com.microsoft"
TRT_DOMAIN = "trt.plugins"

SIMPLIFIED_LN = "SimplifiedLayerNormalization"  # onnxruntime contrib op (default domain)
SKIP_SIMPLIFIED_LN = "SkipSimplifiedLayerNormalization"  # onnxruntime contrib op, com.microsoft: residual Add + norm
RMS_NORMALIZATION = "RMSNormalization"  # ONNX standard op, opset 23
TRT_PLUGIN_NAME = "RMSNorm"  # normexport's TensorRT plugin, trt.plugins domain
TRT_PLUGIN_VERSION = "1"
TRT_PLUGIN_NAMESPACE = ""

# Norm ops that are not normexport's output but that onnxruntime's own optimizer writes
# (LayerNorm models; the unfused baseline's norms when its graph optimizations find them).
LAYER_NORM_OPS = ("LayerNormalization", "SkipLayerNormalization")

# Ops whose outputs after the first (mean, inverse std, the residual sum) are optional: an
# output of these that no node reads is written absent (an empty name), so the kernel does not
# compute and allocate it.
OPTIONAL_OUTPUT_NORMS = frozenset({
    ("", SIMPLIFIED_LN), ("", "LayerNormalization"),
    (MS_DOMAIN, SKIP_SIMPLIFIED_LN), (MS_DOMAIN, "SkipLayerNormalization"), (MS_DOMAIN, "LayerNormalization"),
})  # (domain, op type)
