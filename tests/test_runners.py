"""One contract for every runner: a context manager whose infer(feed) returns a dict of
name -> numpy array, the same names every call, and outputs that agree across backends."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import own_model
from normexport.errors import NormexportError
from normexport.export import export_onnx
from normexport.fuse import fuse_model, save_onnx
from normexport.load import LoadedModel, make_inputs, spec_of
from normexport.runners import TorchRunner, make_onnx_runner
from normexport.runners.torch_runner import to_numpy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runners")
    m, ex = own_model.factory()
    loaded = LoadedModel(m, "state_dict", None, list(ex), [spec_of(k, v) for k, v in ex.items()])
    exp = export_onnx(loaded, ex)
    path = tmp / "fused.onnx"
    fuse_model(exp.model, "ort")
    save_onnx(exp.model, path)
    feed = {k: to_numpy(v) for k, v in make_inputs(loaded.input_specs, 5).items()}
    return loaded, path, feed, exp.output_names


def _available(backend: str) -> str | None:
    provs = ort.get_available_providers()
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in provs:
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if backend == "ort-trt" and "TensorrtExecutionProvider" not in provs:
        return "onnxruntime has no TensorrtExecutionProvider"
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except Exception as e:
            return f"tensorrt is not importable here ({type(e).__name__})"
    return None


def _runner(kind, loaded, path, names):
    if kind == "torch":
        return TorchRunner(loaded.module, loaded.input_names, names)
    if kind == "ort-cpu-noopt":
        return make_onnx_runner(path, "ort-cpu", optimize=False)
    return make_onnx_runner(path, kind)


@pytest.mark.parametrize("kind", ["torch", "ort-cpu", "ort-cpu-noopt", "ort-cuda", "ort-trt", "trt"])
def test_runner_contract(setup, kind):
    why = _available(kind)
    if why:
        pytest.skip(why)
    loaded, path, feed, names = setup
    reference = TorchRunner(loaded.module, loaded.input_names, names)
    with reference:
        ref = reference.infer(feed)
    with _runner(kind, loaded, path, names) as r:
        a = r.infer(feed)
        b = r.infer(feed)
        assert list(a) == list(b) == r.output_names == names
        for n in names:
            assert isinstance(a[n], np.ndarray)
            np.testing.assert_array_equal(a[n], b[n])  # deterministic
            np.testing.assert_allclose(a[n], ref[n], rtol=1e-3, atol=1e-3 * np.abs(ref[n]).max())
        assert r.time_once(feed) > 0


def test_missing_gpu_provider_is_a_clear_error(setup):
    _, path, _, _ = setup
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(NormexportError, match="onnxruntime-gpu"):
        with make_onnx_runner(path, "ort-cuda"):
            pass


def test_trt_runner_reads_the_onnx_graph_once(setup, monkeypatch, tmp_path):
    # CPU-only: no engine is built. The runner's output names come from one read of the ONNX file, however often
    # they are asked for (infer() asks on every call), and the loader sees whether the plugin is needed.
    import onnx
    from onnx import TensorProto, helper

    from normexport.fuse.targets import TRT_DOMAIN, TRT_PLUGIN_NAME
    from normexport.runners import trt

    _, path, _, names = setup
    reads = []
    real_load = onnx.load_model
    monkeypatch.setattr(onnx, "load_model", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    runner = trt.TrtRunner(path)
    for _ in range(3):
        assert runner.output_names == names
    assert reads == [str(path)]
    assert runner.loader.graph.has_plugin_nodes is False

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    g = helper.make_tensor_value_info("g", TensorProto.FLOAT, [8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    node = helper.make_node(TRT_PLUGIN_NAME, ["x", "g"], ["y"], domain=TRT_DOMAIN, epsilon=1e-5)
    plugin_path = tmp_path / "plugin.onnx"
    onnx.save_model(helper.make_model(helper.make_graph([node], "g", [x, g], [y])), str(plugin_path))
    loader = trt.TrtEngineLoader(plugin_path)
    assert loader.graph == trt.GraphInfo(["y"], True)


def test_engine_cache_write_leaves_only_the_whole_file(tmp_path):
    from normexport.runners import trt

    cache = tmp_path / "engines" / "key.engine"
    data = np.random.default_rng().bytes(4096)
    trt.write_engine_cache(cache, data)
    assert cache.read_bytes() == data and list(cache.parent.iterdir()) == [cache]
