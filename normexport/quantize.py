"""Weight-only block quantization of a fused model with onnxruntime's own quantizer.

``MatMulNBitsQuantizer`` (onnxruntime.quantization.matmul_nbits_quantizer) replaces every
MatMul whose weight is a constant by onnxruntime's ``MatMulNBits`` (int4 or int8 blocks along
K, one fp32 scale per block) and, where asked, the embedding Gather by ``GatherBlockQuantized``
(int4 only). Its default algorithm is round-to-nearest, symmetric; the defaults here are those
of onnxruntime-genai's model builder for the CPU: block size 32, accuracy level 4 (the
activations of a MatMulNBits are quantized to int8 for the product), the LM head quantized,
the embeddings not.

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
    embeddings: bool = False  # quantize the embedding Gather (int4 only)

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
    embeddings: bool
    quantized: dict[str, int] = field(default_factory=dict)  # new op -> count
    kept: list[tuple[str, str]] = field(default_factory=list)  # (node, why it stays in float)
    norms_before: int = 0
    norms_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        ops = ", ".join(f"{n} {op}" for op, n in self.quantized.items()) or "nothing"
        ratio = self.weight_bytes_after / self.weight_bytes_before if self.weight_bytes_before else 1.0
        return (f"{self.kind}, block {self.block_size}, accuracy level {self.accuracy_level}: {ops}; "
                f"weights {self.weight_bytes_before / 2**20:.1f} -> {self.weight_bytes_after / 2**20:.1f} MiB ({ratio:.2f}x); "
                f"{self.norms_after} fused norms kept in fp32")

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
            "lm_head": self.lm_head, "embeddings": self.embeddings, "quantized": self.quantized,
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
    """The MatMul that makes the ``logits`` output (a model file's outputs, where none is
    named so), found through shape-only ops; None where no output comes from a MatMul."""
    outputs = sorted(model.graph.outputs, key=lambda v: v.name != "logits")
    for value in outputs:
        while value is not None and value.producer() is not None:
            node = value.producer()
            if node.op_type == "MatMul" and not node.domain:
                return node
            if node.op_type not in ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze") or not node.inputs:
                break
            value = node.inputs[0]
    return None


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
    if head is not None and not opts.lm_head:
        exclude.append(head.name)
        report.kept.append((head.name, "LM head (--no-quantize-lm-head)"))
    if not opts.embeddings:
        report.kept += [(n.name, "embedding (--quantize-embeddings quantizes it)") for n in embedding_nodes(model)]
    elif not embedding_nodes(model):
        report.kept.append(("", "no embedding Gather found to quantize"))
    for node in model.graph:
        if node.op_type == "MatMul" and not node.domain and (len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None):
            report.kept.append((node.name, "activation x activation (no constant weight)"))
    op_types = ("MatMul", "Gather") if opts.embeddings else ("MatMul",)
    if opts.embeddings:  # only the embedding Gathers, not every Gather of the graph
        exclude += [n.name for n in model.graph if n.op_type == "Gather" and n not in embedding_nodes(model)]
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
