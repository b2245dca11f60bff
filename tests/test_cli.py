"""End to end through the CLI: the shipped model, a model of the tests' own in each of the four
input forms, and bad input (exit 2, one line and a hint, nothing written, nothing executed)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import ort_helper
import own_model
from cli_helper import invoke
from normexport.load import save_exported, save_torchscript

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "tinyllama.pt"
SHIPPED_NORMS = 9  # 4 blocks x 2 + final



@pytest.fixture(scope="module")
def shipped_convert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shipped")
    out, rep = tmp / "fused.onnx", tmp / "report.json"
    result = invoke("convert", SHIPPED, "-o", out, "--report", rep, "--iters", 10, "--warmup", 2)
    return result, out, rep


def test_convert_shipped_model_fuses_every_norm_validates_and_times(shipped_convert):
    result, out, rep = shipped_convert
    assert result.exit_code == 0, result.output + (result.stderr or "")
    report = json.loads(rep.read_text())
    for key in ("model", "target", "output", "fusion", "validation", "latency_ms"):
        assert key in report
    assert report["fusion"]["fused"] == SHIPPED_NORMS
    assert sum(report["fusion"]["patterns"].values()) == SHIPPED_NORMS
    assert report["validation"]["passed"] is True
    for o in report["validation"]["outputs"]:
        assert {"name", "max_abs", "max_rel", "cosine"} <= set(o)
        assert o["max_abs"] < 1e-3 and o["cosine"] > 0.99999
    for variant in ("torch", "onnx_unfused", "onnx_fused"):
        assert report["latency_ms"][variant]["median"] > 0
        assert report["latency_ms"][variant]["p90"] >= report["latency_ms"][variant]["median"]
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization") == SHIPPED_NORMS
    assert "ReduceMean" not in ops and "Sqrt" not in ops
    # the default backend (onnxruntime CPU): --residual-fusion auto keeps the residual Adds separate
    assert "SkipSimplifiedLayerNormalization" not in ops and "kept separate" in report["residual_layout"]
    assert "ort-cpu" in report["residual_layout"] and "residual Adds: kept separate" in result.output


def test_shipped_fused_output_matches_pytorch_on_fresh_inputs_and_other_shapes(shipped_convert):
    _, out, _ = shipped_convert
    from models.tinyllama import build  # the archive's module checks shapes; the eager one takes any

    module = build()
    for shape in ((1, 7), (3, 40)):  # dynamic batch and sequence
        ids = torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref = module(ids)["logits"].double().numpy()
        got = ort_helper.run(out, {"input_ids": ids.numpy()})[0]
        assert [o.name for o in onnx.load(out, load_external_data=False).graph.output] == ["logits"]  # the model's own name
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _own_forms(tmp: Path) -> dict[str, list]:
    m, ex = own_model.factory()
    save_torchscript(m, ex, tmp / "own_script.pt")
    save_exported(m, ex, tmp / "own_export.bin")  # content, not extension, tells the kind
    torch.save(m.state_dict(), tmp / "own_state.pt")
    torch.save(m, tmp / "own_pickle.pt")
    ids = "input_ids:int64:2x12:0,100"
    return {
        "torchscript": [tmp / "own_script.pt"],
        "export": [tmp / "own_export.bin"],
        "state_dict": [tmp / "own_state.pt", "--factory", "own_model:factory"],
        "pickle": [tmp / "own_pickle.pt", "--trust-pickle", "--input", ids, "--input", "bias:float32:2x12x48"],
    }


@pytest.mark.parametrize("form", ["torchscript", "export", "state_dict", "pickle"])
@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_convert_own_model_in_each_input_form(tmp_path, form, target):
    args = _own_forms(tmp_path)[form]
    out, rep = tmp_path / f"{form}.onnx", tmp_path / "r.json"
    result = invoke("convert", *args, "-o", out, "--target", target, "--report", rep, "--iters", 5, "--warmup", 1, cwd=Path(__file__).parent)
    assert result.exit_code == 0, result.output + (result.stderr or "")
    report = json.loads(rep.read_text())
    assert report["kind"] == form
    assert report["fusion"]["fused"] == own_model.NUM_NORMS
    assert report["validation"]["passed"]
    assert report["latency_ms"]["onnx_fused"]["median"] > 0
    # independent check: fused model vs PyTorch in float64 on a fresh draw
    m = own_model.build().double()
    g = torch.Generator().manual_seed(99)
    ids, bias = torch.randint(0, 100, (2, 12), generator=g), torch.randn(2, 12, 48, generator=g)
    with torch.no_grad():
        ref = m(ids, bias.double()).numpy()
    got = ort_helper.run(out, {"input_ids": ids.numpy(), "bias": bias.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    if target == "onnx":
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        assert [n.op_type for n in onnx.load(str(out)).graph.node].count("RMSNormalization") == own_model.NUM_NORMS


def test_convert_trt_plugin_target_one_plugin_node_per_norm(tmp_path):
    out = tmp_path / "trt.onnx"
    result = invoke("convert", SHIPPED, "-o", out, "--target", "trt-plugin", "--no-bench")
    assert result.exit_code == 0, result.output
    nodes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "RMSNorm"]
    assert len(nodes) == SHIPPED_NORMS
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"" and attrs["epsilon"] == pytest.approx(1e-6)
    assert "not validated" in result.output


# ---------------------------------------------------------------------------------------------
# Bad input


def _assert_clean_failure(result, out: Path, *words):
    assert result.exit_code == 2, result.output
    err = result.stderr
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    assert "Traceback" not in result.output + err
    for w in words:
        assert w in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and "partial" in p.name]


def test_missing_file(tmp_path):
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", tmp_path / "nope.pt", "-o", out), out, "no such file")


def test_text_file(tmp_path):
    f = tmp_path / "notes.pt"
    f.write_text("this is not a model\n")
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", f, "-o", out), out, "text file")


def test_truncated_archive(tmp_path):
    f = tmp_path / "cut.pt"
    data = SHIPPED.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", f, "-o", out), out, "truncated")


class _Evil:
    """Unpickling this would create a folder: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_without_trust_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker))}, f)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", f, "-o", out), out, "--trust-pickle")
    assert not marker.exists()


