"""Run each fused norm alone on rows no model input reaches, against a float64 RMSNorm.

A model fed token ids never shows a norm a large-magnitude row, yet fp16 norm kernels that
square in fp16 overflow there (300² > 65504) and return Inf, NaN or zeros. So each fused norm
is cut out of the fused model (and, where given, its subgraph out of the unfused export) as a
small ONNX model whose inputs are the norm's input(s) — x, or x and the residual where the Add
was folded in — and whose weights are initializers, and run on the chosen backend on:

    ordinary rows (N(0, 1)), rows scaled to max |x| = each of the dtype's large magnitudes,
    tiny rows (max |x| = 1e-4, where eps dominates) and all-zero rows.

The fused norm must match y = x / sqrt(mean(x²) + eps) · g (+ bias), computed in float64 with
the eps and weights read from the fused node, on every row; and the unfused subgraph on the
rows every implementation handles (ordinary, tiny, zero), so that a fusion that changed the
maths is caught even where the reference, read from the fused node, shares its mistake.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from normexport.errors import NormexportError, first_line
from normexport.fuse.registry import FUSED_OPS, RESIDUAL_OPS
from normexport.runners import DEFAULT_BACKEND
from normexport.validate import OutputComparison, compare_arrays, default_tolerance

# Row magnitudes (max |x|) per input dtype: fp16's squares overflow from 256 on, and 3e4 is
# near its largest value; bf16 and fp32 share fp32's exponent range.
LARGE_MAGNITUDES = {"float16": (300.0, 3e4), "bfloat16": (300.0, 1e15), "float32": (300.0, 1e15), "float64": (300.0, 1e15)}
TINY = 1e-4
DYNAMIC_DIMS = (2, 64)  # batch, sequence for dims the model leaves symbolic; 1 beyond
IN_RANGE = ("ordinary", "tiny", "zero")  # rows every correct implementation handles


@dataclass
class NormSite:
    """One fused norm in the fused model: where its result is and what feeds it."""

    index: int
    module: str
    output: str  # value name of the norm's result
    inputs: list[str]  # x, or the two addends of a folded residual
    op: str  # the fused op, or "primitive ops"
    skip_bias: str | None = None  # a residual op's bias input (added to the sum)


@dataclass
class NormParams:
    epsilon: float
    axis: int
    scale: np.ndarray | None
    bias: np.ndarray | None


@dataclass
class NormStress:
    index: int
    module: str
    node: str
    op: str
    dtype: str
    shape: list[int]
    epsilon: float
    max_input: float
    passed: bool
    failed_rows: list[str] = field(default_factory=list)  # row kinds where the fused norm is off
    vs_reference: OutputComparison | None = None
    vs_unfused: OutputComparison | None = None  # on the in-range rows
    unfused_matches_reference: bool | None = None  # all rows; informative only
    unfused_note: str = ""

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("index", "module", "node", "op", "dtype", "shape", "epsilon", "max_input", "passed", "failed_rows", "unfused_matches_reference", "unfused_note")}
        out["vs_reference"] = self.vs_reference.to_json() if self.vs_reference else None
        out["vs_unfused"] = self.vs_unfused.to_json() if self.vs_unfused else None
        return out


@dataclass
class StressReport:
    backend: str
    norms: list[NormStress] = field(default_factory=list)
    not_checked: list[tuple[str, str]] = field(default_factory=list)  # (norm, reason)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(n.passed for n in self.norms)

    @property
    def failed(self) -> list[NormStress]:
        return [n for n in self.norms if not n.passed]

    def to_json(self) -> dict:
        return {
            "passed": self.passed if self.norms else None,  # None: no norm could be checked
            "backend": self.backend,
            "checked": len(self.norms),
            "failed": [n.module or n.node for n in self.failed],
            "norms": [n.to_json() for n in self.norms],
            "not_checked": [{"norm": n, "reason": r} for n, r in self.not_checked],
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------
# Where the fused norms are


def _tagged(node: ir.Node) -> bool:
    return "normexport.pattern" in node.metadata_props


def norm_sites(model: ir.Model) -> list[NormSite]:
    """Every norm the fusion marked (``normexport.role = norm-output``), and every fused norm
    op another tool wrote, with the inputs that feed its nodes from outside them."""
    sites = []
    for node in model.graph:
        foreign = node.op_type in FUSED_OPS and not _tagged(node)
        if node.metadata_props.get("normexport.role") != "norm-output" and not foreign:
            continue
        inputs, core = _group_inputs(node)
        skip_bias = None
        if core is not None and core.op_type in RESIDUAL_OPS and len(core.inputs) > 3 and core.inputs[3] is not None:
            skip_bias = core.inputs[3].name
        sites.append(NormSite(len(sites), node.metadata_props.get("normexport.module", ""), node.outputs[0].name, inputs, core.op_type if core else "primitive ops", skip_bias))
    return sites


def _group_inputs(final: ir.Node) -> tuple[list[str], ir.Node | None]:
    """Walk back from a norm's last node through the nodes the fusion wrote for it; stop at
    constants, at untagged producers and at another norm (its marked result, or a second
    fused op: a folded residual's sum comes from the previous norm)."""
    inputs: list[str] = []
    core = final if final.op_type in FUSED_OPS else None
    todo, seen = [final], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        data = list(node.inputs)
        if node.op_type in FUSED_OPS:
            data = data[:2] if node.op_type in RESIDUAL_OPS else data[:1]
        for value in data:
            if value is None or (value.const_value is not None and not value.is_graph_input()):
                continue
            src = value.producer()
            other_norm = src is not None and (src.metadata_props.get("normexport.role") == "norm-output" or (src.op_type in FUSED_OPS and core is not None))
            if src is None or not _tagged(src) or other_norm:
                if value.name not in inputs:
                    inputs.append(value.name)
                continue
            if src.op_type in FUSED_OPS:
                core = src
            todo.append(src)
    return inputs, core


def cut(extractor: onnx.utils.Extractor, inputs: list[str], output: str) -> onnx.ModelProto:
    """The subgraph from ``inputs`` to ``output`` as a model of its own (weights included)."""
    sub = extractor.extract_model(inputs, [output])
    missing = [i.name for i in sub.graph.input if i.name not in inputs and i.name not in {t.name for t in sub.graph.initializer}]
    if missing:
        raise ValueError(f"it also depends on {', '.join(missing)}")
    return sub


# ---------------------------------------------------------------------------------------------
# eps and weights, read by normexport's own matcher from the cut-out fused norm


def norm_params(sub: onnx.ModelProto) -> NormParams:
    """eps, axis, scale and bias of the one norm in ``sub``: fused again for onnxruntime with
    the residual kept apart, which turns any spelling (fused op, primitive ops) into one node
    of the default target's plain op whose attributes and initializers say them."""
    from normexport.fuse import fuse_model
    from normexport.fuse.registry import PLAIN_TARGET as plain
    from normexport.fuse.targets import fold_constant

    model = ir.serde.deserialize_model(sub)
    report = fuse_model(model, plain, residual=False)
    nodes = [n for n in model.graph if n.op_type == plain.ops[0]]
    if report.fused != 1 or len(nodes) != 1:
        raise ValueError(f"normexport finds {report.fused} RMSNorm(s) in it, not one")
    node = nodes[0]
    eps = node.attributes.get("epsilon")
    axis = node.attributes.get("axis")
    scale = _value_of(node.inputs[1], fold_constant) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    bias = None
    if report.fused_norms[0].bias:
        bias = _bias_after(node, fold_constant)
        if bias is None:
            raise ValueError("its bias is not a constant")
    return NormParams(float(eps.value) if eps is not None else 1e-5, int(axis.value) if axis is not None else -1, scale, bias)


def _value_of(value: ir.Value, fold) -> np.ndarray:
    if value.const_value is not None:
        return value.const_value.numpy().astype(np.float64)
    folded = fold(value)
    if folded is None:
        raise ValueError(f"its scale {value.name} is not a constant")
    return np.asarray(folded, dtype=np.float64)


def _bias_after(node: ir.Node, fold) -> np.ndarray | None:
    value = node.outputs[0]
    for _ in range(3):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        user = uses[0].node
        if user.op_type == "Add":
            other = user.inputs[1] if user.inputs[0] is value else user.inputs[0]
            return _value_of(other, fold)
        if user.op_type != "Cast":
            return None
        value = user.outputs[0]
    return None


# ---------------------------------------------------------------------------------------------
# Rows, reference, checks


def row_kinds(dtype: str) -> list[str]:
    return ["ordinary", *[f"max |x| {m:g}" for m in LARGE_MAGNITUDES.get(dtype, LARGE_MAGNITUDES["float32"])], "tiny", "zero"]


def concrete_shape(shape: list, axis: int) -> list[int]:
    """Symbolic leading dims become DYNAMIC_DIMS; the normalized dims must be known."""
    axis = axis % len(shape)
    if not all(isinstance(d, int) and d > 0 for d in shape[axis:]):
        raise ValueError(f"its normalized dims {shape[axis:]} are not known")
    lead = [d if isinstance(d, int) and d > 0 else (DYNAMIC_DIMS[i] if i < len(DYNAMIC_DIMS) else 1) for i, d in enumerate(shape[:axis])]
    return lead + [int(d) for d in shape[axis:]]


def stress_rows(shape: list[int], axis: int, dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """x of ``shape`` (float64) whose rows cycle through ``row_kinds``; and each row's kind."""
    axis = axis % len(shape)
    rows, width = int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))
    kinds = row_kinds(dtype)
    large = dict(zip(kinds[1:-2], LARGE_MAGNITUDES.get(dtype, LARGE_MAGNITUDES["float32"])))
    x = rng.standard_normal((rows, width))
    per_row = []
    for r in range(rows):
        kind = kinds[r % len(kinds)]
        per_row.append(kind)
        peak = np.abs(x[r]).max()
        if kind in large:
            x[r] *= large[kind] / peak
        elif kind == "tiny":
            x[r] *= TINY / peak
        elif kind == "zero":
            x[r] = 0.0
    return x.reshape(shape), per_row


