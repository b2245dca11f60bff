"""The model zoo: deterministic, runnable, norm counts right, and exportable to ONNX that
onnxruntime runs to the same outputs.

The fast tests export a representative subset; the full exporter x opset matrix (minutes) is
marked ``slow`` (deselect with ``-m "not slow"``). The transformers models need transformers.
"""

from __future__ import annotations

import collections
import contextlib
import io

import numpy as np
import onnx
import pytest
import torch

import ort_helper
from models import hf_tiny, zoo
from models.hf_tiny import HF_UNAVAILABLE_REASON, HF_ZOO
from models.zoo import DYNAMO_OPSETS, TORCHSCRIPT_OPSETS, ZOO, count_norm_calls, is_norm_module

ATOL = 1e-4
# The ops a norm leaves in an export: one ReduceMean per decomposed norm, or the fused op.
NORM_OPS = ("ReduceMean", "RMSNormalization", "SimplifiedLayerNormalization")


needs_transformers = pytest.mark.skipif(
    not HF_ZOO, reason=HF_UNAVAILABLE_REASON or "no transformers model classes available"
)


def export(model, inputs, exporter, opset, path, dynamic=False):
    ids = inputs["input_ids"]
    with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter prints progress
        if exporter == "dynamo":
            dynamic_shapes = None
            if dynamic:
                batch = torch.export.Dim("batch", min=1, max=8)
                seq = torch.export.Dim("seq", min=2, max=zoo.MAX_POSITIONS)
                dynamic_shapes = {"input_ids": {0: batch, 1: seq}}
            torch.onnx.export(
                model, (ids,), path, dynamo=True, opset_version=opset,
                external_data=False, dynamic_shapes=dynamic_shapes,
            )
        else:
            torch.onnx.export(
                model, (ids,), path, dynamo=False, opset_version=opset,
                input_names=["input_ids"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}} if dynamic else None,
            )
    return onnx.load(path)


def run_ort(path, ids: torch.Tensor) -> np.ndarray:
    session = ort_helper.session(path)  # the graph the exporter wrote, not what onnxruntime's optimizer makes of it
    return session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]


def check_export(entry, exporter, opset, tmp_path, dynamic=False):
    """Export, count the norm subgraphs, and compare onnxruntime with PyTorch."""
    model, inputs = entry.build(), entry.example_inputs()
    path = tmp_path / f"{entry.name}_{exporter}_{opset}.onnx"
    proto = export(model, inputs, exporter, opset, path, dynamic)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert sum(ops[op] for op in NORM_OPS) == entry.num_norms, dict(ops)

    feeds = [inputs["input_ids"]]
    if dynamic:
        feeds.append(torch.randint(0, zoo.VOCAB, (3, 9), generator=torch.Generator().manual_seed(1)))
    for ids in feeds:
        with torch.no_grad():
            expected = model(ids).numpy()
        np.testing.assert_allclose(run_ort(path, ids), expected, rtol=0, atol=ATOL)
    return ops


# ---------------------------------------------------------------------------------------------
# Every entry, cheap checks.


@pytest.fixture(params=sorted(ZOO), scope="module")
def entry(request):
    return ZOO[request.param]


def test_zoo_has_every_spelling():
    assert {
        "llama", "gemma", "olmo2", "t5", "torch_rmsnorm", "f_rms_norm", "tutorial",
        "with_bias", "nonparametric", "qk_norm", "pow_half",
    } <= set(ZOO)
    assert {1e-2, 1e-12} <= {e.eps for e in ZOO.values()}


def test_build_is_deterministic(entry):
    first, second = entry.build().state_dict(), entry.build().state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_build_leaves_global_rng_alone(entry):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    entry.build()
    assert torch.equal(torch.rand(3), expected)


def test_forward_runs_and_is_deterministic(entry):
    model, inputs = entry.build(), entry.example_inputs()
    assert not model.training
    ids = inputs["input_ids"]
    assert ids.dtype == torch.int64 and ids.dim() == 2
    with torch.no_grad():
        first, second = model(**inputs), model(**inputs)
    assert first.shape == (*ids.shape, zoo.VOCAB)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, zoo.MAX_POSITIONS)])
def test_forward_takes_any_batch_and_length(entry, shape):
    with torch.no_grad():
        out = entry.build()(torch.zeros(shape, dtype=torch.int64))
    assert out.shape == (*shape, zoo.VOCAB)


def test_num_norms_matches_norm_calls(entry):
    model, inputs = entry.build(), entry.example_inputs()
    assert count_norm_calls(model, inputs) == entry.num_norms


def test_norms_have_the_entry_eps_and_random_weights(entry):
    norms = [m for m in entry.build().modules() if is_norm_module(m)]
    assert norms
    for norm in norms:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:  # torch.nn.RMSNorm's default
            eps = torch.finfo(torch.float32).eps
        assert eps == entry.eps
        for name, param in norm.named_parameters():
            # neither ones nor zeros: a dropped or misplaced scale must change the output
            assert param.std() > 0.01, (type(norm).__name__, name)


