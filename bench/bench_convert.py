"""What fusing RMSNorm buys on onnxruntime CPU. Two tables, one run, markdown out.

(a) The shipped model ``models/tinyllama.pt`` through normexport's own chain
    (``pipeline.convert(..., ConvertOptions(validate=None))``: load, export, fuse for ``ort``, bench):
    PyTorch eager vs the unfused ONNX export vs the fused ONNX, onnxruntime CPU with its default
    graph optimizations, one thread count for all (1 by default), timed in interleaved rounds by
    ``normexport.bench.interleaved``. Also: which norm ops onnxruntime actually runs in each
    ONNX model after its own optimizer (it can fuse some exporters' chains by itself).

(b) One RMSNorm on x = [1, 2048, 4096] fp32 (``torch.nn.RMSNorm(4096, eps=1e-6)``):
    the chain torch's dynamo exporter emits at opset 18 (Pow, ReduceMean, Add, Sqrt,
    Reciprocal, Mul, Mul) vs the same fused by normexport for ``ort``
    (SimplifiedLayerNormalization) vs for ``onnx`` (RMSNormalization, opset 23), all on
    onnxruntime CPU, against two copies of the same bytes: ``np.copyto`` into a preallocated
    array (one thread, no runtime overhead) and an onnxruntime model whose one node is
    Identity (a copy with session.run's overhead and a fresh output buffer, like the others).
    GB/s counts read x + write y (2 x 32 MiB); the weight (16 KiB) is not counted.

    .venv/bin/python bench/bench_convert.py                 # the recorded run (~1 min)
    .venv/bin/python bench/bench_convert.py --quick         # a smoke run (~30 s)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402

from normexport import pipeline  # noqa: E402
from normexport.bench import interleaved  # noqa: E402
from normexport.runners import DEFAULT_BACKEND, make_onnx_runner  # noqa: E402

MODEL = common.ROOT / "models" / "tinyllama.pt"
NORM_SHAPE = (1, 2048, 4096)


def part_a(args, threads: int, tmp: Path) -> str:
    """The shipped model, exported the way `convert` does, timed as PyTorch eager, unfused ONNX,
    fused ONNX with the residual Adds folded (SkipSimplifiedLayerNormalization, convert's
    default) and fused with them left separate (--no-residual-fusion), all in one interleaved run."""
    from normexport.bench import feeds_numpy, norm_share, unfused_norm_node_names
    from normexport.export import export_onnx
    from normexport.fuse import fuse_model, load_onnx, save_onnx
    from normexport.load import make_inputs
    from normexport.runners import TorchRunner

    t = time.perf_counter()
    loaded, specs = pipeline.prepare_model(MODEL, pipeline.LoadOptions())
    with common.quiet():
        exp = export_onnx(loaded, make_inputs(specs, 0))
    paths = {"onnx_unfused": tmp / "unfused.onnx", "onnx_fused": tmp / "fused_skip.onnx", "onnx_fused_separate": tmp / "fused_separate.onnx"}
    save_onnx(exp.model, paths["onnx_unfused"])
    reports = {}
    for key, residual in (("onnx_fused", True), ("onnx_fused_separate", False)):
        m = load_onnx(paths["onnx_unfused"])
        reports[key] = fuse_model(m, "ort", residual=residual)
        save_onnx(m, paths[key])
    prep = time.perf_counter() - t

    feeds = [make_inputs(specs, 1000 + i) for i in range(3)]
    np_feeds = feeds_numpy(feeds)
    runners = {"torch": TorchRunner(loaded.module, [s.name for s in specs], threads=threads)}
    runners.update({k: make_onnx_runner(p, DEFAULT_BACKEND, optimize=True, threads=threads) for k, p in paths.items()})
    for r in runners.values():
        r.__enter__()
    try:
        lat = interleaved(runners, np_feeds, args.warmup_model, args.iters_model, rounds=10)
    finally:
        for r in runners.values():
            r.__exit__(None, None, None)
    prof = max(5, min(args.iters_model, 20))
    share = {
        "onnx_unfused": norm_share(paths["onnx_unfused"], np_feeds, threads, prof, unfused_norm_node_names(paths["onnx_unfused"])),
        "onnx_fused": norm_share(paths["onnx_fused"], np_feeds, threads, prof),
        "onnx_fused_separate": norm_share(paths["onnx_fused_separate"], np_feeds, threads, prof),
    }
    ops = {k: common.fmt_ops(common.norm_ops(common.ort_optimized_ops(p, threads))) for k, p in paths.items()}
    names = {
        "torch": "PyTorch eager",
        "onnx_unfused": "ONNX unfused (dynamo chain)",
        "onnx_fused": "ONNX fused, `ort`, residual folded (convert's default)",
        "onnx_fused_separate": "ONNX fused, `ort`, `--no-residual-fusion`",
    }
    rows = []
    for k in names:
        lt = lat[k]
        rows.append([names[k], common.ms(lt.median), common.ms(lt.p90), common.ms(lt.min), common.ratio(lt.median, lat["onnx_unfused"].median),
                     f"{100 * share[k]:.1f}%" if k in share else "-", ops.get(k, "-")])
    table = common.md_table(["variant", "median ms", "p90 ms", "min ms", "/ unfused", "norm share (ORT profiler)", "norm ops ORT runs after its optimizer"], rows, "lrrrrrl")
    inp = ", ".join(f"{s.name} {s.dtype} {'x'.join(map(str, s.shape))}" for s in specs)
    r_skip = lat["onnx_fused"].median / lat["onnx_unfused"].median
    r_sep = lat["onnx_fused_separate"].median / lat["onnx_unfused"].median
    lines = [
        f"### (a) {MODEL.relative_to(common.ROOT)}: PyTorch vs unfused vs fused ONNX",
        "",
        f"Input {inp}; a torch.export archive, exported by normexport with the {exp.exporter} exporter at opset {exp.opset}; "
        f"{reports['onnx_fused'].fused} RMSNorms fused ({', '.join(f'{v}x {k}' for k, v in reports['onnx_fused'].to_json()['ops'].items())}; "
        f"with --no-residual-fusion: {', '.join(f'{v}x {k}' for k, v in reports['onnx_fused_separate'].to_json()['ops'].items())}). "
        f"onnxruntime CPU, default graph optimizations (ORT_ENABLE_ALL); {threads} thread(s) for every variant; "
        f"{args.warmup_model} warm-up calls each, then {args.iters_model} timed calls each in 10 interleaved rounds, 3 input sets rotated "
        f"(`normexport.bench.interleaved`). Export and fusion took {prep:.1f} s.",
        "",
        table,
        "",
        f"**fused / unfused = {r_skip:.3f}** (residual folded), **{r_sep:.3f}** (--no-residual-fusion); "
        f"fused / torch = {lat['onnx_fused'].median / lat['torch'].median:.3f} (medians, one run).",
    ]
    return "\n".join(lines)


def part_b(args, threads: int, tmp: Path) -> str:
    import torch

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(NORM_SHAPE[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(NORM_SHAPE[-1]))
    x = torch.randn(NORM_SHAPE)
    unfused = common.export_dynamo(norm, (x,), tmp / "rms_unfused.onnx", opset=18, input_names=["x"])
    import onnx

    chain = [n.op_type for n in onnx.load_model(str(unfused)).graph.node]
    rep_ort = common.fuse_copy(unfused, tmp / "rms_ort.onnx", "ort")
    rep_onnx = common.fuse_copy(unfused, tmp / "rms_onnx.onnx", "onnx")
    ident = common.identity_model(tmp / "identity.onnx", "x", NORM_SHAPE)

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal(NORM_SHAPE, dtype=np.float32)} for _ in range(2)]
    runners = {
        "unfused": make_onnx_runner(unfused, DEFAULT_BACKEND, optimize=True, threads=threads),
        "ort": make_onnx_runner(tmp / "rms_ort.onnx", DEFAULT_BACKEND, optimize=True, threads=threads),
        "onnx": make_onnx_runner(tmp / "rms_onnx.onnx", DEFAULT_BACKEND, optimize=True, threads=threads),
        "identity": make_onnx_runner(ident, DEFAULT_BACKEND, optimize=True, threads=threads),
        "copyto": common.NumpyCopyRunner("x", feeds[0]["x"]),
    }
    for r in runners.values():
        r.__enter__()
    try:
        # the three norms agree with each other and with torch (a sanity check, not validation)
        with torch.no_grad():
            ref = norm(torch.from_numpy(feeds[0]["x"])).numpy()
        diffs = {k: float(np.max(np.abs(runners[k].infer(feeds[0])[runners[k].output_names[0]] - ref))) for k in ("unfused", "ort", "onnx")}
        lat = interleaved(runners, feeds, args.warmup_norm, args.iters_norm, rounds=args.rounds)
    finally:
        for r in runners.values():
            r.__exit__(None, None, None)
    ops_seen = {k: common.fmt_ops(common.norm_ops(common.ort_optimized_ops(p, threads))) or "none"
                for k, p in (("unfused", unfused), ("ort", tmp / "rms_ort.onnx"), ("onnx", tmp / "rms_onnx.onnx"))}

    nbytes = 2 * int(np.prod(NORM_SHAPE)) * 4
    names = {
        "unfused": f"dynamo chain, opset 18 ({', '.join(chain)})",
        "ort": "normexport `ort`: SimplifiedLayerNormalization",
        "onnx": "normexport `onnx`: RMSNormalization (opset 23)",
        "identity": "memcpy: ORT model with one Identity node",
        "copyto": "memcpy: np.copyto into a preallocated array (1 thread)",
    }
    rows = []
    for k in ("unfused", "ort", "onnx", "identity", "copyto"):
        lt = lat[k]
        gbs = nbytes / (lt.median * 1e-3) / 1e9
        rows.append([names[k], common.ms(lt.median), common.ms(lt.p90), f"{gbs:.1f}",
                     common.ratio(lt.median, lat["copyto"].median), common.ratio(lt.median, lat["identity"].median),
                     f"{diffs[k]:.1e}" if k in diffs else "-"])
    table = common.md_table(["variant", "median ms", "p90 ms", "GB/s (read x + write y)", "/ np.copyto", "/ ORT Identity", "max abs diff vs torch"], rows, "lrrrrrr")
    med = {k: v.median for k, v in lat.items()}
    lines = [
        f"### (b) one RMSNorm, x = [{', '.join(map(str, NORM_SHAPE))}] fp32, on onnxruntime CPU vs a memcpy",
        "",
        f"`torch.nn.RMSNorm(4096, eps=1e-6)` exported by `torch.onnx.export(dynamo=True, opset_version=18)`; fused copies by "
        f"`normexport.fuse.fuse_model` (`ort`: {rep_ort.fused} fused, `onnx`: {rep_onnx.fused} fused). "
        f"After onnxruntime's own optimizer the graphs run: unfused -> {ops_seen['unfused']}; ort -> {ops_seen['ort']}; onnx -> {ops_seen['onnx']}. "
        f"{threads} intra-op threads for the ORT sessions; np.copyto is one thread. {args.warmup_norm} warm-up calls each, "
        f"{args.iters_norm} timed calls each in {args.rounds} interleaved rounds, 2 input sets. Bytes per call: {nbytes / 2**20:.0f} MiB.",
        "",
        table,
        "",
        f"fused `ort` / unfused = {med['ort'] / med['unfused']:.3f}; `onnx` / unfused = {med['onnx'] / med['unfused']:.3f}; "
        f"unfused / ORT Identity = {med['unfused'] / med['identity']:.2f}, fused `ort` / ORT Identity = {med['ort'] / med['identity']:.2f} (medians).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every variant (default 1, like np.copyto; on a shared 2-core machine two threads per call "
                         "wait on whichever is descheduled)")
    ap.add_argument("--iters-model", type=int, default=1000, help="(a) timed calls per variant")
    ap.add_argument("--warmup-model", type=int, default=20)
    ap.add_argument("--iters-norm", type=int, default=500, help="(b) timed calls per variant")
    ap.add_argument("--warmup-norm", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=50, help="(b) interleaved rounds")
    ap.add_argument("--only", choices=("a", "b"), default=None)
    ap.add_argument("--quick", action="store_true", help="few iterations: to try the script, not to record")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters_model, args.warmup_model, args.iters_norm, args.warmup_norm, args.rounds = 30, 5, 20, 2, 5
    threads = args.threads
    print(f"# bench_convert\n\nMachine: {common.machine_line(threads)}\n\nCommand: `{common.command_line()}`\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    t0 = time.perf_counter()
    try:
        if args.only in (None, "a"):
            print(part_a(args, threads, tmp) + "\n", flush=True)
        if args.only in (None, "b"):
            print(part_b(args, threads, tmp) + "\n", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
