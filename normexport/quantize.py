"""Weight-only block quantization of a fused model with onnxruntime's own quantizer.

``MatMulNBitsQuantizer`` (onnxruntime.quantization.matmul_nbits_quantizer) replaces every
MatMul whose weight is a constant by onnxruntime's ``MatMulNBits`` (int4 or int8 blocks along
K, one fp32 scale per block) and, where asked, the embedding Gather by ``GatherBlockQuantized``
(int4 only). Its default algorithm is round-to-nearest, symmetric; the defaults here are those
of onnxruntime-genai's model builder for the CPU: block size 32, accuracy level 4 (the
activations of a MatMulNBits are quantized to int8 for the product), the LM head quantized,
the embeddings not, except where the LM head and the embedding share one table (tied word
embeddings): there the embedding Gather becomes a ``GatherBlockQuantized`` that reads the LM
head's int4 blocks, so the file holds the table once, in int4, as the builder's does.

It runs after the norms are fused and touches MatMuls and Gathers only: every fused norm
(SimplifiedLayerNormalization, ...) stays as it was and computes in fp32. The count of fused
norm nodes is checked before and after.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import numpy as np

from normexport.errors import NormexportError

if TYPE_CHECKING:
    import onnx_ir as ir

KINDS = {"int4": 4, "int8": 8}
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0: unset (the op's own default), 1 fp32, 2 fp16, 3 bf16, 4 int8
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


@dataclass
class QuantizeOptions:
    kind: str = "int4"  # int4 | int8
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    lm_head: bool = True  # quantize the MatMul that makes the logits
    embeddings: bool | None = None  # quantize the embedding Gather (int4 only); None: where it shares its table with the quantized LM head (int4), it reads the head's blocks, else it stays fp32

    @property
    def bits(self) -> int:
        return KINDS[self.kind]

    def check(self) -> None:
        """The user's mistakes, before any work."""
        if self.kind not in KINDS:
            raise NormexportError(f"unknown --quantize '{self.kind}'", f"one of {', '.join(KINDS)}")
        if self.block_size not in BLOCK_SIZES:
            raise NormexportError(f"--quant-block-size {self.block_size} is not one onnxruntime's MatMulNBits takes", f"one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise NormexportError(f"--quant-accuracy-level {self.accuracy_level} is not a MatMulNBits accuracy level", "0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
        if self.embeddings and self.kind != "int4":
            raise NormexportError("onnxruntime's GatherBlockQuantized takes int4 embeddings only", "drop --quantize-embeddings, or use --quantize int4")


def check_quantize(opts) -> None:
    """``opts``: a ConvertOptions. --quantize makes onnxruntime's MatMulNBits from fp32 weights:
    a target and a dtype that go with it, checked before any work."""
    if not opts.quantize:
        return
    opts.quantize.check()
    from normexport.fuse.registry import RECORDS
    from normexport.runners import BACKEND_RECORDS

    targets = [t.name for t in RECORDS if t.portable and t.ops]  # fused norms onnxruntime runs beside its MatMulNBits
    if opts.fuse.record.name not in targets:
        raise NormexportError(f"--quantize makes onnxruntime's MatMulNBits; it does not apply to --target {opts.fuse.target}", f"use --target {' or '.join(targets)}, or drop --quantize")
    if opts.load.dtype not in (None, "float32"):
        raise NormexportError(f"--quantize quantizes float32 weights; --dtype {opts.load.dtype} does not combine with it", "drop --dtype (the activations stay fp32)")
    refused = [stage.record.name for stage in (opts.validate, opts.bench) if stage is not None and not stage.record.contrib_ops]
    if refused:
        others = [b.name for b in BACKEND_RECORDS if not b.contrib_ops]
        runs = [b.name for b in BACKEND_RECORDS if b.contrib_ops]
        raise NormexportError(f"--backend {refused[0]} does not run onnxruntime's MatMulNBits: --quantize does not combine with --backend {' or '.join(others)}",
                              f"drop --backend, or give {' or '.join(runs)}")


@dataclass
class QuantizeReport:
    kind: str
    block_size: int
    accuracy_level: int
    lm_head: bool
    embeddings: bool | None
    quantized: dict[str, int] = field(default_factory=dict)  # new op -> count
    shared_table: str = ""  # the tied table whose int4 blocks the LM head and the embedding Gather both read
    kept: list[tuple[str, str]] = field(default_factory=list)  # (node, why it stays in float)
    norms_before: int = 0
    norms_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        ops = ", ".join(f"{n} {op}" for op, n in self.quantized.items()) or "nothing"
        ratio = self.weight_bytes_after / self.weight_bytes_before if self.weight_bytes_before else 1.0
        shared = "; the embedding reads the LM head's blocks (tied table)" if self.shared_table else ""
        return (f"{self.kind}, block {self.block_size}, accuracy level {self.accuracy_level}: {ops}{shared}; "
                f"weights {self.weight_bytes_before / 2**20:.1f} -> {self.weight_bytes_after / 2**20:.1f} MiB ({ratio:.2f}x); "
                f"{self.norms_after} fused norms kept in fp32")

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
            "lm_head": self.lm_head, "embeddings": self.embeddings, "quantized": self.quantized, "shared_table": self.shared_table or None,
            "kept_in_float": [{"node": n, "reason": r} for n, r in self.kept],
            "fused_norms": {"before": self.norms_before, "after": self.norms_after},
            "weight_bytes": {"before": self.weight_bytes_before, "after": self.weight_bytes_after},
            "seconds": round(self.seconds, 3),
        }


