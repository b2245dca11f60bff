"""What fusing RMSNorm buys on onnxruntime CPU (issue 2). Two tables, one run, markdown out.

(a) The shipped model ``models/tinyllama.pt`` through normexport's own chain
    (``pipeline.convert(..., Options(validate=False))``: load, export, fuse for ``ort``, bench):
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
from normexport.runners import make_onnx_runner  # noqa: E402

MODEL = common.ROOT / "models" / "tinyllama.pt"
NORM_SHAPE = (1, 2048, 4096)


def part_a(args, threads: int, tmp: Path) -> str:
    opts = pipeline.Options(
        target="ort", validate=False, bench=True, output=tmp / "tinyllama.ort.onnx",
        warmup=args.warmup_model, iters=args.iters_model, threads=threads,
    )
    t = time.perf_counter()
    rep = pipeline.convert(MODEL, opts)
    wall = time.perf_counter() - t
    b = rep.bench
    lat = b.latency_ms

    # What onnxruntime runs: re-export the same way the pipeline did (same exporter, opset)
    # for the unfused model (convert deletes its work folder); the fused one is the output.
    from normexport.export import export_onnx
    from normexport.fuse import save_onnx
    from normexport.load import make_inputs

    loaded, specs = pipeline.prepare_model(MODEL, pipeline.Options())
    with common.quiet():
        exp = export_onnx(loaded, make_inputs(specs, 0), rep.opset)
    save_onnx(exp.model, tmp / "unfused.onnx")
    ops_u = common.norm_ops(common.ort_optimized_ops(tmp / "unfused.onnx", threads))
    ops_f = common.norm_ops(common.ort_optimized_ops(tmp / "tinyllama.ort.onnx", threads))

    names = {"torch": "PyTorch eager", "onnx_unfused": "ONNX unfused (ORT CPU)", "onnx_fused": "ONNX fused, normexport `ort` (ORT CPU)"}
    ops = {"torch": "-", "onnx_unfused": common.fmt_ops(ops_u), "onnx_fused": common.fmt_ops(ops_f)}
    rows = []
    for k in ("torch", "onnx_unfused", "onnx_fused"):
        lt = lat[k]
        share = b.norm_share.get(k)
        rows.append([names[k], common.ms(lt.median), common.ms(lt.p90), common.ms(lt.min), common.ratio(lt.median, lat["torch"].median),
                     f"{100 * share:.1f}%" if share is not None else "-", ops[k]])
    table = common.md_table(["variant", "median ms", "p90 ms", "min ms", "/ torch", "norm share (ORT profiler)", "norm ops ORT runs after its optimizer"], rows, "lrrrrrl")
    fused_unfused = b.ratio("onnx_fused", "onnx_unfused")
    fused_torch = b.ratio("onnx_fused", "torch")
    inp = ", ".join(f"{i['name']} {i['dtype']} {'x'.join(map(str, i['shape']))}" for i in rep.inputs)
    lines = [
        f"### (a) {MODEL.relative_to(common.ROOT)}: PyTorch vs unfused vs fused ONNX",
        "",
        f"Input {inp}; exported by normexport with the {rep.exporter} exporter at opset {rep.opset} (a TorchScript archive takes no other); "
        f"{rep.fusion.fused} RMSNorms fused ({', '.join(f'{v}x {k}' for k, v in rep.fusion.to_json()['ops'].items())}). "
        f"onnxruntime CPU, default graph optimizations (ORT_ENABLE_ALL); {b.threads} threads for every variant "
        f"(torch.set_num_threads / intra_op_num_threads); {b.warmup} warm-up calls each, then {b.iters} timed calls each in 5 interleaved rounds, "
        f"{b.input_sets} input sets rotated (`normexport.bench.interleaved` via `pipeline.convert`). convert's wall time {wall:.1f} s.",
        "",
        table,
        "",
        f"**fused / unfused = {fused_unfused:.3f}**, fused / torch = {fused_torch:.3f}, unfused / torch = {b.ratio('onnx_unfused', 'torch'):.3f} (medians).",
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
        "unfused": make_onnx_runner(unfused, "ort-cpu", optimize=True, threads=threads),
        "ort": make_onnx_runner(tmp / "rms_ort.onnx", "ort-cpu", optimize=True, threads=threads),
        "onnx": make_onnx_runner(tmp / "rms_onnx.onnx", "ort-cpu", optimize=True, threads=threads),
        "identity": make_onnx_runner(ident, "ort-cpu", optimize=True, threads=threads),
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
