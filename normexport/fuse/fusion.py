"""The fusion itself: every RMSNorm subgraph of an ONNX model into one node of a target's op,
and the ONNX files it reads and writes (``normexport.fuse`` re-exports these names)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import _basics

from normexport.errors import NormexportError, first_line
from normexport.fuse import patterns as P
from normexport.fuse.files import check_acyclic, check_external_data, check_tensor_sizes, densify_sparse, read_model_proto, runtime_copy, runtime_load_error, write_inline
from normexport.fuse.names import Names
from normexport.fuse.ops import OPTIONAL_OUTPUT_NORMS
from normexport.fuse.report import FuseReport, Skipped
from normexport.fuse.shapes import infer_shapes
from normexport.fuse.registry import DEFAULT_TARGET, PLAIN_TARGET, RECORDS, Target, fold_residual, target_record
from normexport.fuse.targets import lower

MIN_IR_FOR_OPSET23 = 11


def fuse_model(model: ir.Model, target: str | Target = DEFAULT_TARGET, residual: bool = True, check_runtime: bool = True) -> FuseReport:
    """Rewrite ``model`` in place; every RMSNorm becomes one node of ``target``'s op.

    ``residual=False`` leaves a residual Add that feeds a norm as its own node instead of
    folding it into the fused op where the target has one (its record's ``folds_residual``);
    the runners' backend records say where folding pays off.

    ``check_runtime``: for targets any runtime runs, onnxruntime must load the fused model
    wherever it loads the input (a NormexportError otherwise)."""
    record = target_record(target)
    start = time.perf_counter()
    report = FuseReport(target=record.name, opset_before=model.opset_imports.get(""), nodes_before=_count(model))
    before = runtime_copy(model) if check_runtime and record.portable else None
    if record.opset:
        _raise_opset(model, report, record)
    shapes_failed = infer_shapes(model)  # (why strict inference failed, whether all of it did)
    names = Names(model)
    log = P.FusionLog()
    # Model-local functions are left as they are: their bodies have no initializers and opset
    # imports of their own, which a fused op would need.
    functions = dict(model.functions)
    model.functions.clear()
    try:
        for other in RECORDS:  # every target's fused form back into the internal node
            if other.importer is not None:
                other.importer(model, log, names)
        P.core_rules(log).apply_to_model(model)  # decompose too: every norm found is rewritten as canonical primitive ops
        tails = P.tail_rules(log)
        for _ in range(8):  # each pass absorbs at least one op per norm; a norm's tail is <= 4 ops
            if tails.apply_to_model(model) == 0:
                break
        report.skipped = find_near_misses(model)
        lower(model, record, log, names, residual=residual)
    finally:
        model.functions.update(functions)
    if functions:
        report.notes.append(f"{len(functions)} model-local function(s) not searched: a norm inside one is left as it is")
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    names.rename_new(model)
    drop_unread_outputs(model)
    if shapes_failed[0]:
        _shapes_failed(report, log, *shapes_failed)
    if not record.ops:
        for f in log.fused:
            f.op = record.label
    report.fused_norms = log.fused
    no_eps = sum(1 for f in log.fused if "no eps in graph" in f.pattern)
    if no_eps:
        report.notes.append(
            f"{no_eps} norm(s) have no eps in the graph and were fused with epsilon 0, as the graph computes: "
            "torch's dynamo exporter drops `+ eps` for |eps| <= 1e-8 (onnxscript's add_0 rule), so an all-zero row "
            "gives NaN where PyTorch gives 0"
        )
    if before is not None:
        _check_loads(model, before, report)
    report.opset_after = model.opset_imports.get("")
    report.nodes_after = _count(model)
    report.seconds = time.perf_counter() - start
    return report


def drop_unread_outputs(model: ir.Model) -> list[tuple[ir.Value, str]]:
    """Leave absent (an empty name) every optional output of a norm op (``OPTIONAL_OUTPUT_NORMS``:
    mean, inverse std, residual sum) that no node reads and that is not a graph output, in every
    graph: onnxruntime computes and allocates each output that is present. Returns the values
    cleared with their names."""
    dropped = []
    for node in (n for g in model.graphs() for n in g):
        if (node.domain, node.op_type) not in OPTIONAL_OUTPUT_NORMS:
            continue
        for out in node.outputs[1:]:
            if out.name and not out.uses() and not out.is_graph_output():
                dropped.append((out, out.name))
                out.name = ""
    return dropped


@contextlib.contextmanager
def unread_outputs_absent(model: ir.Model):
    """``drop_unread_outputs`` while writing, the names put back after: passes that name every
    value (onnx-ir's NameFixPass, which onnxscript's rewriter runs) make such outputs present
    again after the fusion, and the caller's model is left as it was."""
    dropped = drop_unread_outputs(model)
    try:
        yield
    finally:
        for value, name in dropped:
            value.name = name


def _check_loads(model: ir.Model, before: bytes, report: FuseReport) -> None:
    """onnxruntime (CPU, optimizations off) loads the fused model's structure, or the input's
    did not load either (said so in the report)."""
    after = runtime_copy(model)
    why = runtime_load_error(after) if after is not None else None
    if why is None:
        return
    if runtime_load_error(before) is None:
        raise NormexportError(
            f"the fused model does not load in onnxruntime though the input does ({why}); nothing written",
            "run `normexport inspect` on the input and report the model; --target decompose rewrites norms with primitive ops only",
        )
    report.notes.append(f"onnxruntime loads neither the input nor the fused model ({why}); not checked there")


def _shapes_failed(report: FuseReport, log: P.FusionLog, why: str, total: bool) -> None:
    """Shape inference failed. In full: the fusion ran on the shapes stored in the model, and
    where a check refused for want of a shape the result may differ from the fusion with
    shapes: fail. In strict mode only: the fusion ran on non-strict mode's shapes; said so."""
    blocked = len(log.shape_blocked)
    if total and blocked:
        raise NormexportError(
            f"ONNX shape inference failed on this model ({why}); without inferred shapes {blocked} check(s) "
            f"could not prove a norm's shapes (first: {log.shape_blocked[0]})",
            "check the model with onnx.checker.check_model(path, full_check=True), or store its value shapes (value_info)",
        )
    if total:
        report.notes.append(f"ONNX shape inference failed ({why}); no check needed an inferred shape, so the fusion is the same")
    else:
        report.notes.append(f"ONNX shape inference failed in strict mode ({why}); the fusion used non-strict mode's shapes"
                            + (f" ({blocked} check(s) found a shape unknown)" if blocked else ""))


def _count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


def _raise_opset(model: ir.Model, report: FuseReport, record) -> None:
    """Raise the model's default-domain opset to the one ``record``'s op needs."""
    opset, want, op = model.opset_imports.get("", 1), record.opset, record.label
    if opset >= want:
        return
    from onnxscript import version_converter

    plain = PLAIN_TARGET  # needs no opset change
    try:
        version_converter.convert_version(model, want, fallback=True)
    except Exception as e:  # the converter's own failure: the model cannot move to the opset
        raise NormexportError(
            f"cannot raise the model's opset from {opset} to {want} for {op} ({first_line(e, 200)})",
            f"use --target {plain.name} ({plain.label} needs no opset change), or export at --opset {want}",
        ) from None
    if model.opset_imports.get("", 1) < want:
        raise NormexportError(
            f"cannot raise the model's opset from {opset} to {want} for {op}",
            f"use --target {plain.name}, or export at --opset {want}",
        )
    model.ir_version = max(model.ir_version or 0, MIN_IR_FOR_OPSET23)
    report.notes.append(f"opset raised from {opset} to {want} for {op}")


def find_near_misses(model: ir.Model) -> list[Skipped]:
    """Every mean of a square that is still in the graph: the reason the pattern refused it.

    The reason comes from the pattern itself (onnxscript's matcher and our checks) run on
    the nodes downstream of the mean, so the report and the fusion cannot disagree."""
    graph = model.graph
    skipped = []
    rules = list(P.core_rules(P.FusionLog()))
    for node in graph:
        if node.op_type != "ReduceMean" or node.domain != "":
            continue
        src = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if src is None or not (src.op_type == "Pow" or (src.op_type == "Mul" and src.inputs[0] is src.inputs[1])):
            continue
        best, best_score = None, -1
        for root in _downstream(node, depth=4):
            if root.op_type not in ("Div", "Mul"):
                continue
            for rule in rules:
                tracer = _basics.MatchingTracer()
                rule.match(model, graph, root, tracer=tracer)
                for info in tracer.best_matches_map.get(rule, []):
                    if info.match_result.reason and info.score() > best_score:
                        best, best_score = info.match_result.reason, info.score()
        if best is None:
            best = "a mean of squares not followed by + eps, a square root and a division of the same input"
        skipped.append(Skipped(node.name or "ReduceMean", _plain(best), P.module_path(node)))
    return skipped


def _plain(reason: str) -> str:
    if "other uses" in reason:
        return "an intermediate value (the mean square, the root or the normalized input) has another consumer"
    return reason


def _downstream(node: ir.Node, depth: int):
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for out in n.outputs:
                for use in out.uses():
                    c = use.node
                    if id(c) not in seen:
                        seen.add(id(c))
                        nxt.append(c)
                        yield c
        frontier = nxt


# ---------------------------------------------------------------------------------------------
# Files


def load_onnx(path: str | Path) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise NormexportError(f"{path}: no such file", "check the path")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise NormexportError(f"{path} is a PyTorch file, not an ONNX model", "use `normexport convert` for PyTorch models")
    if os.path.getsize(path) == 0:
        raise NormexportError(f"{path} is empty (0 bytes), not an ONNX model", "pass an .onnx file (with its external data next to it)")
    try:
        proto = read_model_proto(path)
    except Exception as e:
        raise NormexportError(f"{path}: not a readable ONNX model ({first_line(e, 200)})", "pass an .onnx file (with its external data next to it)") from None
    check_proto(proto, path)
    try:
        # External data is not read here: tensors map their file when used.
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise NormexportError(f"{path}: not a readable ONNX model ({first_line(e, 200)})", "pass an .onnx file (with its external data next to it)") from None
    check_external_data(model, path)
    check_acyclic(model, path)
    return model


def check_proto(proto, source) -> None:
    """Before onnx_ir reads a ModelProto: it has a graph with outputs, its inline tensors hold
    the data they declare, and sparse initializers are made dense (in place)."""
    if not proto.HasField("graph") or not len(proto.graph.output):
        raise NormexportError(f"{source}: not an ONNX model (no graph with outputs)", "pass an .onnx file (with its external data next to it)")
    check_tensor_sizes(proto, source)
    densify_sparse(proto, source)


def checked_proto(proto):
    """``proto`` after ``check_proto``; a copy where sparse initializers are made dense (the
    caller's ModelProto is left as it is)."""
    from normexport.fuse.files import proto_graphs

    if proto.HasField("graph") and any(len(g.sparse_initializer) for g in proto_graphs(proto.graph)):
        copy = type(proto)()
        copy.CopyFrom(proto)
        proto = copy
    check_proto(proto, "the ONNX model")
    return proto


EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # stay clear of protobuf's 2 GB limit


def save_onnx(model: ir.Model, path: str | Path, external: bool | None = None) -> None:
    """Write atomically (normexport.outputs): into a fresh temp beside ``path``, fsynced, then
    renamed into place; norms' optional outputs that nothing reads are written absent. Models
    over ~2 GB get their weights in ``<name>.data`` next to the model; the data file is renamed
    into place before the model."""
    from normexport import outputs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    with unread_outputs_absent(model), contiguous_for_writing(model):
        if external:
            data = outputs.data_path(path)
            with outputs.staged(data, path) as tmpdir:
                ir.save(model, str(tmpdir / path.name), external_data=data.name)
        else:  # weights read lazily from the source's .data go into the file, one at a time
            outputs.write_with(path, lambda tmp: write_inline(model, tmp))


@contextlib.contextmanager
def contiguous_for_writing(model: ir.Model):
    """Initializers held as strided numpy views (torch.onnx folds a weight's Transpose into a
    view of the parameter) are written through a contiguous copy, one tensor at a time: numpy
    writes a strided array element by element, several times slower. The model is left as it
    was."""
    swapped = []
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.Tensor) and isinstance(t.raw, np.ndarray) and not t.raw.flags.c_contiguous:
            swapped.append((v, t))
            v.const_value = ir.LazyTensor(functools.partial(_contiguous, t), dtype=t.dtype, shape=t.shape, name=t.name)
    try:
        yield
    finally:
        for v, t in swapped:
            v.const_value = t


