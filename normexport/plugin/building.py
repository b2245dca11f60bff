"""Build plugins/rmsnorm with CMake and find what it built.

`build()` runs CMake (configure + build) out of tree and says what was built and what was skipped and why;
`find_kernel_library()` / `find_plugin_library()` locate the built libraries (env overrides NORMEXPORT_KERNEL_LIB /
NORMEXPORT_PLUGIN_LIB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from normexport.errors import NormexportError

SOURCE_DIR = Path(__file__).resolve().parents[2] / "plugins" / "rmsnorm"
DEFAULT_BUILD_DIR = SOURCE_DIR / "build"  # gitignored (build/)
DEFAULT_CUDA_ARCHS = "80-real;90"
KERNEL_LIB_ENV = "NORMEXPORT_KERNEL_LIB"
PLUGIN_LIB_ENV = "NORMEXPORT_PLUGIN_LIB"
KERNEL_LIB_NAME = "libnormexport_rmsnorm_kernel.so"
PLUGIN_LIB_NAME = "libnormexport_rmsnorm_plugin.so"
BUILD_INFO_NAME = "normexport_build_info.json"
BUILD_LOG_NAME = "normexport_build.log"
BUILD_COMMAND = "normexport plugin build"

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
    _run_cmake((("configure", configure), ("build", compile_)), log)
    seconds = time.perf_counter() - start
    return _read_build_info(build_dir, archs, log, seconds)


def _run_cmake(steps: tuple[tuple[str, list[str]], ...], log: Path) -> None:
    """Run each (step, command), appending its output to log; the first failing step raises."""
    with log.open("w") as log_file:
        for step, command in steps:
            log_file.write("$ " + " ".join(command) + "\n")
            log_file.flush()
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log_file.write(done.stdout)
            if done.returncode != 0:
                raise NormexportError(
                    f"cmake {step} of the RMSNorm kernel failed (exit {done.returncode}): {_first_error(done.stdout)}",
                    hint=f"full log: {log}",
                )


def _read_build_info(build_dir: Path, archs: str, log: Path, seconds: float) -> BuildResult:
    """The BuildResult from the JSON file CMake writes into the build folder."""
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
