"""The zoo of RMSNorm styles x both torch exporters x opsets x targets: every norm fused, the
result loads in onnxruntime and matches PyTorch (graph optimizations off); the ONNX checker
accepts every `onnx`-target model (full check, shape inference)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import ort_helper
from models.zoo import DYNAMO_OPSETS, TORCHSCRIPT_OPSETS, ZOO
from normexport.export import export_onnx
from normexport.fuse import fuse_model
from normexport.load import LoadedModel, spec_of

CASES = [(name, "dynamo", opset) for name in ZOO for opset in DYNAMO_OPSETS] + [
    (name, "torchscript", opset) for name in ZOO for opset in TORCHSCRIPT_OPSETS
]


_session = ort_helper.session


def check_entry(entry, exporter: str, opset: int):
    model = entry.build()
    example = entry.example_inputs()
    loaded = LoadedModel(model, "state_dict", None, list(example), [spec_of(k, v) for k, v in example.items()])
    exp = export_onnx(loaded, example, opset, exporter=exporter)
    proto = ir.serde.serialize_model(exp.model)
    g = torch.Generator().manual_seed(7)
    fresh = {k: torch.randint(0, int(v.max()) + 1, v.shape, generator=g) for k, v in example.items()}
    with torch.no_grad():
        ref = model(*fresh.values()).double().numpy()
    feed = {k: v.numpy() for k, v in fresh.items()}
    for target in ("ort", "onnx"):
        m = ir.serde.deserialize_model(proto)
        report = fuse_model(m, target)
        fused = ir.serde.serialize_model(m)
        assert report.fused == entry.num_norms, (target, report.patterns, report.skipped)
        ops = [n.op_type for n in fused.graph.node]
        n_fused = sum(ops.count(op) for op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization"))
        assert n_fused == entry.num_norms, ops
        got = _session(fused).run(None, feed)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"{target}")
        if target == "onnx":
            onnx.checker.check_model(fused, full_check=True)


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter,opset", CASES, ids=[f"{n}-{e}-{o}" for n, e, o in CASES])
def test_zoo(name, exporter, opset):
    check_entry(ZOO[name], exporter, opset)


def _hf_cases():
    try:
        from models.hf_tiny import HF_UNAVAILABLE_REASON, HF_ZOO
    except Exception as e:  # transformers missing or incompatible
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"transformers unavailable: {e}"))]
    if not HF_ZOO:
        return [pytest.param(None, marks=pytest.mark.skip(reason=HF_UNAVAILABLE_REASON or "no HF models"))]
    return [pytest.param(name, id=name) for name in HF_ZOO]


@pytest.mark.slow
@pytest.mark.parametrize("name", _hf_cases())
def test_hf_tiny_dynamo(name):
    from models.hf_tiny import HF_ZOO

    entry = HF_ZOO[name]
    for opset in (18, 23):
        if hasattr(entry, "supports") and not entry.supports("dynamo", opset):
            continue
        check_entry(entry, "dynamo", opset)
