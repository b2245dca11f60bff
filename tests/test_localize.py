"""Module paths from the exporter's metadata equal PyTorch's ``named_modules()`` names, and
localisation pairs fused norms with PyTorch modules by those names: a perturbed norm weight
in the ONNX is named by `validate` (exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

from normexport.cli import main
from normexport.fuse import save_onnx
from normexport.fuse.patterns import module_path, scope_path
from normexport.localize import hookable_module, norm_output_values, torch_norm_outputs
from normexport.pipeline import ConvertOptions, LoadOptions, convert

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "tinyllama.pt"


def test_scope_path_from_full_paths_and_from_components():
    assert scope_path(["model", "model.layers", "model.layers.0", "model.layers.0.input_layernorm"]) == "model.layers.0.input_layernorm"
    assert scope_path(["model", "layers", "0", "input_layernorm"]) == "model.layers.0.input_layernorm"
    assert scope_path(["model", "layers.0", "model.layers.0.mlp"]) == "model.layers.0.mlp"
    assert scope_path(["", "norm"]) == "norm" and scope_path([]) == ""
    node = ir.Node("", "ReduceMean", [])
    node.metadata_props["pkg.torch.onnx.name_scopes"] = repr(["", "layers", "layers.0", "layers.0.input_norm", "mean_1"])
    assert module_path(node) == "layers.0.input_norm"


def _norm_names(module: torch.nn.Module, cls_fragment: str) -> list[str]:
    return [n for n, m in module.named_modules() if cls_fragment in type(m).__name__]


def _validate(model, fused: Path, report: Path, *extra):
    result = CliRunner().invoke(main, ["validate", str(model), str(fused), "--report", str(report), *map(str, extra)], catch_exceptions=False)
    return result.exit_code, json.loads(report.read_text())["validation"]


def _perturb(fused: Path, out: Path, weight: str, factor: float = 1.5) -> ir.Model:
    model = ir.load(str(fused))
    w = model.graph.initializers[weight]
    w.const_value = ir.tensor(w.const_value.numpy() * factor, name=w.name)
    save_onnx(model, out)
    return model


@pytest.fixture(scope="module")
def shipped_fused(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("localize_shipped")
    out = tmp / "fused.onnx"
    report = convert(SHIPPED, ConvertOptions(output=out, validate=None, bench=None))
    return report, out


def test_shipped_module_paths_are_pytorch_module_names(shipped_fused):
    from models.tinyllama import build

    report, out = shipped_fused
    names = _norm_names(build(), "RMSNorm")
    assert len(names) == 9
    assert [f.module for f in report.fusion.fused_norms] == names
    assert [mod for _, mod in norm_output_values(ir.load(str(out)))] == names


def test_shipped_norm_outputs_are_recorded_by_module_path(shipped_fused):
    from normexport.load import load_model

    _, out = shipped_fused
    loaded = load_model(SHIPPED)
    paths = [mod for _, mod in norm_output_values(ir.load(str(out)))]
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(11))
    records, mode = torch_norm_outputs(hookable_module(loaded), ["input_ids"], {"input_ids": ids.numpy()}, paths)
    assert mode == "name"
    assert [name for name, _ in records] == paths
    # each recorded output is that module's result in the eager model (hooked independently)
    from models.tinyllama import build

    eager, seen = build(), {}

    def keep(path):
        def hook(_m, _i, out):
            seen[path] = out.detach().numpy()

        return hook

    for path in paths:
        eager.get_submodule(path).register_forward_hook(keep(path))
    with torch.no_grad():
        eager(ids)
    for path, arr in records:
        torch.testing.assert_close(torch.from_numpy(arr), torch.from_numpy(seen[path]), rtol=1e-5, atol=1e-5)


def test_perturbed_norm_weight_is_named_by_validate(shipped_fused, tmp_path):
    _, out = shipped_fused
    bad = tmp_path / "bad.onnx"
    model = _perturb(out, bad, "layers.2.input_norm.gamma")
    code, v = _validate(SHIPPED, bad, tmp_path / "r.json")
    assert code == 1 and not v["passed"]
    assert v["first_divergent_norm"]["module"] == "layers.2.input_norm"
    norms = {n["module"]: n["passed"] for n in v["norms"]}
    assert all(norms[m] for m in ("layers.0.input_norm", "layers.0.post_attn_norm", "layers.1.input_norm", "layers.1.post_attn_norm"))
    # Pairing is by name: with the first norm's marking removed, pairing by order would be off
    # by one (8 fused norms, 9 PyTorch calls); by name the same norm is still named.
    first = next(n for n in model.graph if n.metadata_props.get("normexport.module") == "layers.0.input_norm")
    del first.metadata_props["normexport.role"]
    save_onnx(model, bad)
    code, v = _validate(SHIPPED, bad, tmp_path / "r2.json")
    assert code == 1 and v["first_divergent_norm"]["module"] == "layers.2.input_norm"
    assert len(v["norms"]) == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_llama", "hf_qwen3"])
def test_hf_module_paths_and_a_perturbed_norm_named(tmp_path, name):
    from models import hf_tiny

    if name not in hf_tiny.HF_ZOO:
        pytest.skip(hf_tiny.HF_UNAVAILABLE_REASON or f"this transformers has no {name}")
    module, _ = hf_tiny.factory(name)
    state = tmp_path / "state.pt"
    torch.save(module.state_dict(), state)
    out = tmp_path / "fused.onnx"
    report = convert(state, ConvertOptions(load=LoadOptions(factory=f"models.hf_tiny:{name}"), output=out, validate=None, bench=None))
    names = _norm_names(module, "RMSNorm")
    assert sorted(f.module for f in report.fusion.fused_norms) == sorted(names)
    target = next(n for n in names if n.endswith("layers.1.input_layernorm"))
    _perturb(out, tmp_path / "bad.onnx", f"{target}.weight", 1.3)
    code, v = _validate(state, tmp_path / "bad.onnx", tmp_path / "r.json", "--factory", f"models.hf_tiny:{name}")
    assert code == 1 and v["first_divergent_norm"]["module"] == target