def fused_norm_count(model: ir.Model) -> int:
    from normexport.fuse.registry import FUSED_OPS

    return sum(1 for n in model.graph if n.op_type in FUSED_OPS)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def quantized_kind(path) -> str | None:
    """"int4" / "int8" for an ONNX file with MatMulNBits (the widest bits it uses), else None."""
    import onnx

    bits = [next((a.i for a in n.attribute if a.name == "bits"), 4) for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    return None if not bits else f"int{max(bits)}"


def lm_head_node(model: ir.Model) -> ir.Node | None:
    """The MatMul (or onnxruntime's FusedMatMul) that makes the ``logits`` output (a model
    file's outputs, where none is named so), found through shape-only ops and a final logit
    soft-capping (Div or Mul by a constant, Tanh); None where no output comes from one."""
    outputs = sorted(model.graph.outputs, key=lambda v: v.name != "logits")
    for value in outputs:
        while value is not None and value.producer() is not None:
            node = value.producer()
            if (node.op_type, node.domain) in (("MatMul", ""), ("FusedMatMul", "com.microsoft")):
                return node
            if node.domain or not node.inputs:
                break
            if node.op_type in ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Tanh"):
                value = node.inputs[0]
            elif node.op_type in ("Mul", "Div") and len(node.inputs) == 2 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
                value = node.inputs[0]
            elif node.op_type == "Mul" and len(node.inputs) == 2 and node.inputs[0] is not None and node.inputs[0].const_value is not None:
                value = node.inputs[1]
            else:
                break
    return None


def transposed_weight(node: ir.Node) -> ir.Value | None:
    """The 2-D initializer W of ``node`` = MatMul(x, Transpose(W)) or FusedMatMul(x, W,
    transB=1) (any alpha, no other flag); None for any other form."""
    if len(node.inputs) != 2 or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    if node.op_type == "FusedMatMul":
        attrs = {k: v.value for k, v in node.attributes.items()}
        attrs.pop("alpha", None)
        if attrs.pop("transB", 0) != 1 or any(attrs.values()):
            return None
    elif node.op_type == "MatMul" and weight.producer() is not None and weight.producer().op_type == "Transpose" and not weight.producer().domain:
        transpose = weight.producer()
        perm = transpose.attributes.get_ints("perm", None)
        weight = transpose.inputs[0]
        if perm is not None and list(perm) != [1, 0]:
            return None
    else:
        return None
    if weight is None or not weight.is_initializer() or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return weight


def untie_head(model: ir.Model, head: ir.Node) -> ir.Node:
    """``head`` as MatMul(x, Wt) with Wt a new initializer holding W transposed, where it
    multiplies by a transposed initializer W (``transposed_weight``): the quantizer reads only
    a MatMul's constant [K, N] weight. A FusedMatMul's alpha (a folded logit scale) becomes a
    Mul after it. The MatMul now (named as ``head`` was); W stays for its other readers."""
    import onnx_ir as ir

    weight = transposed_weight(head)
    if weight is None:
        return head
    table = weight.const_value.numpy()
    value = ir.val(f"{weight.name}_transposed", const_value=ir.tensor(np.ascontiguousarray(table.T), name=f"{weight.name}_transposed"))
    model.graph.register_initializer(value)
    if head.op_type == "MatMul":
        transpose = head.inputs[1].producer()
        head.replace_input_with(1, value)
        if not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            model.graph.remove(transpose, safe=True)
        return head
    matmul = ir.node("MatMul", [head.inputs[0], value], name=head.name)
    new = [matmul]
    alpha = head.attributes.get_float("alpha", 1.0)
    if alpha != 1.0:
        matmul.outputs[0].name = f"{head.name}_product"
        scale = ir.val(f"{head.name}_alpha", const_value=ir.tensor(np.array(alpha, dtype=table.dtype), name=f"{head.name}_alpha"))
        model.graph.register_initializer(scale)
        new.append(ir.node("Mul", [matmul.outputs[0], scale], name=f"{head.name}_alpha"))
    ir.convenience.replace_nodes_and_values(model.graph, head, [head], new, head.outputs, new[-1].outputs)
    return matmul


def share_tied_table(model: ir.Model, head_output: str, gathers: list[str], table: str) -> bool:
    """The embedding Gathers named ``gathers`` (of the fp32 ``table``) as onnxruntime's
    GatherBlockQuantized over the int4 blocks and scales of the LM head's MatMulNBits (the
    node that makes ``head_output``; its weight is that table's transpose, quantized along
    the hidden size, which is the Gather's rows): one int4 copy of the table serves both, as
    in onnxruntime-genai's builder. The fp32 table is dropped when nothing else reads it.
    False, and nothing changed, where the head is not a 4-bit MatMulNBits without zero points."""
    import onnx_ir as ir

    head = next((n for n in model.graph if any(o.name == head_output for o in n.outputs)), None)
    if head is None or head.op_type != "MatMulNBits" or len(head.inputs) > 3 and head.inputs[3] is not None:
        return False
    attrs = {k: v.value for k, v in head.attributes.items()}
    if attrs.get("bits") != 4:
        return False
    blocks, scales = head.inputs[1], head.inputs[2]
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    width = blocks.const_value.shape[1] * blocks.const_value.shape[2]  # bytes per row: k_blocks x block / 2
    shape = ir.val(f"{blocks.name}_rows_shape", const_value=ir.tensor(np.array([n, width], dtype=np.int64), name=f"{blocks.name}_rows_shape"))
    model.graph.register_initializer(shape)
    rows = ir.node("Reshape", [blocks, shape], name=f"{head.name}_rows")
    rows.outputs[0].name = f"{blocks.name}_rows"
    model.graph.insert_before(next(iter(model.graph)), rows)
    for node in [n_ for n_ in model.graph if n_.name in gathers]:
        ids = node.inputs[1]
        new = [ir.node("GatherBlockQuantized", [rows.outputs[0], ids, scales], {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
                       domain="com.microsoft", name=node.name)]
        padded = width * 2
        if padded != k:  # the blocks pad each row to whole blocks: slice the padding off
            bounds = [ir.val(f"{node.name}_{what}", const_value=ir.tensor(np.array([v], dtype=np.int64), name=f"{node.name}_{what}"))
                      for what, v in (("starts", 0), ("ends", k), ("axes", -1))]
            for b in bounds:
                model.graph.register_initializer(b)
            new.append(ir.node("Slice", [new[0].outputs[0], *bounds], name=f"{node.name}_unpad"))
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], new, node.outputs, new[-1].outputs)
    if "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    fp32 = model.graph.initializers.get(table)
    if fp32 is not None and not fp32.uses() and not fp32.is_graph_output():
        del model.graph.initializers[table]
    return True


