"""How much of a transformer's inference time is normalization, and what does RMSNorm save?
GPT-3-style decoders on onnxruntime CPU, Pre-LN vs Pre-RMSNorm, unfused and fused.

Decoders at GPT-3's widths (Brown et al. 2020, table 2.1: Small d=768 12 heads of 64, Medium
1024 16x64, Large 1536 16x96, XL 2048 24x128), but with FEWER layers than GPT-3 (``--layers``,
default 2; GPT-3 has 12/24/24/24) and a small vocabulary (``--vocab``, default 8192; GPT-3 has
50257) so that this runs on a 2-core CPU. Learned positions (2048), MLP 4d with GELU (erf),
causal softmax attention, untied LM head, batch 1, ``--tokens`` tokens (default 128), fp32.
Three variants per size, with the same seeded linear weights:

* ``LN``: Pre-LN with ``nn.LayerNorm`` (eps 1e-5), exported by ``torch.onnx.export(dynamo=True,
  opset_version=18)`` as one ``LayerNormalization`` node each, which onnxruntime runs as is,
  except the final norm, whose residual sum has no other use: its default optimizations fuse
  that Add + LayerNormalization into ``SkipLayerNormalization`` (checked and printed below).
* ``RMS-unfused``: Pre-RMSNorm with a Llama-style RMSNorm (``x.float()``, ``pow(2).mean(-1)``,
  ``rsqrt``, ``* weight``; eps 1e-6), same export: the decomposed chain (Pow, ReduceMean, Add,
  Sqrt, Reciprocal, Mul, Mul), which onnxruntime does not fuse (checked and printed).
* ``RMS-fused``: that ONNX file fused by ``normexport.fuse.fuse_model(model, "ort")``
  ((Skip)SimplifiedLayerNormalization).

All three run on onnxruntime CPU with its default graph optimizations and one thread count (1 by default),
timed in interleaved rounds (``normexport.bench.interleaved``) so that a noisy neighbour slows
them alike; the normalization share of each comes from onnxruntime's profiler
(``normexport.bench.norm_share``: summed kernel time of the norm ops, or for the unfused
chain of the nodes ``normexport.bench.unfused_norm_node_names`` names, less the residual Adds
the Skip fusion absorbs, over all kernel time); a second profile breaks the norm time down by op.
Last, each way of running one pre-norm alone at [1, tokens, d] (Add + LayerNormalization,
SkipLayerNormalization, Add + the chain, Add + SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization), to show which kernels cost what.

    .venv/bin/python bench/bench_gpt3_norms.py                         # the recorded run
    .venv/bin/python bench/bench_gpt3_norms.py --tokens 512 --layers 4 # closer to the paper
    .venv/bin/python bench/bench_gpt3_norms.py --sizes small --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from normexport.bench import interleaved, norm_share, unfused_norm_node_names  # noqa: E402
from normexport.runners import DEFAULT_BACKEND, make_onnx_runner  # noqa: E402
from normexport.fuse.ops import MS_DOMAIN, RMS_NORMALIZATION, SIMPLIFIED_LN, SKIP_SIMPLIFIED_LN  # noqa: E402


@dataclass(frozen=True)
class Size:
    name: str
    d: int
    heads: int
    d_head: int
    gpt3_layers: int
    paper_rms_over_ln: str  # Jiang et al. 2023 (NeurIPS), as quoted in the benchmark brief


# GPT-3 table 2.1 widths; the paper's Pre-RMSNorm / Pre-LN inference-time ratios as quoted
SIZES = {
    "small": Size("Small", 768, 12, 64, 12, "~0.90"),
    "medium": Size("Medium", 1024, 16, 64, 24, "~0.97"),
    "large": Size("Large", 1536, 16, 96, 24, "~0.95"),
    "xl": Size("XL", 2048, 24, 128, 24, "~1.00 (no difference)"),
}


# ---------------------------------------------------------------------------------------------
# The model


class LlamaRMSNorm(nn.Module):
    """RMSNorm as Llama (HF) writes it; dynamo exports it as the 7-op chain."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(kind: str, d: int) -> nn.Module:
    return nn.LayerNorm(d, eps=1e-5) if kind == "ln" else LlamaRMSNorm(d, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, d_head: int):
        super().__init__()
        self.heads, self.d_head = heads, d_head
        self.qkv = nn.Linear(d, 3 * heads * d_head)
        self.proj = nn.Linear(heads * d_head, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.d_head).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, self.heads * self.d_head))