def test_whole_module_pickle_needs_trust(tmp_path):
    f = tmp_path / "m.pt"
    torch.save(own_model.build(), f)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", f, "-o", out, "--input", "input_ids:int64:2x12"), out, "--trust-pickle", "OwnModel")


@pytest.mark.parametrize(
    "spec,says",
    [
        ("input_ids", "malformed --input 'input_ids'"),
        ("input_ids:int64", "malformed --input 'input_ids:int64'"),
        ("input_ids:int65:1x16", "unknown dtype 'int65'"),
        ("input_ids:int64:1xx16", "malformed shape '1xx16'"),
        ("input_ids:int64:0x16", "shape 0x16 with no elements"),
        ("input_ids:int64:1x16:5,1", "empty range (5,1)"),
    ],
)
def test_malformed_input_option(tmp_path, spec, says):
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", SHIPPED, "-o", out, "--input", spec), out, says)


def test_state_dict_without_factory_and_with_wrong_factory(tmp_path):
    f = tmp_path / "sd.pt"
    torch.save(own_model.build().state_dict(), f)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", f, "-o", out), out, "--factory")
    bad = tmp_path / "bad.pt"
    sd = own_model.build().state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, bad)
    _assert_clean_failure(invoke("convert", bad, "-o", out, "--factory", "own_model:factory", cwd=Path(__file__).parent), out, "norm.weight", "extra.weight")


def test_model_without_rmsnorm(tmp_path):
    f = tmp_path / "plain.pt"
    m, ex = own_model.no_norm_factory()
    torch.save(m.state_dict(), f)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", f, "-o", out, "--factory", "own_model:no_norm_factory", cwd=Path(__file__).parent), out, "no RMSNorm")


def test_no_inputs_known_shows_the_flag(tmp_path):
    f = tmp_path / "m.pt"
    torch.save(own_model.build(), f)
    out = tmp_path / "o.onnx"
    _assert_clean_failure(invoke("convert", f, "-o", out, "--trust-pickle"), out, "--input NAME:DTYPE:SHAPE")


def test_shipped_file_is_what_its_script_makes(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "again.pt"
    subprocess.run([sys.executable, str(ROOT / "models" / "tinyllama.py"), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == SHIPPED.read_bytes()


def test_never_writes_over_the_input(tmp_path):
    f = tmp_path / "m.pt"
    shutil.copy(SHIPPED, f)
    before = f.read_bytes()
    result = invoke("convert", f, "-o", f)
    assert result.exit_code == 2 and f.read_bytes() == before


def test_cuda_backend_without_onnxruntime_gpu_is_exit_2_naming_the_package(tmp_path, shipped_convert):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu present: the CUDA backend exists here")
    _, out, _ = shipped_convert
    result = invoke("validate", SHIPPED, out, "--backend", "ort-cuda")
    assert result.exit_code == 2 and "onnxruntime-gpu" in result.stderr


def test_bench_reports_three_variants_norm_share_and_plot(tmp_path, shipped_convert):
    _, fused, _ = shipped_convert
    rep, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = invoke("bench", SHIPPED, fused, "--iters", 6, "--warmup", 1, "--report", rep, "--plot", png)
    assert result.exit_code == 0, result.output + result.stderr
    b = json.loads(rep.read_text())["bench"]
    for v in ("torch", "onnx_unfused", "onnx_fused"):
        lat = b["latency_ms"][v]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] and lat["iters"] == 6 and lat["runs_per_s"] > 0
    assert b["threads"] == 1 and b["input_sets"] == 3  # one thread unless --threads: steady timings
    assert any("by default" in n for n in b["notes"])
    assert set(b["norm_share"]) == {"onnx_unfused", "onnx_fused"}
    assert all(0 < s < 1 for s in b["norm_share"].values())
    assert "onnx_fused/onnx_unfused" in b["ratios"]
    assert "median ms" in result.output and "norm share" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_fuse_command_on_onnx_and_bad_onnx(tmp_path, shipped_convert):
    _, fused, _ = shipped_convert
    # the fused model fused again: same norms, nothing new
    out, rep = tmp_path / "again.onnx", tmp_path / "f.json"
    r = invoke("fuse", fused, "-o", out, "--report", rep)
    assert r.exit_code == 0, r.output + r.stderr
    f = json.loads(rep.read_text())["fusion"]
    assert f["fused"] == SHIPPED_NORMS and f["newly_fused"] == 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    _assert_clean_failure(invoke("fuse", bad, "-o", tmp_path / "x.onnx"), tmp_path / "x.onnx", "not a readable ONNX model")
    _assert_clean_failure(invoke("fuse", tmp_path / "missing.onnx", "-o", tmp_path / "x.onnx"), tmp_path / "x.onnx", "no such file")