def test_module_level_factory(entry):
    model, inputs = getattr(zoo, entry.name)()
    reference, reference_inputs = zoo.factory(entry.name)
    assert inputs.keys() == reference_inputs.keys()
    assert torch.equal(inputs["input_ids"], reference_inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs), reference(**inputs))


def test_factory_names_the_known_models():
    with pytest.raises(KeyError, match="llama"):
        zoo.factory("no_such_model")


# ---------------------------------------------------------------------------------------------
# Exports: a representative subset (each spelling family once, both exporters, both kinds of
# opset, one dynamic-shape export).

SUBSET = [
    ("llama", "dynamo", 18, True),
    ("llama", "dynamo", 23, False),
    ("gemma", "dynamo", 23, False),
    ("torch_rmsnorm", "dynamo", 23, False),
    ("with_bias", "dynamo", 17, False),
    ("pow_half", "dynamo", 23, False),
    ("qk_norm", "dynamo", 18, False),
    *[(name, "torchscript", 17, False) for name in sorted(ZOO) if ZOO[name].supports("torchscript", 17)],
    ("tutorial", "torchscript", 20, True),
]


@pytest.mark.parametrize("name,exporter,opset,dynamic", SUBSET)
def test_export_matches_onnxruntime(name, exporter, opset, dynamic, tmp_path):
    check_export(ZOO[name], exporter, opset, tmp_path, dynamic)


def test_dynamo_opset_23_emits_rms_normalization_for_llama(tmp_path):
    ops = check_export(ZOO["llama"], "dynamo", 23, tmp_path)
    assert ops["RMSNormalization"] == ZOO["llama"].num_norms


@pytest.mark.parametrize("name", [n for n in sorted(ZOO) if ZOO[n].unsupported])
def test_unsupported_exports_fail_as_recorded(name, tmp_path):
    entry = ZOO[name]
    (exporter, opset), reason = next(iter(entry.unsupported.items()))
    assert reason
    # In a fresh interpreter: normexport registers an aten::rms_norm symbolic for its own
    # TorchScript exports, and this test is about torch's exporter as it ships.
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from models.zoo import ZOO; from test_zoo import export\n"
        f"e = ZOO[{name!r}]; export(e.build(), e.example_inputs(), {exporter!r}, {opset}, sys.argv[3])\n"
    )
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", code, str(here.parent), str(here), str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "rms_norm" in proc.stderr, proc.stderr[-2000:]


# Every combination with the example's static shapes; dynamic batch and length at one opset
# per exporter below 23 and at 23 (where the exporter's own fusions change the graph).
MATRIX = [
    (name, exporter, opset, dynamic)
    for name in sorted(ZOO)
    for exporter, opsets in (("dynamo", DYNAMO_OPSETS), ("torchscript", TORCHSCRIPT_OPSETS))
    for opset in opsets
    for dynamic in ((False, True) if opset in (17, 23) else (False,))
]


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter,opset,dynamic", MATRIX)
def test_export_matrix(name, exporter, opset, dynamic, tmp_path):
    entry = ZOO[name]
    from normexport import export as ne_export

    if entry.supports(exporter, opset):
        check_export(entry, exporter, opset, tmp_path, dynamic)
        return
    # torch's TorchScript exporter as it ships has no aten::rms_norm (checked in a fresh
    # interpreter by test_unsupported_exports_fail_as_recorded); with normexport's symbolic
    # registered, as normexport's own TorchScript exports register it, it must export and match.
    assert exporter == "torchscript", entry.unsupported[(exporter, opset)]
    with ne_export._rms_norm_symbolic():
        check_export(entry, exporter, opset, tmp_path, dynamic)


# ---------------------------------------------------------------------------------------------
# Tiny transformers models (skipped without transformers).


@needs_transformers
@pytest.mark.parametrize("name", sorted(HF_ZOO))
def test_hf_model_builds_runs_and_counts_norms(name):
    entry = HF_ZOO[name]
    model, inputs = getattr(hf_tiny, name)()  # the `--factory models.hf_tiny:<name>` function
    first, second = entry.build().state_dict(), model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out).all()
    assert count_norm_calls(model, inputs) == entry.num_norms


@needs_transformers
def test_hf_llama_exports(tmp_path):
    check_export(HF_ZOO["hf_llama"], "dynamo", 23, tmp_path, dynamic=True)


# Static shapes at 18; dynamic batch and length where the wrapper's workarounds matter: dynamo at
# 23 (rotary fusion) and TorchScript (transformers' packed-sequence check).
HF_MATRIX = [
    (name, exporter, opset, dynamic)
    for name in sorted(HF_ZOO)
    for exporter, opset, dynamic in (("dynamo", 18, False), ("dynamo", 23, True), ("torchscript", 17, True))
]


@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("name,exporter,opset,dynamic", HF_MATRIX)
def test_hf_export_matrix(name, exporter, opset, dynamic, tmp_path):
    check_export(HF_ZOO[name], exporter, opset, tmp_path, dynamic)
