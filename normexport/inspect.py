"""What normexport sees in a model: the RMSNorms it would fuse and the near-misses, with why.

ONNX files are fused on a copy (nothing is written). PyTorch models list their norm modules;
when example inputs are known the model is also exported and fused on a copy, and each
module is marked fused or not by the module path the exporter recorded.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from normexport.errors import NormexportError

NORM_WORDS = ("rmsnorm", "layernorm", "norm")


def inspect_path(path: Path, factory: str | None = None, trust_pickle: bool = False) -> dict:
    from normexport.hf import route_folder
    from normexport.load import require_regular_file

    path = Path(path)
    if route_folder(path):
        from normexport.hf.tools import inspect_folder, refuse_model_file_options

        refuse_model_file_options({"--factory": factory})
        return inspect_folder(path, trust_pickle)
    if path.is_dir():
        raise NormexportError(f"{path} is a directory with no config.json or safetensors, so not a Hugging Face model folder either", "pass an .onnx or PyTorch model file, or a folder save_pretrained wrote")
    path = require_regular_file(path)
    if _is_onnx(path):
        if factory is not None:
            raise NormexportError(f"{path} is an ONNX model; --factory is only for PyTorch state_dicts", "drop --factory")
        return inspect_onnx(path)
    return inspect_torch(path, factory, trust_pickle)


def _is_onnx(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return False
    from normexport.load import _looks_like_onnx

    return _looks_like_onnx(path)


def inspect_onnx(path: Path) -> dict:
    from normexport.fuse import fuse_model, load_onnx
    from normexport.fuse.registry import PLAIN_TARGET

    model = load_onnx(path)
    report = fuse_model(model, PLAIN_TARGET)
    return {
        "model": str(path),
        "kind": "onnx",
        "opset": report.opset_before,
        "norms": [_norm_json(f) for f in report.fused_norms],
        "near_misses": [asdict(s) for s in report.skipped],
        "patterns": report.patterns,
    }


def _norm_json(f) -> dict:
    return {"module": f.module, "pattern": f.pattern, "epsilon": f.epsilon, "axis": f.axis, "dtype": f.dtype, "scale": f.scale, "bias": f.bias, "residual": f.residual}


def inspect_torch(path: Path, factory: str | None, trust_pickle: bool) -> dict:
    from normexport.load import load_model, make_inputs

    loaded = load_model(path, factory=factory, trust_pickle=trust_pickle)
    modules = []
    for name, m in loaded.module.named_modules():
        cls = getattr(m, "original_name", None) or type(m).__name__
        if not name or not any(w in cls.lower() for w in NORM_WORDS):
            continue
        eps = next((getattr(m, a) for a in ("eps", "variance_epsilon", "epsilon") if isinstance(getattr(m, a, None), (float, int))), None)
        weight = next((tuple(getattr(m, a).shape) for a in ("weight", "gamma", "scale", "g") if hasattr(m, a) and hasattr(getattr(m, a), "shape")), None)
        modules.append({"module": name, "class": cls, "eps": eps, "weight": list(weight) if weight else None, "status": "not checked", "reason": ""})
    result = {"model": str(path), "kind": loaded.kind, "modules": modules, "norms": [], "near_misses": [], "notes": []}
    if not loaded.input_specs:
        result["notes"].append("no example inputs known: modules listed by class only (give --input to convert for the ONNX view)")
        return result
    from normexport.export import export_onnx
    from normexport.fuse import fuse_model
    from normexport.fuse.registry import PLAIN_TARGET

    exp = export_onnx(loaded, make_inputs(loaded.input_specs, 0))
    report = fuse_model(exp.model, PLAIN_TARGET)
    result["norms"] = [_norm_json(f) for f in report.fused_norms]
    result["near_misses"] = [asdict(s) for s in report.skipped]
    fused_modules = {f.module for f in report.fused_norms if f.module}
    rms_modules = [m for m in modules if "layernorm" not in m["class"].lower()]
    if any(m["module"] not in fused_modules for m in rms_modules) and len(rms_modules) == report.fused:
        # Some exporters record only part of the scope (TorchScript inlines loops): with one
        # fused norm per norm module, pair them in order.
        fused_modules |= {m["module"] for m in rms_modules}
        result["notes"].append("norm modules paired with fused norms by order (the export recorded partial module names)")
    missed = {s.module: s.reason for s in report.skipped if s.module}
    for m in modules:
        if m["module"] in fused_modules:
            m["status"] = "fused"
        elif m["module"] in missed:
            m["status"], m["reason"] = "near-miss", missed[m["module"]]
        elif "layernorm" in m["class"].lower():
            m["status"], m["reason"] = "not an RMSNorm", "LayerNorm subtracts the mean (`normexport ln2rms` converts Pre-LN models)"
        else:
            m["status"] = "not found in the export" if fused_modules else "unknown (the exporter recorded no module names)"
    result["notes"].append(f"exported with the {exp.exporter} exporter at opset {exp.opset} and fused on a copy (target {PLAIN_TARGET.name})")
    return result