class Block(nn.Module):
    def __init__(self, size: Size, norm: str):
        super().__init__()
        self.norm1 = make_norm(norm, size.d)
        self.attn = Attention(size.d, size.heads, size.d_head)
        self.norm2 = make_norm(norm, size.d)
        self.fc = nn.Linear(size.d, 4 * size.d)
        self.out = nn.Linear(4 * size.d, size.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class GPT3Style(nn.Module):
    def __init__(self, size: Size, norm: str, layers: int, vocab: int, n_ctx: int = 2048):
        super().__init__()
        self.wte = nn.Embedding(vocab, size.d)
        self.wpe = nn.Embedding(n_ctx, size.d)
        self.blocks = nn.ModuleList([Block(size, norm) for _ in range(layers)])
        self.norm_f = make_norm(norm, size.d)
        self.head = nn.Linear(size.d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)[None]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm_f(x))


def build(size: Size, norm: str, layers: int, vocab: int, seed: int = 0) -> GPT3Style:
    """Seeded weights; the same draw for every parameter the two norm kinds share."""
    torch.manual_seed(seed)
    model = GPT3Style(size, norm, layers, vocab)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name or name.startswith("norm_f"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.01))
        gn = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if ".norm" in name or name.startswith("norm_f"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gn))
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# One norm alone, at the size's activation shape


MICRO = {
    "ln": "Add + LayerNormalization (ORT graph opts off: as ORT leaves the inner LNs)",
    "skipln": "Add + LayerNormalization (ORT opts on: it makes SkipLayerNormalization)",
    "chain": "Add + dynamo RMS chain (7 ops; ORT opts on)",
    "sln": "Add + SimplifiedLayerNormalization (ORT opts on)",
    "rms23": "Add + RMSNormalization (opset 23; normexport `onnx` target's op)",
    "skipsln": "SkipSimplifiedLayerNormalization (normexport's fusion)",
}


def micro_model(kind: str, shape: list[int]) -> bytes:
    """``y = norm(x + s)`` with a [d] gain (and a bias for LayerNorm), written one way or another."""
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    d = shape[-1]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "g"),
             numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    add = helper.make_node("Add", ["x", "s"], ["a"], name="residual")
    mk = helper.make_node
    if kind in ("ln", "skipln"):
        nodes = [add, mk("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-5, name="ln")]
    elif kind == "chain":
        nodes = [add, mk("Pow", ["a", "two"], ["p"]), mk("ReduceMean", ["p", "axes"], ["m"], keepdims=1), mk("Add", ["m", "eps"], ["v"]),
                 mk("Sqrt", ["v"], ["r"]), mk("Reciprocal", ["r"], ["i"]), mk("Mul", ["a", "i"], ["n"]), mk("Mul", ["g", "n"], ["y"])]
    elif kind == "sln":
        nodes = [add, mk(SIMPLIFIED_LN, ["a", "g"], ["y"], axis=-1, epsilon=1e-6, stash_type=1)]
    elif kind == "rms23":
        nodes = [add, mk(RMS_NORMALIZATION, ["a", "g"], ["y"], axis=-1, epsilon=1e-6, stash_type=1)]
    else:
        nodes = [mk(SKIP_SIMPLIFIED_LN, ["x", "s", "g"], ["y"], domain=MS_DOMAIN, epsilon=1e-6)]
    vi = [helper.make_tensor_value_info(n, TP.FLOAT, shape) for n in ("x", "s", "y")]
    graph = helper.make_graph(nodes, kind, vi[:2], vi[2:], initializer=inits)
    opset = 23 if kind == "rms23" else 18
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 11 if opset == 23 else 8
    return model.SerializeToString()


def micro_bench(d: int, tokens: int, threads: int, args) -> dict:
    """Each way of running one pre-norm (with its residual add) at [1, tokens, d], interleaved."""
    shape = [1, tokens, d]
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal(shape, dtype=np.float32), "s": rng.standard_normal(shape, dtype=np.float32)} for _ in range(2)]
    runners = {k: make_onnx_runner(micro_model(k, shape), DEFAULT_BACKEND, optimize=(k != "ln"), threads=threads) for k in MICRO}
    for r in runners.values():
        r.__enter__()
    try:
        lat = interleaved(runners, feeds, 5, args.micro_iters, rounds=args.rounds)
    finally:
        for r in runners.values():
            r.__exit__(None, None, None)
    return {k: v.median * 1e3 for k, v in lat.items()}  # microseconds


