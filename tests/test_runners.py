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
