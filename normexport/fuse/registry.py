"""The targets, one record each: what a fused norm becomes and what it needs.

A new target is one record here, its lowering (targets.py) and its tests; every other module
asks this registry (``target_record(name)``, ``TARGETS``, ``FUSED_OPS``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from normexport.errors import NormexportError
from normexport.fuse.ops import LAYER_NORM_OPS, RMS_NORMALIZATION, SIMPLIFIED_LN, SKIP_SIMPLIFIED_LN, TRT_DOMAIN, TRT_PLUGIN_NAME


@dataclass(frozen=True)
class Ref:
    """``module.function``, imported when first called: the records stay readable (the CLI's
    choices and help) without importing onnx_ir or onnxscript."""

    module: str
    function: str

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.function)(*args, **kwargs)


def _lowering(name: str) -> Ref:
    return Ref("normexport.fuse.targets", name)


def _importer(name: str) -> Ref:
    return Ref("normexport.fuse.importers", name)


@dataclass(frozen=True)
class Target:
    name: str
    ops: tuple[str, ...]  # the ops its lowering emits (empty: primitive ops only)
    label: str  # what the report calls the result
    lower: Callable  # (builder, NormNode) -> Lowered
    help: str
    opset: int | None = None  # the default-domain opset the op needs (the model is raised to it)
    domain: str = ""  # the op's custom domain, imported into the model when a norm is lowered
    folds_residual: bool = False  # has an op that takes the residual Add in (Skip..., the plugin's residual input)
    portable: bool = True  # False: only a backend that names it runs it (runners' records)
    importer: Callable | None = None  # (model, log, names): its fused form back into the internal node
    plain: bool = False  # its first op takes (X, scale) with axis and epsilon attributes, at the model's own opset (stress reads a norm's parameters off it)
    onnxruntime_ops: bool = False  # its ops are onnxruntime's own: onnxruntime's attention and rotary fusions run beside them


RECORDS = (
    Target("ort", (SIMPLIFIED_LN, SKIP_SIMPLIFIED_LN), SIMPLIFIED_LN, _lowering("lower_ort"),
           f"onnxruntime's {SIMPLIFIED_LN} ({SKIP_SIMPLIFIED_LN} with a residual Add folded in)",
           domain="", folds_residual=True, importer=_importer("import_ort"), plain=True, onnxruntime_ops=True),
    Target("onnx", (RMS_NORMALIZATION,), RMS_NORMALIZATION, _lowering("lower_onnx"), f"ONNX {RMS_NORMALIZATION} (opset 23)",
           opset=23, importer=_importer("import_rms_normalization")),
    Target("trt-plugin", (TRT_PLUGIN_NAME,), TRT_PLUGIN_NAME, _lowering("lower_trt_plugin"), f"normexport's TensorRT {TRT_PLUGIN_NAME} plugin node",
           domain=TRT_DOMAIN, folds_residual=True, portable=False, importer=_importer("count_plugin_nodes")),
    Target("decompose", (), "primitive ops", _lowering("lower_decompose"), "primitive ops (any runtime)"),
)
_BY_NAME = {t.name: t for t in RECORDS}

TARGETS = tuple(_BY_NAME)
DEFAULT_TARGET = TARGETS[0]
PLAIN_TARGET = next(t for t in RECORDS if t.plain)  # needs no opset change; stress reads norms off its op
RESIDUAL_CHOICES = ("auto", "on", "off")  # --residual-fusion; True / False stand for on / off


def fold_residual(choice: str | bool) -> bool:
    """Whether the fusion alone (no backend to ask) folds residual Adds: True / on / auto fold,
    False / off keep them apart; anything else is the caller's error."""
    if isinstance(choice, bool):
        return choice
    if choice not in RESIDUAL_CHOICES:
        raise NormexportError(f"unknown residual choice {choice!r}", f"one of {', '.join(RESIDUAL_CHOICES)}, True or False")
    return choice != "off"
FUSED_OPS = frozenset(op for t in RECORDS for op in t.ops)  # every op a fused norm can be
NORM_OPS = FUSED_OPS | frozenset(LAYER_NORM_OPS)  # every norm op a runtime may run (profiles count these)
RESIDUAL_OPS = frozenset({SKIP_SIMPLIFIED_LN})  # fused ops that take the residual Add in onnxruntime's layout


def target_record(name: str | Target) -> Target:
    """The record of target ``name`` (a record is its own); an unknown name is the user's error."""
    if isinstance(name, Target):
        return name
    try:
        return _BY_NAME[name]
    except KeyError:
        raise NormexportError(f"unknown target '{name}'", f"one of {', '.join(TARGETS)}") from None


def targets_help() -> str:
    return "; ".join(f"{t.name}: {t.help}" for t in RECORDS) + "."
