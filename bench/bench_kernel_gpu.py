#!/usr/bin/env python
"""GPU bandwidth benchmark of the RMSNorm CUDA kernel (plugins/rmsnorm). Not a test: it prints a markdown table.

For each dtype, T (rows) and H (hidden) it times, with CUDA events and the L2 cache flushed before every run:
  - the kernel (called through ctypes, no Python wrapper overhead),
  - a device-to-device copy moving the same number of bytes (torch `copy_`): the practical bandwidth ceiling,
  - torch.nn.functional.rms_norm in eager mode and under torch.compile (with a residual: x + r, then rms_norm).
Bandwidth is effective: bytes that must move (read x and gamma, write y; with a residual also read r and write
the sum) over the median time.

Needs a CUDA GPU, PyTorch with CUDA and the built kernel library (`normexport plugin build`).

    python bench/bench_kernel_gpu.py                     # fp16, bf16; H 1024..8192; T 128, 4096, 16384
    python bench/bench_kernel_gpu.py --no-compile --residual off
    python bench/bench_kernel_gpu.py --check             # correctness against a float64 reference instead
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

DTYPES = ("float16", "bfloat16")
HIDDEN = (1024, 2048, 4096, 8192)
TOKENS = (128, 4096, 16384)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--hidden", nargs="+", type=int, default=list(HIDDEN), metavar="H")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), metavar="T")
    parser.add_argument("--residual", choices=["off", "on", "both"], default="both")
    parser.add_argument("--reps", type=int, default=100, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--lib", type=Path, default=None, help="kernel library [default: find_kernel_library()]")
    parser.add_argument("--check", action="store_true", help="run the correctness comparison instead of timing")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Median GPU time of a callable, with the L2 cache flushed (overwritten) before every timed run."""

    def __init__(self, torch, reps: int, warmup: int):
        self.torch = torch
        self.reps = reps
        self.warmup = warmup
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 64 << 20
        self.flush_buffer = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            self.flush_buffer.zero_()  # queued before the start event, so the host enqueues fn while it runs
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends)) / 1e3


def run_bench(args, torch, plugin, lib_path: Path) -> int:
    import torch.nn.functional as F

    lib = plugin.load_kernel_library(lib_path)
    timer = Timer(torch, args.reps, args.warmup)
    if not args.no_compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    residual_modes = {"off": [False], "on": [True], "both": [False, True]}[args.residual]

    def eager(x, r, g, hidden):
        if r is None:
            return F.rms_norm(x, (hidden,), g, args.eps)
        s = x + r
        return F.rms_norm(s, (hidden,), g, args.eps), s

    compiled = None if args.no_compile else torch.compile(eager, dynamic=False)

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    print(f"# RMSNorm kernel bandwidth: {props.name}")
    print()
    print(f"- command: `{' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`")
    print(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
          f"L2 {timer.flush_buffer.numel() // 2 / 2**20:.0f} MiB, compute capability {props.major}.{props.minor}")
    print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
          f"kernel library {lib_path}")
    print(f"- median of {args.reps} runs after {args.warmup} warm-up runs, L2 flushed before each run; eps {args.eps}")
    print("- GB/s: bytes that must move (x, gamma, y; with residual also r and the sum) / time; copy: torch copy_ "
          "of a buffer moving the same bytes; vs torch: torch time / kernel time (> 1: the kernel is faster)")
    print()
    header = ["dtype", "T", "H", "residual", "kernel µs", "kernel GB/s", "% of copy", "copy GB/s", "eager µs",
              "vs eager"]
    if compiled is not None:
        header += ["compile µs", "vs compile"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i > 3 else "---" for i in range(len(header))) + "|")
    sys.stdout.flush()

    worst_fraction = math.inf
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        code = plugin.DTYPE_CODES[dtype_name]
        element = torch.finfo(dtype).bits // 8
        for tokens in args.tokens:
            for hidden in args.hidden:
                for with_residual in residual_modes:
                    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
                    g = torch.randn(hidden, device="cuda", dtype=dtype)
                    r = torch.randn_like(x) if with_residual else None
                    y = torch.empty_like(x)
                    s = torch.empty_like(x) if with_residual else None
                    moved = (2 + 2 * with_residual) * x.numel() * element + hidden * element
                    pointers = [x.data_ptr(), r.data_ptr() if r is not None else None, g.data_ptr(), None,
                                y.data_ptr(), s.data_ptr() if s is not None else None]

                    def kernel():
                        status = lib.normexport_rmsnorm_forward(
                            code, *pointers, tokens, hidden, args.eps, torch.cuda.current_stream().cuda_stream or None
                        )
                        if status != 0:
                            raise RuntimeError(lib.normexport_rmsnorm_error_string(status).decode())

                    source = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
                    target = torch.empty_like(source)
                    t_kernel = timer(kernel)
                    t_copy = timer(lambda: target.copy_(source))
                    t_eager = timer(lambda: eager(x, r, g, hidden))
                    row = [dtype_name, str(tokens), str(hidden), "yes" if with_residual else "no",
                           f"{t_kernel * 1e6:.1f}", f"{moved / t_kernel / 1e9:.0f}",
                           f"{100 * t_copy / t_kernel:.0f}%", f"{moved / t_copy / 1e9:.0f}",
                           f"{t_eager * 1e6:.1f}", f"{t_eager / t_kernel:.2f}x"]
                    if compiled is not None:
                        t_compiled = timer(lambda: compiled(x, r, g, hidden))
                        row += [f"{t_compiled * 1e6:.1f}", f"{t_compiled / t_kernel:.2f}x"]
                    print("| " + " | ".join(row) + " |")
                    sys.stdout.flush()
                    if tokens >= 4096:
                        worst_fraction = min(worst_fraction, t_copy / t_kernel)
                    del x, g, r, y, s, source, target
    if worst_fraction < math.inf:
        print()
        print(f"Lowest kernel bandwidth for T >= 4096: {100 * worst_fraction:.0f}% of the copy (target >= 90%).")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Correctness


