"""The RMSNorm CUDA kernel library through ctypes: load it, ask for a launch plan, call it on torch CUDA tensors.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from normexport.errors import NormexportError
from normexport.plugin.building import BUILD_COMMAND, find_kernel_library

if TYPE_CHECKING:  # pragma: no cover
    import torch

KERNEL_ABI_VERSION = 1  # NORMEXPORT_RMSNORM_ABI_VERSION in rmsnorm_kernel.h

# dtype codes of normexport_rmsnorm_forward()
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


@dataclass(frozen=True)
class KernelPlan:
    """How the kernel runs one call (see NormexportRmsnormPlan in rmsnorm_kernel.h)."""

    vec_elems: int
    items_per_thread: int  # 0: the row is read twice instead of kept in registers
    threads_per_row: int
    rows_per_block: int
    block_threads: int


class _Plan(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in KernelPlan.__dataclass_fields__]


_LOADED: dict[Path, ctypes.CDLL] = {}


def load_kernel_library(path: Path | None = None) -> ctypes.CDLL:
    """ctypes handle on the kernel library (found with find_kernel_library() when path is None), with prototypes."""
    path = (Path(path) if path is not None else find_kernel_library()).resolve()
    if path in _LOADED:
        return _LOADED[path]
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise NormexportError(f"cannot load {path}: {error}", hint=f"rebuild it with `{BUILD_COMMAND}`") from error
    lib.normexport_rmsnorm_forward.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
    ]
    lib.normexport_rmsnorm_forward.restype = ctypes.c_int
    lib.normexport_rmsnorm_plan.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(_Plan),
    ]
    lib.normexport_rmsnorm_plan.restype = ctypes.c_int
    lib.normexport_rmsnorm_version.argtypes = []
    lib.normexport_rmsnorm_version.restype = ctypes.c_int
    lib.normexport_rmsnorm_error_string.argtypes = [ctypes.c_int]
    lib.normexport_rmsnorm_error_string.restype = ctypes.c_char_p
    version = lib.normexport_rmsnorm_version()
    if version != KERNEL_ABI_VERSION:
        raise NormexportError(
            f"{path} has kernel ABI version {version}, this normexport needs {KERNEL_ABI_VERSION}",
            hint=f"rebuild it with `{BUILD_COMMAND}`",
        )
    _LOADED[path] = lib
    return lib


def kernel_plan(dtype: str, hidden: int, addresses: Sequence[int] = (0,), library: Path | None = None) -> KernelPlan:
    """The launch plan for a call with this dtype name, hidden size and tensor addresses (no GPU needed)."""
    lib = load_kernel_library(library)
    pointers = list(addresses)[:6] + [0] * (6 - min(len(addresses), 6))
    plan = _Plan()
    code = lib.normexport_rmsnorm_plan(DTYPE_CODES[dtype], *[p or None for p in pointers], hidden, ctypes.byref(plan))
    if code != 0:
        raise ValueError(f"no plan for dtype={dtype} hidden={hidden}: {lib.normexport_rmsnorm_error_string(code)}")
    return KernelPlan(*(getattr(plan, name) for name in KernelPlan.__dataclass_fields__))


def _dtype_name(tensor: "torch.Tensor") -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise TypeError(f"RMSNorm kernel supports float32, float16 and bfloat16 tensors, not {tensor.dtype}")
    return name


def _check_output(name: str, tensor: "torch.Tensor", like: "torch.Tensor") -> None:
    if tensor.shape != like.shape or tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(
            f"{name} must be {like.dtype} {tuple(like.shape)} on {like.device}, "
            f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_inputs(x, gamma, residual, bias, residual_out) -> str:
    """Raise ValueError/TypeError unless the arguments of rmsnorm_forward() fit together; return x's dtype name."""
    import torch

    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise ValueError("x must be a CUDA tensor")
    dtype = _dtype_name(x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    hidden = x.shape[-1]
    for name, tensor, numel in (("gamma", gamma, hidden), ("bias", bias, hidden), ("residual", residual, x.numel())):
        if tensor is None:
            continue
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(f"{name} must be {x.dtype} on {x.device}, got {tensor.dtype} on {tensor.device}")
        if tensor.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {tensor.numel()}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual_out is not None and residual is None:
        raise ValueError("residual_out needs residual")
    return dtype


def rmsnorm_forward(
    x: "torch.Tensor",
    gamma: "torch.Tensor",
    eps: float,
    residual: "torch.Tensor | None" = None,
    bias: "torch.Tensor | None" = None,
    out: "torch.Tensor | None" = None,
    residual_out: "torch.Tensor | None" = None,
    library: Path | None = None,
) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """RMSNorm over the last dim of CUDA tensor x with the CUDA kernel, on the current stream.

    y = s / sqrt(mean(s^2) + eps) * gamma (+ bias), s = x (+ residual, rounded to x's dtype). Returns y, or
    (y, s) when residual is given. out / residual_out: optional preallocated contiguous outputs (must not overlap
    the inputs). All tensors share x's dtype (float32, float16 or bfloat16) and device.
    """
    import torch

    dtype = _check_inputs(x, gamma, residual, bias, residual_out)
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    x = x.contiguous()
    gamma = gamma.contiguous()
    residual = residual.contiguous() if residual is not None else None
    bias = bias.contiguous() if bias is not None else None
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_output("out", out, x)
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty_like(x)
        else:
            _check_output("residual_out", residual_out, x)

    lib = load_kernel_library(library)

    def address(tensor: "torch.Tensor | None") -> int | None:
        return tensor.data_ptr() if tensor is not None else None

    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        code = lib.normexport_rmsnorm_forward(
            DTYPE_CODES[dtype], address(x), address(residual), address(gamma), address(bias), address(out),
            address(residual_out), rows, hidden, float(eps), stream or None,
        )
    if code != 0:
        message = lib.normexport_rmsnorm_error_string(code).decode(errors="replace")
        raise RuntimeError(f"normexport_rmsnorm_forward failed: {message} (cudaError {code})")
    return (out, residual_out) if residual is not None else out
