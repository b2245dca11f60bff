"""Pre-LN vs converted Pre-RMSNorm on onnxruntime CPU (a benchmark; not a test).

A GPT-3-Small-width decoder (d=768, 12 heads, ``--layers`` blocks, default 4; GELU MLP of
4d; learned positions; tied head) with random seeded weights is exported to ONNX
(``torch.onnx.export(dynamo=True, opset 18)``) twice:

* Pre-LN: the model as is. Its norms export as ``LayerNormalization`` and onnxruntime fuses
  them itself (with the residual add, into ``SkipLayerNormalization``).
* Pre-RMSNorm: ``normexport.ln2rms`` converts the model (checked equivalent), the export
  gives the decomposed RMS chain, and ``normexport.fuse.fuse_model(model, target="ort")``
  fuses every one into ``(Skip)SimplifiedLayerNormalization``.
  ``--fold-affine`` also runs the folded variant (norm gain/bias folded into the next linear).

Each model is timed at every ``--seq`` (batch 1) after warm-up; the table gives the median
latency, the ratio to Pre-LN and the logits' max relative difference to Pre-LN under ORT.
A "norms only" block (``--norms-only``) times the 2L+1 norms alone, where their cost is not
hidden behind the matmuls and the LM head.

    python bench/bench_ln2rms.py --threads 1          # the recorded run: 4 layers, vocab 50257, 128 and 512
    python bench/bench_ln2rms.py --layers 12 --vocab 50257 --seq 128 512 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.gpt2_style import build_gpt2  # noqa: E402
from normexport.ln2rms import RMSNorm, ln2rms  # noqa: E402


def to_onnx(model: nn.Module, ids: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (ids,), dynamo=True, opset_version=18, verbose=False).model_proto


def fuse_rms(proto, residual: bool = True):
    """Fuse every RMSNorm chain for onnxruntime with normexport's fuser (``residual``: fold
    the residual Adds into SkipSimplifiedLayerNormalization, convert's default)."""
    import onnx_ir as ir

    from normexport.fuse import fuse_model

    model = ir.from_proto(proto)
    report = fuse_model(model, target="ort", residual=residual)
    return ir.to_proto(model), report


def session(proto, threads: int, dump: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if dump:
        so.optimized_model_filepath = dump
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def optimized_ops(proto, threads: int) -> Counter:
    """Op histogram of the graph onnxruntime actually runs (after its own fusions)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        session(proto, threads, dump=path)
        return Counter(n.op_type for n in onnx.load(path).graph.node)


def time_all(sessions: dict, feed, warmup: int, repeats: int) -> dict:
    """Median ms per session; runs are interleaved round-robin so drift hits all alike."""
    outs, times = {}, {k: [] for k in sessions}
    for k, sess in sessions.items():
        name = sess.get_inputs()[0].name
        for _ in range(warmup):
            outs[k] = sess.run(None, {name: feed})[0]
    for _ in range(repeats):
        for k, sess in sessions.items():
            name = sess.get_inputs()[0].name
            t0 = time.perf_counter()
            sess.run(None, {name: feed})
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v) * 1e3, outs[k]) for k, v in times.items()}


class NormsOnly(nn.Module):
    """The model's norms, chained: what the norms alone cost at this width."""

    def __init__(self, norms):
        super().__init__()
        self.norms = nn.ModuleList(norms)
        self.emb = nn.Embedding(50, norms[0].normalized_shape[0])

    def forward(self, input_ids):
        x = self.emb(input_ids % 50)
        for n in self.norms:
            x = x + n(x)  # keep a residual add so ORT can use its Skip* kernels on both sides
        return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--fold-affine", action="store_true", help="also time the folded Pre-RMSNorm variant")
    ap.add_argument("--norms-only", action="store_true", help="also time the norms alone")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    n_pos = max(max(args.seq), 1024)
    model, _ = build_gpt2(vocab=args.vocab, d=args.d, n_layer=args.layers, n_head=args.heads, n_positions=n_pos)
    example = {"input_ids": torch.randint(0, args.vocab, (1, 64), generator=torch.Generator().manual_seed(0))}
    variants = [("Pre-RMSNorm (ln2rms + fuse)", False)] + ([("Pre-RMSNorm, folded affine", True)] if args.fold_affine else [])
    converted = {}
    for label, fold in variants:
        conv, rep = ln2rms(model, example, fold_affine=fold)
        converted[label] = conv
        print(f"# ln2rms {label}: {rep.layer_norms_replaced} norms, folded {rep.folded}, max_rel {rep.max_rel:.2e}", file=sys.stderr)

    print(
        f"onnxruntime {ort.__version__} CPU, {args.threads or 'default'} intra-op threads, "
        f"{os.cpu_count()} CPUs; GPT-3-Small width: d={args.d}, {args.heads} heads, {args.layers} layers, "
        f"vocab {args.vocab}; batch 1; median of {args.repeats} runs after {args.warmup} warm-up\n"
    )
    rows = []
    base = "Pre-LN (LayerNormalization, ORT-fused)"
    for seq in args.seq:
        ids = torch.randint(0, args.vocab, (1, seq), generator=torch.Generator().manual_seed(seq))
        feed = ids.numpy()
        protos = {base: to_onnx(model, ids)}
        for label, conv in converted.items():
            exported = to_onnx(conv, ids)
            for suffix, residual in (("", True), (", --no-residual-fusion", False)):
                proto, frep = fuse_rms(exported, residual)
                if "LayerNormalization" in Counter(n.op_type for n in proto.graph.node):
                    raise SystemExit("converted model still has LayerNormalization")
                if frep.fused != 2 * args.layers + 1:
                    raise SystemExit(f"normexport fused {frep.fused} norms, expected {2 * args.layers + 1}")
                protos[label + suffix] = proto
        if args.norms_only:
            lns = [nn.LayerNorm(args.d) for _ in range(2 * args.layers + 1)]
            ln_model = NormsOnly(lns).eval()
            rms_model = NormsOnly([RMSNorm(args.d, 1e-5, ln.weight, ln.bias) for ln in lns]).eval()
            rms_model.emb = ln_model.emb
            protos[f"norms only: {len(lns)} x LayerNorm"] = to_onnx(ln_model, ids)
            protos[f"norms only: {len(lns)} x RMSNorm (fused)"] = fuse_rms(to_onnx(rms_model, ids))[0]
        sessions = {k: session(p, args.threads) for k, p in protos.items()}
        results = time_all(sessions, feed, args.warmup, args.repeats)
        base_ms, base_out = results[base]
        ln_only = None
        for label, (ms, out) in results.items():
            ops = optimized_ops(protos[label], args.threads)
            norm_ops = {k: v for k, v in ops.items() if "LayerNorm" in k}
            if label.startswith("norms only"):
                ln_only = ln_only or ms
                rows.append((seq, label, ms, ms / ln_only, float("nan"), norm_ops))
                continue
            rel = float(np.abs(out - base_out).max() / np.abs(base_out).max())
            rows.append((seq, label, ms, ms / base_ms, rel, norm_ops))

    print("| tokens | model | median ms | ratio | max rel vs Pre-LN | norm ops ORT runs |")
    print("|---:|---|---:|---:|---:|---|")
    for seq, label, ms, ratio, rel, ops in rows:
        rel_s = "" if rel != rel else f"{rel:.1e}"
        ops_s = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))
        print(f"| {seq} | {label} | {ms:.2f} | {ratio:.3f} | {rel_s} | {ops_s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