def run_check(args, torch, plugin, lib_path: Path) -> int:
    """The kernel against the float64 reference, the same comparison as tests/test_plugin.py (same code)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from kernel_reference import error_ratio, rmsnorm_reference

    rtol = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
    failures = 0
    print("| dtype | rows | hidden | residual | bias | max error / tolerance | result |")
    print("|---|---:|---:|---|---|---:|---|")
    for dtype_name in ("float32", "float16", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        for hidden in (64, 100, 768, 1000, 1001, 4096, 8200, 20000, 40000):
            for rows in (1, 7, 128):
                for with_residual in (False, True):
                    for with_bias in (False, True):
                        x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
                        g = torch.randn(hidden, device="cuda", dtype=dtype) * 0.5 + 1
                        r = torch.randn_like(x) if with_residual else None
                        b = torch.randn(hidden, device="cuda", dtype=dtype) if with_bias else None
                        y = torch.full_like(x, float("nan"))
                        s = torch.full_like(x, float("nan")) if with_residual else None
                        plugin.rmsnorm_forward(x, g, args.eps, residual=r, bias=b, out=y, residual_out=s,
                                               library=lib_path)
                        torch.cuda.synchronize()
                        ref, scale, s_ref = rmsnorm_reference(x, g, args.eps, r, b)
                        ratio = error_ratio(y, ref, scale, rtol[dtype_name])
                        ok = bool(torch.isfinite(y).all()) and ratio <= 1.0
                        if with_residual:
                            s_scale = x.double().abs() + r.double().abs()
                            ok = ok and bool(torch.isfinite(s).all())
                            ok = ok and error_ratio(s, s_ref, s_scale, rtol[dtype_name]) <= 1.0
                        failures += not ok
                        print(f"| {dtype_name} | {rows} | {hidden} | {'yes' if with_residual else 'no'} | "
                              f"{'yes' if with_bias else 'no'} | {ratio:.3f} | {'ok' if ok else 'FAIL'} |")
    print()
    print(f"{failures} failed" if failures else "all passed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_kernel_gpu: PyTorch is not installed; this benchmark needs PyTorch with CUDA.", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            f"bench_kernel_gpu: no CUDA GPU available (torch {torch.__version__}, torch.cuda.is_available() is "
            "False); this benchmark only runs on a machine with an NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    from normexport import plugin
    from normexport.errors import NormexportError

    try:
        lib_path = args.lib if args.lib is not None else plugin.find_kernel_library()
        plugin.load_kernel_library(lib_path)
    except NormexportError as error:
        print(f"bench_kernel_gpu: {error}", file=sys.stderr)
        return 2
    return run_check(args, torch, plugin, lib_path) if args.check else run_bench(args, torch, plugin, lib_path)


if __name__ == "__main__":
    sys.exit(main())
