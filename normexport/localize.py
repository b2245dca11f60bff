"""Name the first fused norm whose output diverges from PyTorch.

PyTorch side: forward hooks on the norm modules record their outputs in call order. ONNX side:
the values the fusion marked as norm outputs (``normexport.role = norm-output``) are added as
graph outputs and the fused model is run on the same feed. Norms pair by the module path the
exporter recorded where there is one, else by order.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from normexport.errors import NormexportError
from normexport.validate import NormDivergence, compare_arrays

NORM_CLASS = re.compile(r"(rms|layer|simplified).?norm|norm$", re.IGNORECASE)
FUSED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization", "RMSNorm"}


def norm_output_values(model: ir.Model) -> list[tuple[ir.Value, str]]:
    """(value, module path) of each fused norm's result, in graph order."""
    found = []
    for node in model.graph:
        role = node.metadata_props.get("normexport.role")
        if role == "norm-output" or (role is None and node.op_type in FUSED_OPS and "normexport.pattern" not in node.metadata_props):
            found.append((node.outputs[0], node.metadata_props.get("normexport.module", "")))
    return found


def torch_norm_outputs(module, input_names: list[str], feed: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    import torch

    from normexport.runners.torch_runner import to_numpy, to_torch

    named = [(n, m) for n, m in module.named_modules() if n and NORM_CLASS.search(type(m).__name__ if not hasattr(m, "original_name") else m.original_name)]
    # Keep the innermost norm modules only (a wrapper "Norm" around an RMSNorm would double count).
    leaf = [(n, m) for n, m in named if not any(o != n and o.startswith(n + ".") for o, _ in named)]
    records: list[tuple[str, np.ndarray]] = []
    handles = []
    for name, m in leaf:
        def hook(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor):
                records.append((name, to_numpy(out)))
        try:
            handles.append(m.register_forward_hook(hook))
        except Exception:  # ScriptModules take no hooks
            pass
    try:
        with torch.inference_mode():
            module(*[to_torch(feed[n]) for n in input_names])
    finally:
        for h in handles:
            h.remove()
    return records


def localize(loaded, input_names: list[str], fused_path: Path, feed: dict[str, np.ndarray], opts) -> tuple[list[NormDivergence], NormDivergence | None]:
    from normexport.runners.ort import OrtRunner

    torch_outs = torch_norm_outputs(loaded.module, input_names, feed)
    if not torch_outs:
        raise NormexportError("no norm module outputs could be recorded in PyTorch (hooks need an nn.Module with *Norm classes)", "load the model as a state_dict with --factory")
    model = ir.load(str(fused_path))
    norms = norm_output_values(model)
    if not norms:
        raise NormexportError("the fused model has no marked norm outputs", "fuse it with normexport")
    existing = {v.name for v in model.graph.outputs}
    for value, _ in norms:
        if value.name not in existing:
            model.graph.outputs.append(value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        ir.save(model, str(path))
        with OrtRunner(path, opts.backend if opts.backend.startswith("ort") else "ort-cpu", optimize=False, threads=opts.threads) as r:
            got = r.infer(feed)
    by_module = {name: arr for name, arr in torch_outs}
    paired = []
    use_names = all(mod in by_module for _, mod in norms)
    if not use_names and len(norms) != len(torch_outs):
        raise NormexportError(f"{len(norms)} fused norms but {len(torch_outs)} norm calls in PyTorch, and no module names to pair them by", "compare outputs only (--no-localize)")
    for i, (value, mod) in enumerate(norms):
        if use_names:
            ref_name, ref = mod, by_module[mod]
        else:
            ref_name, ref = torch_outs[i]
        paired.append((i, ref_name, value.name, ref, got[value.name]))
    results = []
    for i, ref_name, node_name, ref, arr in paired:
        c = compare_arrays(node_name, ref, arr.reshape(ref.shape) if arr.size == ref.size else arr, opts.atol, opts.rtol)
        results.append(NormDivergence(i, ref_name, node_name, c.max_abs, c.max_rel, c.cosine, c.passed))
    first = next((r for r in results if not r.passed), None)
    return results, first
