"""What the RMSNorm CUDA kernel computes, in float64, and the error measure the kernel is held to.

Shared by tests/test_plugin.py and bench/bench_kernel_gpu.py --check, so both compare the same way.
"""

from __future__ import annotations

import torch


def rmsnorm_reference(
    x: "torch.Tensor",
    gamma: "torch.Tensor",
    eps: float,
    residual: "torch.Tensor | None" = None,
    bias: "torch.Tensor | None" = None,
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None"]:
    """What the kernel computes, in float64: returns (y, scale, s).

    s = x (+ residual, rounded to x's dtype as the kernel's sum output is), y = s / sqrt(mean(s^2) + eps) * gamma
    (+ bias). `scale` is |s * rstd * gamma| + |bias|: the magnitude an error bound is relative to (y itself can
    cancel to zero when a bias is added). s is returned in x's dtype, None without a residual.
    """
    s = (x.double() + residual.double()).to(x.dtype) if residual is not None else x
    s64 = s.double()
    rstd = torch.rsqrt(s64.square().mean(dim=-1, keepdim=True) + eps)
    scaled = s64 * rstd * gamma.double().reshape(-1)
    y = scaled + bias.double().reshape(-1) if bias is not None else scaled
    scale = scaled.abs() + (bias.double().reshape(-1).abs() if bias is not None else 0.0)
    return y, scale, (s if residual is not None else None)


def error_ratio(actual: "torch.Tensor", expected: "torch.Tensor", scale: "torch.Tensor", rtol: float) -> float:
    """max |actual - expected| / (rtol * scale + one subnormal ulp of actual's dtype); <= 1 passes.

    The absolute floor covers values that underflow into the subnormal range (fp16 below 6e-5), where rounding
    error is absolute; it is a single ulp of the smallest subnormal (6e-8 for fp16, 1e-45 for fp32).
    """
    info = torch.finfo(actual.dtype)
    floor = info.tiny * info.eps
    return ((actual.double() - expected.double()).abs() / (rtol * scale + floor)).max().item()