def _contiguous(t: ir.Tensor) -> ir.Tensor:
    """A contiguous copy of a strided tensor: torch's copy kernel where torch is loaded (it
    transposes several times faster than numpy), else numpy's."""
    torch = sys.modules.get("torch")
    try:
        data = torch.from_numpy(t.raw).contiguous().numpy() if torch is not None else np.ascontiguousarray(t.raw)
    except (TypeError, RuntimeError, ValueError):  # a dtype torch does not take (e.g. ml_dtypes' bfloat16)
        data = np.ascontiguousarray(t.raw)
    return ir.Tensor(data, dtype=t.dtype, name=t.name)


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def fuse_file(src: str | Path, dst: str | Path, target: str | Target = DEFAULT_TARGET, residual: str | bool = True, allow_none: bool = True) -> FuseReport:
    """Fuse the ONNX file ``src`` into ``dst`` (never over ``src``). ``residual``: True / on /
    auto fold residual Adds (with no backend to ask, auto folds), False / off keep them apart.
    ``allow_none=False`` refuses a model in which no RMSNorm was fused (unless the target emits
    primitive ops only: it takes any model)."""
    from normexport import outputs
    from normexport.fuse.report import require_norms
    from normexport.paths import require_regular_file

    record, fold = target_record(target), fold_residual(residual)
    src, dst = Path(src), Path(dst)
    outputs.check_distinct([src], [outputs.Output("dst", dst, "onnx")])
    model = load_onnx(require_regular_file(src, "ONNX"))
    report = fuse_model(model, record, residual=fold)
    if not allow_none and record.ops:
        require_norms(report, src, "run `normexport inspect` to see what normexport sees (--allow-none writes the model anyway)")
    save_onnx(model, dst)
    return report
