"""TensorRT through its Python API, in two parts:

- `TrtEngineLoader` turns the ONNX file into an engine: parse it, load normexport's RMSNorm plugin when the graph
  has plugin nodes, set the precision, and build, or load the engine cached under the hash of everything that
  shapes it;
- `TrtRunner` holds one engine's execution context, binds CUDA buffers, runs and times with CUDA events.

Needs a CUDA GPU, the ``tensorrt`` package with its libraries and torch with CUDA (buffers and events). Where any
is missing, activate() raises a NormexportError that says which. This module imports without them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from normexport.errors import NormexportError
from normexport.runners.base import Runner

CACHE_DIR = Path(os.environ.get("NORMEXPORT_CACHE", Path.home() / ".cache" / "normexport")) / "engines"


def _require():
    try:
        import tensorrt as trt
    except Exception as e:  # the pip stubs raise at import when the libraries are absent
        raise NormexportError(f"--backend trt needs TensorRT's Python package with its libraries ({type(e).__name__}: {str(e)[:120]})", "pip install 'normexport[trt]' on a machine with an NVIDIA GPU") from None
    import torch

    if not torch.cuda.is_available():
        raise NormexportError("--backend trt needs a CUDA GPU and a CUDA build of torch (for buffers and CUDA events)", "run on a GPU machine")
    return trt, torch


def write_engine_cache(path: Path, data: bytes) -> None:
    """Store a serialized engine at path, whole or not at all."""
    from normexport import outputs

    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_bytes(path, data)


@dataclass(frozen=True)
class GraphInfo:
    """What the runner needs from the ONNX graph, read once (without external data)."""

    output_names: list[str]
    has_plugin_nodes: bool


class TrtEngineLoader:
    """Builds (or loads from the cache) a TensorRT engine for one ONNX model, precision and input shapes."""

    def __init__(self, model: str | Path, precision: str = "fp32", plugin_library: str | Path | None = None, workspace_gb: float = 4.0, cache: bool = True, cache_dir: Path | None = None):
        self.model = Path(model)
        self.precision = precision
        self.plugin_library = Path(plugin_library) if plugin_library else None
        self.workspace_gb = workspace_gb
        self.cache = cache
        self.cache_dir = cache_dir if cache_dir is not None else CACHE_DIR

    @cached_property
    def graph(self) -> GraphInfo:
        import onnx

        from normexport.fuse.targets import TRT_DOMAIN

        m = onnx.load_model(str(self.model), load_external_data=False)
        return GraphInfo([o.name for o in m.graph.output], any(n.domain == TRT_DOMAIN for n in m.graph.node))

    def engine_key(self, trt, shapes: dict[str, tuple]) -> str:
        h = hashlib.sha256()
        h.update(self.model.read_bytes())
        data = self.model.with_name(self.model.name + ".data")
        if data.exists():
            h.update(str(data.stat().st_size).encode())
        if self.plugin_library:
            h.update(self.plugin_library.read_bytes())
        h.update(f"{trt.__version__}|{self.precision}|{sorted(shapes.items())}".encode())
        return h.hexdigest()[:24]

    def load(self, trt, shapes: dict[str, tuple]):
        """The engine for these input shapes: from the cache when there, else built (and cached)."""
        logger = trt.Logger(trt.Logger.WARNING)
        if self.graph.has_plugin_nodes:
            self._load_plugin(trt, logger)
        path = self.cache_dir / f"{self.engine_key(trt, shapes)}.engine"
        runtime = trt.Runtime(logger)
        if self.cache and path.exists():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                return engine
        serialized = self._build(trt, logger, shapes)
        if self.cache:
            write_engine_cache(path, serialized)
        return runtime.deserialize_cuda_engine(serialized)

    def _load_plugin(self, trt, logger) -> None:
        from normexport.plugin import find_plugin_library, load_plugin

        trt.init_libnvinfer_plugins(logger, "")
        self.plugin_library = self.plugin_library or find_plugin_library()
        load_plugin(self.plugin_library)

    def _build(self, trt, logger, shapes: dict[str, tuple]) -> bytes:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)  # owns the weights: alive until the engine is built
        if not parser.parse_from_file(str(self.model)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise NormexportError(f"TensorRT's ONNX parser rejected {self.model}: {errors[:300]}", "TensorRT < 10.15 needs --target trt-plugin (and the plugin built); >= 10.15 takes --target onnx")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        self._set_precision(trt, config, network)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            profile.set_shape(name, shapes[name], shapes[name], shapes[name])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise NormexportError(f"TensorRT could not build an engine for {self.model}", "rerun with --debug and read TensorRT's log above")
        return bytes(serialized)

    def _set_precision(self, trt, config, network) -> None:
        if self.precision not in ("fp16", "bf16"):
            return
        config.set_flag(trt.BuilderFlag.FP16 if self.precision == "fp16" else trt.BuilderFlag.BF16)
        # Norms stay in fp32: fp16 squares overflow (TensorRT warns about exactly this).
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE):
                layer.precision = trt.float32


class TrtRunner(Runner):
    """Runs the engine a TrtEngineLoader gives for the feed's shapes (rebuilt only when the shapes change)."""

    name = "tensorrt"  # the backend record sets its own name

    def __init__(self, model: str | Path, precision: str = "fp32", plugin_library: str | Path | None = None, workspace_gb: float = 4.0, cache: bool = True):
        self.loader = TrtEngineLoader(model, precision, plugin_library, workspace_gb, cache)
        self.engine = None
        self.context = None
        self._shapes: dict[str, tuple] = {}
        self._inputs: list[str] = []
        self._outputs: list[str] = []

    def activate(self) -> None:
        self._trt, self._torch = _require()

    def deactivate(self) -> None:
        self.context = None
        self.engine = None
        self._shapes = {}

    @property
    def output_names(self) -> list[str]:
        return self.loader.graph.output_names

    def _prepare(self, feed: dict[str, np.ndarray]) -> None:
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        if self.engine is None or shapes != self._shapes:
            trt = self._trt
            self.engine = self.loader.load(trt, shapes)
            self.context = self.engine.create_execution_context()
            self._shapes = shapes
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _bind(self, feed: dict[str, np.ndarray]):
        """Copy the inputs to the GPU, allocate the outputs, give TensorRT their addresses."""
        trt, torch = self._trt, self._torch
        from normexport.runners.torch_runner import to_torch

        keep = []
        outs = {}
        for name in self._inputs:
            t = to_torch(feed[name]).cuda()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(name))
            t = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs[name] = t
        return outs, keep

    def _execute(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from normexport.runners.torch_runner import to_numpy

        self._prepare(feed)
        stream = self._torch.cuda.current_stream()
        outs, _keep = self._bind(feed)
        self._execute(stream)
        stream.synchronize()
        return {n: to_numpy(outs[n]) for n in self.output_names if n in outs}

    def time_once(self, feed: dict[str, np.ndarray]) -> float:
        """Device time of one execution, by CUDA events around it (inputs already on the GPU)."""
        torch = self._torch
        self._prepare(feed)
        stream = torch.cuda.current_stream()
        _outs, _keep = self._bind(feed)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        self._execute(stream)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _torch_dtype(torch, trt, dt):
    return {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.int8: torch.int8,
    }[dt]
