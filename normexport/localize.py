"""Name the first fused norm whose output diverges from PyTorch.

PyTorch side: forward hooks on the norm modules record their outputs in call order. ONNX side:
the values the fusion marked as norm outputs (``normexport.role = norm-output``) are added as
graph outputs and the fused model is run on the same feed. Norms pair by the module path the
exporter recorded where every fused norm has one that names a submodule, else by order.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from normexport.errors import NormexportError
from normexport.fuse.registry import FUSED_OPS
from normexport.inputs import call_module
from normexport.validate import NormDivergence, compare_arrays

NORM_CLASS = re.compile(r"(rms|layer|simplified).?norm|norm$", re.IGNORECASE)


def norm_output_values(model: ir.Model) -> list[tuple[ir.Value, str]]:
    """(value, module path) of each fused norm's result, in graph order."""
    found = []
    for node in model.graph:
        role = node.metadata_props.get("normexport.role")
        if role == "norm-output" or (role is None and node.op_type in FUSED_OPS and "normexport.pattern" not in node.metadata_props):
            found.append((node.outputs[0], node.metadata_props.get("normexport.module", "")))
    return found


def hookable_module(loaded):
    """The module to hook: a torch.export archive's graph, unflattened back into submodules
    at their original paths (``ExportedProgram.module()`` is one flat graph)."""
    if getattr(loaded, "exported_program", None) is not None:
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
            try:
                return torch.export.unflatten(loaded.exported_program)
            except Exception:  # a program torch cannot unflatten: its flat graph has no norm modules to hook
                return loaded.module
    return loaded.module


def norm_modules(module, paths: list[str]) -> tuple[list[tuple[str, object]], str]:
    """The modules to hook and how they pair with the fused norms: by the module paths the
    exporter recorded ("name") where every one is a submodule, else the innermost modules
    whose class names a norm, in call order ("order")."""
    by_name = dict(module.named_modules())
    if paths and all(p and p in by_name for p in paths):
        return [(p, by_name[p]) for p in dict.fromkeys(paths)], "name"
    named = [(n, m) for n, m in by_name.items() if n and NORM_CLASS.search(type(m).__name__ if not hasattr(m, "original_name") else m.original_name)]
    # Keep the innermost norm modules only (a wrapper "Norm" around an RMSNorm would double count).
    leaf = [(n, m) for n, m in named if not any(o != n and o.startswith(n + ".") for o, _ in named)]
    return leaf, "order"


def _module_result(m, out):
    """The tensor a module returned. An unflattened submodule returns every value used
    outside it; its result is the one computed last in its graph."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and hasattr(m, "graph"):
        order = {node: i for i, node in enumerate(m.graph.nodes)}
        results = next(n for n in m.graph.nodes if n.op == "output").args[0]
        if isinstance(results, (list, tuple)) and len(results) == len(out):
            last = max(range(len(out)), key=lambda i: order.get(results[i], -1))
            return out[last] if isinstance(out[last], torch.Tensor) else None
    return None


def torch_norm_outputs(module, input_names: list[str], feed: dict[str, np.ndarray], paths: list[str] | None = None) -> tuple[list[tuple[str, np.ndarray]], str]:
    """(module path, output) of each norm module call, in call order, and the pairing mode
    (see ``norm_modules``)."""
    import torch

    from normexport.runners.torch_runner import to_numpy, to_torch

    modules, mode = norm_modules(module, paths or [])
    records: list[tuple[str, np.ndarray]] = []
    handles = []
    for name, m in modules:
        def hook(m_, _inp, out, name=name):
            result = _module_result(m_, out)
            if result is not None:
                records.append((name, to_numpy(result)))
        try:
            handles.append(m.register_forward_hook(hook))
        except Exception:  # ScriptModules take no hooks
            pass
    try:
        inputs = {n: to_torch(feed[n]) for n in input_names}
        with torch.inference_mode():
            if hasattr(module, "module_call_graph"):  # an unflattened torch.export program: its exported order
                module(*inputs.values())
            else:
                call_module(module, inputs)
    finally:
        for h in handles:
            h.remove()
    return records, mode


def pair_norms(norms: list[tuple[object, str]], torch_outs: list[tuple[str, np.ndarray]], mode: str) -> list[tuple[str, np.ndarray]]:
    """The PyTorch (module path, output) for each fused norm: by path, or by position."""
    if mode == "name":
        by_module = {name: arr for name, arr in torch_outs}
        if all(mod in by_module for _, mod in norms):
            return [(mod, by_module[mod]) for _, mod in norms]
    if len(norms) != len(torch_outs):
        raise NormexportError(f"{len(norms)} fused norms but {len(torch_outs)} norm calls in PyTorch, and no module names to pair them by", "the output comparison stands on its own; a model fused by normexport from its PyTorch export names each norm's module")
    return list(torch_outs)


def localize(loaded, input_names: list[str], fused_path: Path, feed: dict[str, np.ndarray], opts) -> tuple[list[NormDivergence], NormDivergence | None]:
    from normexport.runners import onnxruntime_backend
    from normexport.runners.ort import OrtRunner

    model = ir.load(str(fused_path))
    norms = norm_output_values(model)
    if not norms:
        raise NormexportError("the fused model has no marked norm outputs", "fuse it with normexport")
    torch_outs, mode = torch_norm_outputs(hookable_module(loaded), input_names, feed, [mod for _, mod in norms])
    if not torch_outs:
        raise NormexportError("no norm module outputs could be recorded in PyTorch (hooks need an nn.Module with *Norm classes)", "load the model as a state_dict with --factory")
    refs = pair_norms(norms, torch_outs, mode)
    existing = {v.name for v in model.graph.outputs}
    for value, _ in norms:
        if value.name not in existing:
            model.graph.outputs.append(value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        ir.save(model, str(path))
        with OrtRunner(path, onnxruntime_backend(opts.record), optimize=False, threads=opts.threads) as r:
            got = r.infer(feed)
    results = []
    for i, ((value, _), (ref_name, ref)) in enumerate(zip(norms, refs)):
        arr = got[value.name]
        c = compare_arrays(value.name, ref, arr.reshape(ref.shape) if arr.size == ref.size else arr, opts.atol, opts.rtol)
        results.append(NormDivergence(i, ref_name, value.name, c.max_abs, c.max_rel, c.cosine, c.passed))
    first = next((r for r in results if not r.passed), None)
    return results, first