def split_feed(x: np.ndarray, names: list[str], np_dtype, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """x as the norm's input, or as two addends (a folded residual) that sum to it."""
    if len(names) == 1:
        return {names[0]: x.astype(np_dtype)}
    a = (x * rng.uniform(0.0, 1.0, x.shape)).astype(np_dtype)
    b = (x - a.astype(np.float64)).astype(np_dtype)
    return {names[0]: a, names[1]: b}


def reference(feed: dict[str, np.ndarray], params: NormParams, skip_bias: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm in float64: x / sqrt(mean(x²) + eps) · g (+ bias), x the sum of the inputs."""
    x = sum(v.astype(np.float64) for v in feed.values())
    if skip_bias is not None:
        x = x + skip_bias.astype(np.float64)
    axes = tuple(range(params.axis % x.ndim, x.ndim))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + params.epsilon)
    if params.scale is not None:
        y = y * params.scale
    if params.bias is not None:
        y = y + params.bias
    return y


def _input_types(sub: onnx.ModelProto, names: list[str]) -> tuple[list, object, str]:
    by_name = {i.name: i for i in sub.graph.input}
    first = by_name[names[0]].type.tensor_type
    dtype = ir.DataType(first.elem_type)
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in first.shape.dim]
    if not dtype.is_floating_point():
        raise ValueError(f"its input is {dtype.name.lower()}, not a float")
    return shape, dtype.numpy(), np.dtype(dtype.numpy()).name


def _run(sub: onnx.ModelProto, backend, feed: dict, output: str, opts, tmp: Path, name: str) -> np.ndarray:
    from normexport.runners import make_onnx_runner

    path = tmp / f"{name}.onnx"
    onnx.save_model(sub, str(path))
    with make_onnx_runner(path, backend, optimize=False, threads=getattr(opts, "threads", None), dtype=getattr(opts, "dtype", None)) as runner:
        try:
            return runner.infer(feed)[output]
        except NormexportError:
            raise
        except Exception as e:  # the runtime's own failure on this one norm: reported, not ours
            raise NormexportError(f"{runner.name} could not run it alone: {first_line(e, 200)}", "") from None


def check_site(site: NormSite, fused_ext, unfused_ext, opts, tmp: Path, seed: int) -> NormStress:
    sub = cut(fused_ext, site.inputs, site.output)
    try:
        params = norm_params(sub)
    except ValueError:
        if unfused_ext is None:
            raise
        params = norm_params(cut(unfused_ext, site.inputs, site.output))  # the norm it replaced: same eps, same weights
    shape, np_dtype, dtype_name = _input_types(sub, site.inputs)
    shape = concrete_shape(shape, params.axis)
    rng = np.random.default_rng(seed + site.index)
    x, kinds = stress_rows(shape, params.axis, dtype_name, rng)
    feed = split_feed(x, site.inputs, np_dtype, rng)
    skip_bias = None
    if site.skip_bias:
        skip_bias = next(onnx.numpy_helper.to_array(t) for t in sub.graph.initializer if t.name == site.skip_bias)
    ref = reference(feed, params, skip_bias)
    got = _run(sub, opts.record, feed, site.output, opts, tmp, f"fused_{site.index}")
    atol, rtol = default_tolerance(got.dtype)
    atol, rtol = opts.atol if opts.atol is not None else atol, opts.rtol if opts.rtol is not None else rtol
    rows = int(np.prod(shape[: params.axis % len(shape)]))
    ref2, got2 = ref.reshape(rows, -1), got.astype(np.float64).reshape(rows, -1)
    kind_of = np.array(kinds)
    failed = [f"{k} ({_symptom(ref2[kind_of == k], got2[kind_of == k])})" for k in row_kinds(dtype_name) if (kind_of == k).any() and not compare_arrays(k, ref2[kind_of == k], got2[kind_of == k], atol, rtol).passed]
    result = NormStress(
        site.index, site.module, site.output, site.op, dtype_name, shape, params.epsilon, float(np.abs(x).max()), False, failed,
        vs_reference=compare_arrays(site.output, ref, got.astype(np.float64), atol, rtol),
    )
    if unfused_ext is not None:
        _compare_unfused(result, site, unfused_ext, feed, ref2, got2, kind_of, (atol, rtol), opts, tmp)
    result.passed = result.vs_reference.passed and (result.vs_unfused is None or result.vs_unfused.passed)
    return result


def _symptom(ref: np.ndarray, got: np.ndarray) -> str:
    """What a failing set of rows shows: NaN/Inf, zeros where the reference is not, or an error."""
    if not np.isfinite(got).all() and np.isfinite(ref).all():
        return "NaN/Inf"
    if np.any(np.all(got == 0, axis=1) & np.any(ref != 0, axis=1)):
        return "zeros"
    return f"max abs error {np.nanmax(np.abs(got - ref)):.3g}"


def _compare_unfused(result: NormStress, site: NormSite, unfused_ext, feed, ref2, got2, kind_of, tol, opts, tmp: Path) -> None:
    """The unfused subgraph runs where the unfused export runs in validation (onnxruntime's
    CPU provider); the fused norm must agree with it on the in-range rows."""
    try:
        sub = cut(unfused_ext, site.inputs, site.output)
    except ValueError as e:  # names the fusion did not keep: the reference check stands alone
        result.unfused_note = f"no unfused subgraph ({e})"
        return
    base = _run(sub, DEFAULT_BACKEND, feed, site.output, opts, tmp, f"unfused_{site.index}").astype(np.float64).reshape(got2.shape)
    mask = np.isin(kind_of, IN_RANGE)
    result.vs_unfused = compare_arrays(site.output, base[mask], got2[mask], *tol)
    result.unfused_matches_reference = compare_arrays(site.output, ref2, base, *tol).passed
    if not result.vs_unfused.passed:
        result.failed_rows = sorted(set(result.failed_rows) | {"differs from the unfused subgraph"})


# ---------------------------------------------------------------------------------------------
# The check


def wanted(stress: bool | None, dtype: str | None, fused: Path) -> bool:
    """--stress / --no-stress, or by default: on where the norms take fp16 or bf16 inputs."""
    if stress is not None:
        return stress
    if dtype in ("float16", "bfloat16"):
        return True
    model = ir.load(str(fused))
    values = {v.name: v for v in model.graph.inputs}
    values.update((v.name, v) for node in model.graph for v in node.outputs)
    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    return any(site.inputs and site.inputs[0] in values and values[site.inputs[0]].dtype in half for site in norm_sites(model))


def stress_check(fused: Path, unfused: Path | None, opts, seed: int = 0) -> StressReport:
    """Every fused norm of ``fused`` alone on ``opts.backend`` (see the module's docstring)."""
    from onnx.utils import Extractor

    report = StressReport(backend=opts.backend)
    model = ir.load(str(fused))
    sites = norm_sites(model)
    if not sites:
        report.notes.append("the fused model has no marked norms to stress (fuse it with normexport)")
        return report
    fused_ext = Extractor(ir.serde.serialize_model(model))
    unfused_ext = Extractor(ir.serde.serialize_model(ir.load(str(unfused)))) if unfused is not None else None
    with tempfile.TemporaryDirectory(prefix="normexport-stress-") as tmp:
        for site in sites:
            try:
                report.norms.append(check_site(site, fused_ext, unfused_ext, opts, Path(tmp), seed))
            except ValueError as e:
                report.not_checked.append((site.module or site.output, f"cannot cut it out alone: {e}"))
            except NormexportError as e:
                report.not_checked.append((site.module or site.output, e.message))
    if report.norms:
        kinds = row_kinds(report.norms[0].dtype)
        report.notes.append(f"each fused norm alone on {opts.backend}, rows: {', '.join(kinds)}; vs float64 RMSNorm with its own eps and weights")
    return report