def embedding_nodes(model: ir.Model) -> list[ir.Node]:
    import onnx_ir as ir

    """Gathers of rows from a constant 2-D float table by token ids from a graph input."""
    inputs = {v.name for v in model.graph.inputs}
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.domain or len(node.inputs) < 2:
            continue
        table, ids = node.inputs[0], node.inputs[1]
        if table is None or table.const_value is None or len(table.const_value.shape) != 2:
            continue
        if table.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        if ids is not None and ids.name in inputs:
            found.append(node)
    return found


def _name_nodes(model: ir.Model) -> None:
    """The quantizer selects nodes by name: every node gets a unique one."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"normexport_node_{i}_{node.op_type}"
        seen.add(node.name)


def quantize_model(model: ir.Model, opts: QuantizeOptions) -> tuple[ir.Model, QuantizeReport]:
    import onnx_ir as ir

    """The model with its weight MatMuls (and, per ``opts``, LM head and embeddings) quantized
    by onnxruntime's MatMulNBitsQuantizer; the fused norms must all survive."""
    import time

    opts.check()
    MatMulNBitsQuantizer, QuantFormat = _quantizer()
    start = time.perf_counter()
    report = QuantizeReport(opts.kind, opts.block_size, opts.accuracy_level, opts.lm_head, opts.embeddings)
    _name_nodes(model)
    report.norms_before = fused_norm_count(model)
    report.weight_bytes_before = weight_bytes(model)
    exclude = []
    head = lm_head_node(model)
    table = transposed_weight(head) if head is not None else None
    embeddings = embedding_nodes(model)
    tied = [n for n in embeddings if table is not None and n.inputs[0] is table]
    if head is not None and not opts.lm_head:
        exclude.append(head.name)
        report.kept.append((head.name, "LM head (--no-quantize-lm-head)"))
    elif head is not None:
        head = untie_head(model, head)
    head_output = head.outputs[0].name if head is not None else ""
    share = bool(tied) and opts.lm_head and opts.kind == "int4" and opts.embeddings is not False
    own = [n for n in embeddings if not (share and n in tied)]  # Gathers the quantizer gives blocks of their own
    gathers = bool(opts.embeddings) and bool(own)
    if not opts.embeddings:
        report.kept += [(n.name, "embedding (--quantize-embeddings quantizes it)") for n in own]
    elif not embeddings:
        report.kept.append(("", "no embedding Gather found to quantize"))
    for node in model.graph:
        if node.name in exclude:
            continue
        if node.op_type not in ("MatMul", "FusedMatMul"):
            continue
        if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
            report.kept.append((node.name, "activation x activation (no constant weight)"))
        elif node.op_type == "FusedMatMul":
            report.kept.append((node.name, "onnxruntime's FusedMatMul (the quantizer takes MatMul only)"))
    op_types = ("MatMul", "Gather") if gathers else ("MatMul",)
    if gathers:  # only the embedding Gathers, not every Gather of the graph
        exclude += [n.name for n in model.graph if n.op_type == "Gather" and n not in own]
    for value in model.graph.initializers.values():  # the quantizer reads tensors from the proto alone
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    quantizer = MatMulNBitsQuantizer(
        ir.to_proto(model), bits=opts.bits, block_size=opts.block_size, is_symmetric=True,
        accuracy_level=opts.accuracy_level or None, nodes_to_exclude=exclude, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=op_types,
    )
    with _quiet_quantizer():
        quantizer.process()
    quantized = ir.from_proto(quantizer.model.model)
    if share:
        if share_tied_table(quantized, head_output, [n.name for n in tied], table.name):
            report.shared_table = table.name
        else:
            report.kept += [(n.name, "embedding: its table is the LM head's, which is not a 4-bit MatMulNBits here") for n in tied]
    report.embeddings = bool(report.shared_table) or gathers
    counts: dict[str, int] = {}
    for node in quantized.graph:
        if node.op_type in QUANTIZED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    report.quantized = counts
    report.norms_after = fused_norm_count(quantized)
    report.weight_bytes_after = weight_bytes(quantized)
    if report.norms_after != report.norms_before:
        raise AssertionError(f"quantization changed the fused norms: {report.norms_before} before, {report.norms_after} after")
    report.seconds = time.perf_counter() - start
    return quantized, report


def _quantizer():
    """onnxruntime's quantizer module configures the root logger at INFO when imported
    (logging.basicConfig): the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        from onnxruntime.quantization.quant_utils import QuantFormat
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return MatMulNBitsQuantizer, QuantFormat


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer logs every node at INFO and warns about opset upgrades."""
    log = logging.getLogger("onnxruntime.quantization")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks: scale 0, quantized to 0
            yield
    finally:
        log.setLevel(level)
