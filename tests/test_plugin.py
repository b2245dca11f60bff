"""The RMSNorm CUDA kernel library and TensorRT plugin (plugins/rmsnorm) and their Python side (normexport.plugin).

CPU-only machines: the kernel library is compiled with nvcc (once per module), its C symbols and argument checks
and its launch plans are checked, the plugin target is skipped with a reason without TensorRT. With a CUDA device,
the kernel is compared with a float64 reference over dtypes, hidden sizes, row counts, residual and bias.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kernel_reference import error_ratio, rmsnorm_reference
from normexport import plugin
from normexport.errors import NormexportError
from normexport.plugin import building
from normexport.plugin.cli import plugin_cli

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: torch.cuda.is_available() is False")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RTOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
HIDDEN = [64, 100, 768, 1000, 4096, 8192 + 8]
ROWS = [1, 7, 128]
MISALIGNED_HIDDEN = 4096
# Cases beyond the main grid that reach the other kernel variants: (hidden, rows).
EXTRA_HIDDEN = {
    "float32": [(1001, 5), (1002, 5), (20000, 3)],  # scalar, 8-byte vectors, row read twice
    "float16": [(1001, 5), (1004, 5), (40000, 3), (20000, 3)],  # scalar, 8-byte, read twice, 8 vectors per thread
    "bfloat16": [(1001, 5), (1004, 5), (40000, 3), (20000, 3)],
}
C_SYMBOLS = [
    "normexport_rmsnorm_forward",
    "normexport_rmsnorm_plan",
    "normexport_rmsnorm_version",
    "normexport_rmsnorm_error_string",
]


def _test_archs() -> str:
    # One architecture keeps the compile short: the GPU's own when there is one.
    if HAS_CUDA:
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}"
    return "80-real"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> plugin.BuildResult:
    if shutil.which("cmake") is None or plugin.find_nvcc() is None:
        pytest.skip(f"cannot compile the kernel here: cmake={shutil.which('cmake')}, nvcc={plugin.find_nvcc()}")
    return plugin.build(tmp_path_factory.mktemp("rmsnorm_build"), tensorrt_root="", cuda_archs=_test_archs())


@pytest.fixture(scope="module")
def lib(built) -> ctypes.CDLL:
    return plugin.load_kernel_library(built.kernel_lib)


# ----------------------------------------------------------------------------------------------------------------------
# Build, symbols, registration-free checks (CPU)


def test_kernel_library_builds_and_exports_the_c_interface(built, lib):
    assert built.kernel_lib.is_file()
    assert built.log.is_file()
    if shutil.which("nm"):
        symbols = subprocess.run(
            ["nm", "-D", "--defined-only", str(built.kernel_lib)], capture_output=True, text=True, check=True
        ).stdout
        exported = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
        assert set(C_SYMBOLS) <= exported
        # hidden visibility: no kernel internals leak into the dynamic symbol table
        assert not any("rmsnorm" in name and name not in C_SYMBOLS for name in exported)
    assert lib.normexport_rmsnorm_version() == plugin.KERNEL_ABI_VERSION
    assert lib.normexport_rmsnorm_error_string(1) == b"invalid argument"


def test_plugin_target_is_skipped_with_a_reason_without_tensorrt(built, tmp_path):
    empty_root = tmp_path / "no-tensorrt-here"
    empty_root.mkdir()
    result = plugin.build(built.build_dir, tensorrt_root=str(empty_root), cuda_archs=built.cuda_architectures)
    assert result.plugin_lib is None
    assert result.kernel_lib == built.kernel_lib
    [reason] = result.skipped
    assert reason.startswith("normexport_rmsnorm_plugin: TensorRT not found")
    assert str(empty_root) in reason


def _tensorrt_headers_installed() -> bool:
    roots = [os.environ.get("TENSORRT_ROOT", "")] + ["/usr/include/x86_64-linux-gnu", "/usr/local/TensorRT"]
    return any(
        (Path(root) / sub / "NvInferRuntime.h").is_file() for root in roots if root for sub in ("", "include")
    )


def test_plugin_target_without_root_matches_what_is_installed(built):
    # The fixture built with tensorrt_root="" (system search only).
    if _tensorrt_headers_installed():
        assert built.plugin_lib is not None and built.plugin_lib.is_file()
    else:
        assert built.plugin_lib is None
        assert any(line.startswith("normexport_rmsnorm_plugin: TensorRT") for line in built.skipped)


def test_forward_rejects_bad_arguments_before_touching_the_gpu(lib):
    fake = 0x10000  # never dereferenced: every call below returns before any CUDA call
    forward = lib.normexport_rmsnorm_forward
    invalid = 1  # cudaErrorInvalidValue
    assert forward(0, None, None, fake, None, fake, None, 4, 64, 1e-5, None) == invalid  # no x
    assert forward(0, fake, None, None, None, fake, None, 4, 64, 1e-5, None) == invalid  # no gamma
    assert forward(0, fake, None, fake, None, None, None, 4, 64, 1e-5, None) == invalid  # no y
    assert forward(3, fake, None, fake, None, fake, None, 4, 64, 1e-5, None) == invalid  # unknown dtype
    assert forward(0, fake, None, fake, None, fake, None, -1, 64, 1e-5, None) == invalid  # negative rows
    assert forward(0, fake, None, fake, None, fake, None, 4, 1 << 31, 1e-5, None) == invalid  # hidden too large
    assert forward(0, fake, None, fake, None, fake, None, 4, 64, -1.0, None) == invalid  # negative eps
    assert forward(0, fake, None, fake, None, fake, fake, 4, 64, 1e-5, None) == invalid  # sum output, no residual
    assert forward(0, None, None, None, None, None, None, 0, 64, 1e-5, None) == 0  # nothing to do
    assert forward(2, None, None, None, None, None, None, 4, 0, 1e-5, None) == 0


def _plan(built, dtype, hidden, addresses=(0,)):
    return plugin.kernel_plan(dtype, hidden, addresses, library=built.kernel_lib)


def test_launch_plans(built):
    # 16-byte vectors when the hidden size and every pointer allow it, else 8-byte, else scalar
    assert _plan(built, "float16", 4096).vec_elems == 8
    assert _plan(built, "float32", 4096).vec_elems == 4
    assert _plan(built, "float16", 100).vec_elems == 4  # 100 % 8 != 0
    assert _plan(built, "float32", 1001).vec_elems == 1
    assert _plan(built, "bfloat16", 4096, (0x1000, 0, 0x2008)).vec_elems == 4  # an 8-byte aligned pointer
    assert _plan(built, "bfloat16", 4096, (0x1002,)).vec_elems == 1
    # small rows: a power-of-two slice of a warp per row, several rows per block; larger: a block per row
    small = _plan(built, "float16", 64)
    assert small.threads_per_row == 2 and small.rows_per_block * small.threads_per_row == small.block_threads
    assert _plan(built, "float16", 1024).threads_per_row == 32
    big = _plan(built, "float16", 8192)
    assert (big.threads_per_row, big.rows_per_block, big.items_per_thread) == (256, 1, 4)
    assert big.threads_per_row * big.items_per_thread * big.vec_elems == 8192  # the row fits exactly in registers
    assert _plan(built, "float32", 8200).items_per_thread == 8
    assert _plan(built, "float16", 40000).items_per_thread == 0  # too long for registers: read twice
    with pytest.raises(ValueError):
        _plan(built, "float16", 0)


def test_gpu_cases_cover_every_kernel_kind(built):
    # The GPU tests below must reach, for each dtype, every vector width (16 B, 8 B, scalar), every kernel (row in
    # registers with 4 or 8 vectors per thread, row read twice) and both row layouts (part of a warp, whole block).
    for dtype, element in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        aligned = [(hidden, 0x1000) for hidden in HIDDEN + [h for h, _ in EXTRA_HIDDEN[dtype]]]
        misaligned = [(MISALIGNED_HIDDEN, 0x1000 + element)]  # test_kernel_misaligned_pointers_use_the_scalar_path
        plans = [_plan(built, dtype, hidden, (address,)) for hidden, address in aligned + misaligned]
        assert {p.vec_elems * element for p in plans} == {16, 8, element}, dtype
        assert {p.items_per_thread for p in plans} == {0, 4, 8}, dtype
        assert {p.threads_per_row <= 32 for p in plans} == {True, False}, dtype


def _emulate_kernel(x, gamma, eps, residual=None, bias=None):
    # The kernel's arithmetic in fp32 on the CPU: the sum rounded to the dtype, fp32 statistics, one final rounding.
    s = (x.float() + residual.float()).to(x.dtype) if residual is not None else x
    rstd = torch.rsqrt(s.float().square().sum(-1, keepdim=True) * (1.0 / x.shape[-1]) + eps)
    y = s.float() * rstd * gamma.float() + (bias.float() if bias is not None else 0.0)
    return y.to(x.dtype), (s if residual is not None else None)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_reference_comparison_passes_the_kernel_arithmetic_and_catches_mistakes(dtype_name):
    # The GPU comparison's tolerance, checked on the CPU: fp32 arithmetic like the kernel's passes (including values
    # that underflow to fp16 subnormals), and a dropped bias or a wrong epsilon fail.
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    for hidden, rows in ((64, 128), (1000, 7), (8200, 3)):
        x = torch.randn(rows, hidden, dtype=dtype)
        x[0, :5] = torch.tensor([1e-6, -3e-7, 0.0, 2e-5, 1e-3], dtype=dtype)  # tiny values: subnormal outputs
        gamma = torch.randn(hidden, dtype=dtype) * 0.5 + 1
        residual = torch.randn(rows, hidden, dtype=dtype)
        bias = torch.randn(hidden, dtype=dtype)
        for r, b in ((None, None), (residual, None), (None, bias), (residual, bias)):
            y, s = _emulate_kernel(x, gamma, 1e-5, r, b)
            _assert_matches(y, s, x, gamma, 1e-5, r, b, dtype_name)
        ref, scale, _ = rmsnorm_reference(x, gamma, 1e-5, residual, bias)
        no_bias, _ = _emulate_kernel(x, gamma, 1e-5, residual, None)
        assert error_ratio(no_bias, ref, scale, RTOL[dtype_name]) > 1
        small = x * 1e-3  # epsilon matters when the mean square is near it
        ref, scale, _ = rmsnorm_reference(small, gamma, 1e-5)
        wrong_eps, _ = _emulate_kernel(small, gamma, 1e-3)
        assert error_ratio(wrong_eps, ref, scale, RTOL[dtype_name]) > 1


# ----------------------------------------------------------------------------------------------------------------------
# Errors a user sees


def test_missing_kernel_library_raises_with_the_build_command(monkeypatch, tmp_path):
    monkeypatch.delenv(plugin.KERNEL_LIB_ENV, raising=False)
    with pytest.raises(NormexportError) as raised:
        plugin.find_kernel_library(tmp_path)
    assert str(tmp_path) in raised.value.message
    assert plugin.BUILD_COMMAND in raised.value.hint

    monkeypatch.setenv(plugin.KERNEL_LIB_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(NormexportError) as raised:
        plugin.find_kernel_library(tmp_path)
    assert plugin.KERNEL_LIB_ENV in raised.value.message


def test_missing_plugin_library_raises_with_the_build_command(monkeypatch, tmp_path):
    monkeypatch.delenv(plugin.PLUGIN_LIB_ENV, raising=False)
    with pytest.raises(NormexportError) as raised:
        plugin.find_plugin_library(tmp_path)
    assert "--tensorrt-root" in raised.value.hint
    fake = tmp_path / "libcustom.so"
    fake.write_bytes(b"")
    monkeypatch.setenv(plugin.PLUGIN_LIB_ENV, str(fake))
    assert plugin.find_plugin_library(tmp_path) == fake


def test_find_uses_the_build_folder(built, monkeypatch):
    monkeypatch.delenv(plugin.KERNEL_LIB_ENV, raising=False)
    assert plugin.find_kernel_library(built.build_dir) == built.kernel_lib


def test_build_says_which_tool_is_missing(monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(building.shutil, "which", lambda name: None if name == "cmake" else real_which(name))
    with pytest.raises(NormexportError) as raised:
        plugin.build(tmp_path)
    assert "cmake" in raised.value.message and "nvcc" not in raised.value.message

    monkeypatch.setattr(building.shutil, "which", lambda name: None if name == "nvcc" else real_which(name))
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.setattr(building, "_NVCC_FALLBACKS", (str(tmp_path / "no-nvcc"),))
    with pytest.raises(NormexportError) as raised:
        plugin.build(tmp_path)
    assert "nvcc" in raised.value.message and "CUDACXX" in raised.value.hint


def test_cli_build_prints_built_and_skipped(built):
    result = CliRunner().invoke(
        plugin_cli,
        ["build", "--build-dir", str(built.build_dir), "--tensorrt-root", "", "--cuda-archs", built.cuda_architectures],
    )
    assert result.exit_code == 0, result.output
    assert f"built   {built.kernel_lib}" in result.output
    if built.plugin_lib is None:
        assert "skipped normexport_rmsnorm_plugin: TensorRT" in result.output
    path = CliRunner().invoke(plugin_cli, ["path", "--kernel", "--build-dir", str(built.build_dir)])
    assert path.exit_code == 0 and path.output.strip() == str(built.kernel_lib)


def test_forward_needs_cuda_tensors(built):
    x = torch.ones(2, 8)
    with pytest.raises(ValueError, match="CUDA tensor"):
        plugin.rmsnorm_forward(x, torch.ones(8), 1e-5, library=built.kernel_lib)


# ----------------------------------------------------------------------------------------------------------------------
# GPU: results against a float64 reference


def _assert_matches(y, s, x, gamma, eps, residual, bias, dtype_name):
    ref, scale, s_ref = rmsnorm_reference(x, gamma, eps, residual, bias)
    assert torch.isfinite(y).all(), "some outputs were not written (still NaN)"
    worst = error_ratio(y, ref, scale, RTOL[dtype_name])
    assert worst <= 1.0, f"y error {worst:.3g}x the tolerance (rtol {RTOL[dtype_name]})"
    if residual is not None:
        assert torch.isfinite(s).all(), "some sums were not written (still NaN)"
        s_scale = x.double().abs() + residual.double().abs()
        s_worst = error_ratio(s, s_ref, s_scale, RTOL[dtype_name])
        assert s_worst <= 1.0, f"sum error {s_worst:.3g}x the tolerance"


def _run_case(dtype_name, hidden, rows, with_residual, with_bias, *, offset=0, lead=()):
    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device="cuda").manual_seed(hidden * 1000 + rows * 10 + 2 * with_residual + with_bias)

    def randn(*shape):
        # `offset` elements of padding in front make the data pointer misaligned for vector loads
        flat = torch.randn(offset + int(torch.tensor(shape).prod()), generator=generator, device="cuda", dtype=dtype)
        return flat[offset:].view(*shape)

    shape = (*lead, rows, hidden)
    x = randn(*shape)
    gamma = randn(hidden) * 0.5 + 1
    residual = randn(*shape) if with_residual else None
    bias = randn(hidden) if with_bias else None
    eps = 1e-5
    y = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    s = torch.full(shape, float("nan"), device="cuda", dtype=dtype) if with_residual else None
    result = plugin.rmsnorm_forward(x, gamma, eps, residual=residual, bias=bias, out=y, residual_out=s)
    torch.cuda.synchronize()
    if with_residual:
        assert result[0] is y and result[1] is s
    else:
        assert result is y
    _assert_matches(y, s, x, gamma, eps, residual, bias, dtype_name)


@needs_cuda
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["noresidual", "residual"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_kernel_matches_float64_reference(built, dtype_name, hidden, rows, with_residual, with_bias):
    _run_case(dtype_name, hidden, rows, with_residual, with_bias)


@needs_cuda
@pytest.mark.parametrize("with_residual", [False, True], ids=["noresidual", "residual"])
@pytest.mark.parametrize(
    "dtype_name,hidden,rows", [(d, h, r) for d, cases in EXTRA_HIDDEN.items() for h, r in cases]
)
def test_kernel_other_variants(built, dtype_name, hidden, rows, with_residual):
    _run_case(dtype_name, hidden, rows, with_residual, with_bias=True)


@needs_cuda
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_kernel_misaligned_pointers_use_the_scalar_path(built, dtype_name):
    _run_case(dtype_name, MISALIGNED_HIDDEN, 7, True, True, offset=1)


@needs_cuda
def test_kernel_leading_dims_and_many_rows(built):
    _run_case("float16", 768, 33, True, False, lead=(3,))
    _run_case("bfloat16", 64, 5000, False, True)  # several blocks, several rows per block


@needs_cuda
def test_kernel_runs_on_the_current_stream(built):
    x = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    gamma = torch.randn(1024, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = plugin.rmsnorm_forward(x, gamma, 1e-6)
    stream.synchronize()
    _assert_matches(y, None, x, gamma, 1e-6, None, None, "float16")


@needs_cuda
def test_forward_checks_shapes_and_dtypes(built):
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="gamma"):
        plugin.rmsnorm_forward(x, torch.ones(63, device="cuda"), 1e-5)
    with pytest.raises(ValueError, match="gamma"):
        plugin.rmsnorm_forward(x, torch.ones(64, device="cuda", dtype=torch.float16), 1e-5)
    with pytest.raises(TypeError):
        plugin.rmsnorm_forward(x.double(), torch.ones(64, device="cuda", dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="out"):
        plugin.rmsnorm_forward(x, torch.ones(64, device="cuda"), 1e-5, out=torch.empty(4, 32, device="cuda"))


def test_plugin_command_whose_module_fails_to_import_says_why(tmp_path):
    # normexport.plugin.cli set to None in sys.modules: importing it raises ImportError, as a broken install would.
    script = "import sys; sys.modules['normexport.plugin.cli'] = None; from normexport.cli import main; main()"
    root = str(Path(plugin.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", script, "plugin", "build", "--build-dir", str(tmp_path / "out"), "--cuda-archs", "90"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert run.returncode == 2, run.stderr
    error, hint = run.stderr.strip().splitlines()
    assert error.startswith("error: normexport plugin is unavailable: ")
    assert "normexport.plugin.cli" in error  # the ImportError's own message
    assert hint.startswith("hint: ")
    assert not (tmp_path / "out").exists()
    listed = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0 and "plugin" in listed.stdout
