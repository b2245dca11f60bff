"""Assertions for accuracy-diff tests in pytest.

    from normexport.testing import assert_onnx_matches

    def test_export_matches(model, tmp_path):
        result = normexport.convert(model, (ids,), output=tmp_path / "m.onnx")
        assert_onnx_matches(model, result.output)  # inputs drawn from the ONNX model's signature
"""

from __future__ import annotations

import io
from typing import Any


def validation_text(report) -> str:
    """The validation report as the CLI prints it, as plain text: the per-output table, the
    worst output, the first diverging norm and the notes."""
    from rich.console import Console

    from normexport.report import print_validation

    buf = io.StringIO()
    print_validation(Console(file=buf, width=160, no_color=True, highlight=False, force_terminal=False), report)
    return buf.getvalue().rstrip()


def assert_onnx_matches(module: Any, onnx_model: Any, inputs: Any = None, *, atol: float | dict | None = None, rtol: float | dict | None = None, **kwargs) -> None:
    """Assert that the ONNX model computes what ``module`` computes, output by output, on
    seeded random draws shaped like ``inputs`` (a dict of tensors by input name, or a tuple by
    position; without them, the ONNX model's own input signature where it fixes every dim and
    dtype; see ``normexport.validate``, which takes the same keywords). Raises ``AssertionError`` whose
    message is the per-output table and the first diverging norm (its module path)."""
    from normexport.api import validate

    report = validate(module, onnx_model, inputs, atol=atol, rtol=rtol, **kwargs)
    if not report.passed:
        raise AssertionError("ONNX model does not match the PyTorch module\n" + validation_text(report))


__all__ = ["assert_onnx_matches", "validation_text"]
