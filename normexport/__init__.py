"""normexport: export PyTorch models with RMSNorm to ONNX / TensorRT with every RMSNorm fused."""

__version__ = "0.1.0"
