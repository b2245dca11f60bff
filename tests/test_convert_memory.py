"""What a folder conversion does to keep memory down and writing fast: the weights' pages go
back to the kernel between the steps (contents unchanged), and strided initializers are written
through contiguous copies (the same bytes as numpy's own layout, the model left as it was)."""

from __future__ import annotations

import mmap
import sys
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest

from normexport.fuse.fusion import save_onnx
from normexport.hf.memory import page_out_weights


def resident_kib(address: int) -> int:
    """Rss of the mapping that holds ``address`` (from /proc/self/smaps)."""
    current = False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            current = lo <= address < hi
        elif current and parts[0] == "Rss:":
            return int(parts[1])
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-out reads /proc/self/smaps (Linux)")
def test_weight_pages_leave_memory_and_read_back_the_same(tmp_path):
    data = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MiB
    (tmp_path / "model.safetensors").write_bytes(data.tobytes())
    (tmp_path / "other.bin.txt").write_bytes(data.tobytes())
    with open(tmp_path / "model.safetensors", "rb") as f, open(tmp_path / "other.bin.txt", "rb") as g:
        mine = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        other = mmap.mmap(g.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    view, other_view = np.frombuffer(mine, dtype=np.float32), np.frombuffer(other, dtype=np.float32)
    view.sum(), other_view.sum()  # every page touched
    start, other_start = view.ctypes.data, other_view.ctypes.data
    assert resident_kib(start) > 15 * 1024 and resident_kib(other_start) > 15 * 1024
    page_out_weights(SimpleNamespace(path=tmp_path))
    assert resident_kib(start) < 1024  # dropped: no page was written
    assert resident_kib(other_start) > 15 * 1024  # not a weights file: left alone
    np.testing.assert_array_equal(view, data)  # read back from the file
    view[0] = 123.0  # a written page (private): it must survive
    page_out_weights(SimpleNamespace(path=tmp_path))
    assert view[0] == 123.0 and np.array_equal(view[1:], data[1:])
    del view, other_view
    mine.close()
    other.close()


def test_strided_initializers_are_written_as_their_values(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    base = rng.standard_normal((80, 48)).astype(np.float32)  # a Linear's weight [out, in]
    strided = base.T  # what torch.onnx's folded Transpose holds: a view, [in, out]
    assert not strided.flags.c_contiguous
    x = ir.Value(name="x", shape=ir.Shape([2, 48]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.Tensor(strided, name="w"))
    w.shape, w.type = ir.Shape([48, 80]), ir.TensorType(ir.DataType.FLOAT)
    node = ir.node("MatMul", [x, w])
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    feed = rng.standard_normal((2, 48)).astype(np.float32)
    for external in (False, True):
        path = tmp_path / f"m{external}.onnx"
        save_onnx(model, path, external=external)
        assert w.const_value.raw is strided  # the model in memory is as it was
        np.testing.assert_array_equal(ir.load(str(path)).graph.initializers["w"].const_value.numpy(), base.T)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": feed})[0]
        np.testing.assert_allclose(got, feed.astype(np.float64) @ base.T.astype(np.float64), rtol=1e-4, atol=1e-4)
