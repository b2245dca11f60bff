"""Build, find and call the RMSNorm CUDA kernel and TensorRT plugin whose sources live in plugins/rmsnorm/.

- `build()` runs CMake (configure + build) and says what was built and what was skipped and why;
- `find_kernel_library()` / `find_plugin_library()` locate the built libraries (env overrides
  NORMEXPORT_KERNEL_LIB / NORMEXPORT_PLUGIN_LIB);
- `rmsnorm_forward()` calls the kernel on torch CUDA tensors through ctypes; `rmsnorm_reference()` is the float64
  reference it is checked against;
- `load_plugin()` registers the TensorRT plugin with TensorRT's plugin registry;
- `plugin_cli` is the `normexport plugin` click group.

torch and tensorrt are imported inside the functions that need them.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import click

from normexport.errors import NormexportError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# The node the TensorRT plugin implements: op type = plugin name; the ONNX parser reads these two attributes.
from normexport.fuse.targets import TRT_PLUGIN_NAME as PLUGIN_NAME  # noqa: E402  one definition, shared with the ONNX node
from normexport.fuse.targets import TRT_PLUGIN_NAMESPACE as PLUGIN_NAMESPACE  # noqa: E402
from normexport.fuse.targets import TRT_PLUGIN_VERSION as PLUGIN_VERSION  # noqa: E402
PLUGIN_FIELDS = ("epsilon", "has_residual", "has_bias")

SOURCE_DIR = Path(__file__).resolve().parent.parent / "plugins" / "rmsnorm"
DEFAULT_BUILD_DIR = SOURCE_DIR / "build"  # gitignored (build/)
DEFAULT_CUDA_ARCHS = "80-real;90"
KERNEL_LIB_ENV = "NORMEXPORT_KERNEL_LIB"
PLUGIN_LIB_ENV = "NORMEXPORT_PLUGIN_LIB"
KERNEL_LIB_NAME = "libnormexport_rmsnorm_kernel.so"
PLUGIN_LIB_NAME = "libnormexport_rmsnorm_plugin.so"
BUILD_INFO_NAME = "normexport_build_info.json"
BUILD_LOG_NAME = "normexport_build.log"
BUILD_COMMAND = "normexport plugin build"
KERNEL_ABI_VERSION = 1  # NORMEXPORT_RMSNORM_ABI_VERSION in rmsnorm_kernel.h

# dtype codes of normexport_rmsnorm_forward()
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

# Where nvcc is looked for after $CUDACXX and PATH.
_NVCC_FALLBACKS = ("$CUDA_HOME/bin/nvcc", "$CUDA_PATH/bin/nvcc", "/usr/local/cuda/bin/nvcc")


@dataclass(frozen=True)
class BuildResult:
    """What `build()` produced. `skipped` holds one "target: reason" line per target that was not built."""

    kernel_lib: Path
    plugin_lib: Path | None
    skipped: list[str]
    build_dir: Path
    cuda_architectures: str
    log: Path
    seconds: float


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


# ----------------------------------------------------------------------------------------------------------------------
# Building


def find_nvcc() -> Path | None:
    """nvcc from $CUDACXX, PATH, $CUDA_HOME, $CUDA_PATH or /usr/local/cuda, or None."""
    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    found = shutil.which("nvcc")
    if found:
        candidates.append(found)
    for template in _NVCC_FALLBACKS:
        expanded = os.path.expandvars(template)
        if "$" not in expanded:  # skip the ones whose variable is unset
            candidates.append(expanded)
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _check_tools() -> tuple[str, Path]:
    cmake = shutil.which("cmake")
    nvcc = find_nvcc()
    if cmake is None and nvcc is None:
        raise NormexportError(
            "cannot build the RMSNorm kernel: neither cmake nor nvcc (the CUDA toolkit) is installed",
            hint="install CMake >= 3.18 (pip install cmake) and the CUDA toolkit >= 11.8, or set CUDACXX to nvcc",
        )
    if cmake is None:
        raise NormexportError(
            "cannot build the RMSNorm kernel: cmake is not on PATH",
            hint="install CMake >= 3.18 (pip install cmake, or apt-get install cmake)",
        )
    if nvcc is None:
        raise NormexportError(
            "cannot build the RMSNorm kernel: nvcc (the CUDA toolkit) not found in $CUDACXX, PATH, $CUDA_HOME/bin, "
            "$CUDA_PATH/bin or /usr/local/cuda/bin",
            hint="install the CUDA toolkit >= 11.8, or set CUDACXX=/path/to/nvcc",
        )
    return cmake, nvcc


def _first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[-1] if lines else "no output"


def build(
    build_dir: Path | None = None,
    tensorrt_root: str | None = None,
    cuda_archs: str | None = None,
    *,
    jobs: int | None = None,
) -> BuildResult:
    """Configure and build plugins/rmsnorm with CMake, out of tree.

    build_dir: default plugins/rmsnorm/build. tensorrt_root: TensorRT SDK root for the plugin (default
    $TENSORRT_ROOT; without one the plugin is built only if CMake finds TensorRT's headers and libnvinfer itself).
    cuda_archs: CMAKE_CUDA_ARCHITECTURES, default $NORMEXPORT_CUDA_ARCHS or "80-real;90".
    Raises NormexportError when cmake or nvcc is missing or the build fails (the log path is in the hint).
    """
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise NormexportError(
            f"RMSNorm plugin sources not found at {SOURCE_DIR}",
            hint="build from a normexport source checkout: plugins/rmsnorm is not part of the installed package",
        )
    cmake, nvcc = _check_tools()
    build_dir = Path(build_dir) if build_dir is not None else DEFAULT_BUILD_DIR
    build_dir = build_dir.expanduser().resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    archs = cuda_archs or os.environ.get("NORMEXPORT_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    root = tensorrt_root if tensorrt_root is not None else os.environ.get("TENSORRT_ROOT", "")
    configure = [
        cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
        f"-DTENSORRT_ROOT={root}",
        f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    compile_ = [cmake, "--build", str(build_dir), "--parallel", str(jobs or os.cpu_count() or 2)]
    log = build_dir / BUILD_LOG_NAME
    start = time.perf_counter()
    with log.open("w") as log_file:
        for step, command in (("configure", configure), ("build", compile_)):
            log_file.write("$ " + " ".join(command) + "\n")
            log_file.flush()
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log_file.write(done.stdout)
            if done.returncode != 0:
                raise NormexportError(
                    f"cmake {step} of the RMSNorm kernel failed (exit {done.returncode}): {_first_error(done.stdout)}",
                    hint=f"full log: {log}",
                )
    seconds = time.perf_counter() - start
    info_path = build_dir / BUILD_INFO_NAME
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as error:
        raise NormexportError(f"the build wrote no readable {info_path}: {error}", hint=f"full log: {log}") from error
    kernel_lib = Path(info["kernel_lib"])
    if not kernel_lib.is_file():
        raise NormexportError(f"the build reported {kernel_lib}, which does not exist", hint=f"full log: {log}")
    plugin_lib = Path(info["plugin_lib"]) if info.get("plugin_lib") else None
    return BuildResult(
        kernel_lib=kernel_lib,
        plugin_lib=plugin_lib,
        skipped=[f"{item['target']}: {item['reason']}" for item in info.get("skipped", [])],
        build_dir=build_dir,
        cuda_architectures=info.get("cuda_architectures", archs),
        log=log,
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Finding


def _find_library(env_var: str, filename: str, info_key: str, build_dir: Path | None, what: str, hint: str) -> Path:
    override = os.environ.get(env_var)
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path
        raise NormexportError(
            f"{env_var}={override} does not exist", hint=f"point {env_var} at a built {filename}, or unset it"
        )
    directory = Path(build_dir) if build_dir is not None else DEFAULT_BUILD_DIR
    candidates = [directory / filename]
    try:
        reported = json.loads((directory / BUILD_INFO_NAME).read_text()).get(info_key)
        if reported:
            candidates.insert(0, Path(reported))
    except (OSError, ValueError):
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise NormexportError(f"{what} not found (looked for {directory / filename} and ${env_var})", hint=hint)


def find_kernel_library(build_dir: Path | None = None) -> Path:
    """The built libnormexport_rmsnorm_kernel.so: $NORMEXPORT_KERNEL_LIB, else in build_dir (default build dir)."""
    return _find_library(
        KERNEL_LIB_ENV, KERNEL_LIB_NAME, "kernel_lib", build_dir, "RMSNorm CUDA kernel library",
        hint=f"build it with `{BUILD_COMMAND}` (needs nvcc and cmake), or set {KERNEL_LIB_ENV}",
    )


def find_plugin_library(build_dir: Path | None = None) -> Path:
    """The built libnormexport_rmsnorm_plugin.so: $NORMEXPORT_PLUGIN_LIB, else in build_dir (default build dir)."""
    return _find_library(
        PLUGIN_LIB_ENV, PLUGIN_LIB_NAME, "plugin_lib", build_dir, "RMSNorm TensorRT plugin library",
        hint=f"build it with `{BUILD_COMMAND} --tensorrt-root /path/to/TensorRT` (needs the TensorRT SDK headers), "
        f"or set {PLUGIN_LIB_ENV}",
    )


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


# ----------------------------------------------------------------------------------------------------------------------
# Calling


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

    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise ValueError("x must be a CUDA tensor")
    dtype = _dtype_name(x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
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
    import torch

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
    import torch

    info = torch.finfo(actual.dtype)
    floor = info.tiny * info.eps
    return ((actual.double() - expected.double()).abs() / (rtol * scale + floor)).max().item()


# ----------------------------------------------------------------------------------------------------------------------
# TensorRT


def load_plugin(path: Path | None = None):
    """Register the RMSNorm plugin with TensorRT's plugin registry (IPluginRegistry.load_library); idempotent.

    Returns the registry's creator for RMSNorm/1. Needs TensorRT >= 10 (IPluginV3) and its Python package.
    """
    library = Path(path) if path is not None else find_plugin_library()
    try:
        import tensorrt as trt
    except ImportError as error:
        raise NormexportError(
            "TensorRT's Python package is not installed", hint="pip install tensorrt (TensorRT >= 10)"
        ) from error
    registry = trt.get_plugin_registry()
    creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        if registry.load_library(str(library)) is None:
            raise NormexportError(
                f"TensorRT could not load the plugin library {library}",
                hint="check TensorRT's log; the library must be built against this TensorRT major version",
            )
        creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        raise NormexportError(f"{library} did not register {PLUGIN_NAME} version {PLUGIN_VERSION}", hint=None)
    return creator


# ----------------------------------------------------------------------------------------------------------------------
# CLI


@click.group(name="plugin")
def plugin_cli() -> None:
    """Build and locate the RMSNorm CUDA kernel and TensorRT plugin (plugins/rmsnorm)."""


@plugin_cli.command("build")
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"CMake build folder [default: {DEFAULT_BUILD_DIR}]")
@click.option("--tensorrt-root", default=None, metavar="DIR",
              help="TensorRT SDK root with include/ and lib/ [default: $TENSORRT_ROOT]; without TensorRT only the "
                   "kernel library is built")
@click.option("--cuda-archs", default=None, metavar="LIST",
              help=f"CMAKE_CUDA_ARCHITECTURES, e.g. '90' or '80-real;90' [default: {DEFAULT_CUDA_ARCHS}]")
def build_command(build_dir: Path | None, tensorrt_root: str | None, cuda_archs: str | None) -> None:
    """Compile the kernel library (always) and the TensorRT plugin (when TensorRT is found)."""
    result = build(build_dir=build_dir, tensorrt_root=tensorrt_root, cuda_archs=cuda_archs)
    click.echo(f"built   {result.kernel_lib}  (CUDA architectures {result.cuda_architectures})")
    if result.plugin_lib is not None:
        click.echo(f"built   {result.plugin_lib}")
    for line in result.skipped:
        click.echo(f"skipped {line}")
    click.echo(f"log     {result.log}  ({result.seconds:.1f} s)")


@plugin_cli.command("path")
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"CMake build folder [default: {DEFAULT_BUILD_DIR}]")
@click.option("--kernel", "which", flag_value="kernel", help="Print the kernel library instead of the plugin.")
@click.option("--plugin", "which", flag_value="plugin", default=True, help="Print the TensorRT plugin (default).")
def path_command(build_dir: Path | None, which: str) -> None:
    """Print the path of a built library, e.g. for trtexec --dynamicPlugins=$(normexport plugin path)."""
    found = find_kernel_library(build_dir) if which == "kernel" else find_plugin_library(build_dir)
    click.echo(str(found))