# ---------------------------------------------------------------------------------------------
# One size


def norm_chain_only(path: Path, names: set[str]) -> set[str]:
    """``unfused_norm_node_names`` also names the residual Adds that the fusion absorbs into
    SkipSimplifiedLayerNormalization; keep only the norm's own nodes (the Add of eps is fed by
    the ReduceMean, a residual Add is not), so that the unfused share is the chain's alone."""
    import onnx

    nodes = onnx.load_model(str(path), load_external_data=False).graph.node
    producer = {o: n for n in nodes for o in n.output}
    keep = set()
    for n in nodes:
        if n.name not in names:
            continue
        if n.op_type == "Add" and not any(producer.get(i) is not None and producer[i].op_type == "ReduceMean" for i in n.input):
            continue
        keep.add(n.name)
    return keep


VARIANTS = ("LN", "RMS-unfused", "RMS-fused")


def run_size(size: Size, args, threads: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(7))
    paths = {}
    for norm, variant in (("ln", "LN"), ("rms", "RMS-unfused")):
        model = build(size, norm, args.layers, args.vocab)
        params = n_params(model)
        paths[variant] = common.export_dynamo(model, (ids,), tmp / f"{size.name}-{norm}.onnx", opset=18, input_names=["input_ids"])
        del model
        gc.collect()
    fuse = common.fuse_copy(paths["RMS-unfused"], tmp / f"{size.name}-rms-fused.onnx", "ort", residual=not args.no_residual_fusion)
    paths["RMS-fused"] = tmp / f"{size.name}-rms-fused.onnx"
    expected = 2 * args.layers + 1
    if fuse.fused != expected:
        print(f"WARNING: normexport fused {fuse.fused} norms in {size.name}, expected {expected}", flush=True)
    export_s = time.perf_counter() - t0

    # what onnxruntime runs after its own optimizer, and whether the chain's nodes survive it
    graphs = {v: common.ort_optimized_graph(p, threads) for v, p in paths.items()}
    ops = {v: common.norm_ops(common.op_counts(g)) for v, g in graphs.items()}
    absorbed = unfused_norm_node_names(paths["RMS-unfused"])
    chain = norm_chain_only(paths["RMS-unfused"], absorbed)
    kept = chain & {n.name for n in graphs["RMS-unfused"].node}
    del graphs

    rng = np.random.default_rng(11)
    feeds = [{"input_ids": rng.integers(0, args.vocab, (1, args.tokens), dtype=np.int64)} for _ in range(2)]
    runners = {v: make_onnx_runner(paths[v], DEFAULT_BACKEND, optimize=True, threads=threads) for v in VARIANTS}
    for r in runners.values():
        r.__enter__()
    try:
        outs = {}
        for v, r in runners.items():  # two warm-up calls each; the second sizes the run
            r.infer(feeds[0])
            outs[v] = r.infer(feeds[1])[r.output_names[0]]
        est = sum(runners[v].time_once(feeds[0]) for v in VARIANTS)
        iters = int(min(args.max_iters, max(args.min_iters, args.seconds / max(est, 1e-6))))
        iters = max(args.rounds, iters // args.rounds * args.rounds)
        lat = interleaved(runners, feeds, args.warmup, iters, rounds=args.rounds)
    finally:
        for r in runners.values():
            r.__exit__(None, None, None)
    unfused_vs_fused = float(np.max(np.abs(outs["RMS-unfused"] - outs["RMS-fused"])))

    prof_iters = max(3, min(15, iters // 2))
    share = {
        "LN": norm_share(paths["LN"], feeds, threads, prof_iters),
        "RMS-unfused": norm_share(paths["RMS-unfused"], feeds, threads, prof_iters, chain),
        "RMS-fused": norm_share(paths["RMS-fused"], feeds, threads, prof_iters),
    }
    breakdown = {v: common.profile_norm_ops(paths[v], feeds, threads, prof_iters, skip=2, chain=chain if v == "RMS-unfused" else None)
                 for v in VARIANTS}
    for p in paths.values():
        Path(p).unlink(missing_ok=True)
    gc.collect()
    micro = micro_bench(size.d, args.tokens, threads, args)
    return dict(size=size, params=params, lat=lat, share=share, ops=ops, iters=iters, prof_iters=prof_iters, breakdown=breakdown, micro=micro,
                chain=len(chain), absorbed=len(absorbed), kept=len(kept), fused=fuse.fused, diff=unfused_vs_fused,
                seconds=time.perf_counter() - t0, export_s=export_s)


# ---------------------------------------------------------------------------------------------
# Tables


def tables(results: list[dict], args) -> str:
    rows = []
    for r in results:
        s, lat, sh = r["size"], r["lat"], r["share"]
        ln, un, fu = (lat[v].median for v in VARIANTS)
        rows.append([
            f"{s.name} (d={s.d}, {s.heads}x{s.d_head})", f"{r['params'] / 1e6:.0f}M",
            common.ms(ln), common.ms(un), common.ms(fu),
            f"**{fu / ln:.3f}**", f"{un / ln:.3f}",
            f"{100 * sh['LN']:.1f}%", f"{100 * sh['RMS-unfused']:.1f}%", f"{100 * sh['RMS-fused']:.1f}%",
            s.paper_rms_over_ln,
        ])
    main = common.md_table(
        ["size (width, heads x head dim)", "params", "LN ms", "RMS-unfused ms", "RMS-fused ms", "RMS-fused / LN", "RMS-unfused / LN",
         "norm share LN", "norm share RMS-unfused", "norm share RMS-fused", "paper: Pre-RMSNorm / Pre-LN"],
        rows, "lrrrrrrrrrl")

    rows2 = []
    for r in results:
        s, lat = r["size"], r["lat"]
        est = {v: lat[v].median * r["share"][v] for v in VARIANTS}
        rows2.append([s.name, " / ".join(common.ms(lat[v].p90) for v in VARIANTS), " / ".join(common.ms(lat[v].min) for v in VARIANTS),
                      f"{lat['RMS-fused'].min / lat['LN'].min:.3f}",
                      " / ".join(common.ms(est[v]) for v in VARIANTS),
                      common.ms(lat["LN"].median - lat["RMS-fused"].median),
                      f"{r['iters']} ({args.rounds} rounds)", str(r["prof_iters"])])
    detail = common.md_table(
        ["size", "p90 ms LN / unfused / fused", "min ms LN / unfused / fused", "RMS-fused / LN (mins)", "norm ms per call ≈ share x median (LN / unfused / fused)", "LN - RMS-fused ms",
         "timed calls per variant", "profiled calls"],
        rows2, "lrrrrrrr")

    rows3 = []
    for r in results:
        rows3.append([r["size"].name, common.fmt_ops(r["ops"]["LN"]), common.fmt_ops(r["ops"]["RMS-unfused"]),
                      common.fmt_ops(r["ops"]["RMS-fused"]), f"{r['fused']}", f"{r['kept']}/{r['chain']} (+{r['absorbed'] - r['chain']} residual Adds not counted)", f"{r['diff']:.1e}"])
    ops = common.md_table(
        ["size", "LN: norm ops ORT runs", "RMS-unfused: norm ops ORT runs", "RMS-fused: norm ops ORT runs",
         "norms fused by normexport", "chain nodes left in ORT's graph (counted as norm)", "max |unfused - fused| logits"],
        rows3, "llllrrr")
    rows4 = []
    for r in results:
        cells = []
        for v in VARIANTS:
            b = r["breakdown"][v]
            parts = ", ".join(f"{k.removeprefix('chain:')} {us:.0f}" for k, us in b["per_op_us"].items())
            cells.append(f"{b['norm_us']:.0f} ({parts}); {100 * b['share']:.1f}%")
        rows4.append([r["size"].name, *cells])
    breakdown = common.md_table(
        ["size", "LN: norm µs per call (by op); share", "RMS-unfused: chain µs per call (by op); share", "RMS-fused: norm µs per call (by op); share"],
        rows4, "llll")

    rows5 = []
    for r in results:
        m = r["micro"]
        rows5.append([f"{r['size'].name} [1, {args.tokens}, {r['size'].d}]", *(f"{m[k]:.0f}" for k in MICRO)])
    micro = common.md_table(["size, shape", *MICRO.values()], rows5, "l" + "r" * len(MICRO))
    return "\n\n".join([main, detail, ops,
                        "Norm time by op, from a second profile of each variant (as many calls as the profiled calls above, after 2 "
                        "warm-up calls; `norm_share` counts from the first call). Residual Adds are inside the Skip* ops, outside the others:", breakdown,
                        f"One pre-norm alone (with its residual add), µs per call, median of {args.micro_iters} interleaved calls:", micro])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="GPT-3-style decoders on onnxruntime CPU: Pre-LN vs Pre-RMSNorm (unfused, fused by normexport)")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (GPT-3: 12 for Small, 24 from Medium on)")
    ap.add_argument("--tokens", type=int, default=128, help="sequence length, batch 1 (the paper: 512)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary (GPT-3: 50257)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for every variant (default 1: on a shared 2-core machine two threads per call wait on "
                         "whichever is descheduled, and latencies jump in scheduler ticks)")
    ap.add_argument("--seconds", type=float, default=40.0, help="timing budget per size; sets the number of timed calls")
    ap.add_argument("--min-iters", type=int, default=20)
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant (after two sizing calls)")
    ap.add_argument("--micro-iters", type=int, default=100, help="calls per variant in the one-norm micro-benchmark")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few calls, not for recording")
    ap.add_argument("--no-residual-fusion", action="store_true",
                    help="RMS-fused keeps the residual Adds separate (Add + SimplifiedLayerNormalization) instead of "
                         "SkipSimplifiedLayerNormalization, whose onnxruntime CPU kernel is slower")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.min_iters, args.rounds, args.warmup, args.micro_iters = 2.0, 5, 5, 1, 20
    threads = args.threads

    print(f"# bench_gpt3_norms\n\nMachine: {common.machine_line(threads)}\n\nCommand: `{common.command_line()}`\n", flush=True)
    print(f"GPT-3-style decoders, {args.layers} layers (fewer than GPT-3's 12/24), vocab {args.vocab} (GPT-3: 50257), "
          f"batch 1 x {args.tokens} tokens, fp32, onnxruntime CPU (default graph optimizations), {threads} threads; "
          f"dynamo export at opset 18.\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpt3-"))
    results = []
    t0 = time.perf_counter()
    try:
        for key in args.sizes:
            r = run_size(SIZES[key], args, threads, tmp)
            lat = r["lat"]
            print(f"{r['size'].name}: LN {common.ms(lat['LN'].median)} ms, RMS-unfused {common.ms(lat['RMS-unfused'].median)} ms, "
                  f"RMS-fused {common.ms(lat['RMS-fused'].median)} ms ({r['iters']} calls each; size took {r['seconds']:.0f} s, "
                  f"export+fuse {r['export_s']:.0f} s)", flush=True)
            results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(tables(results, args))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
