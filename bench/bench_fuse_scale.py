"""Fusing a 1B-parameter-scale graph takes seconds: load, fuse, save timed apart.

The graph is built directly with onnx.helper, no PyTorch export: a Llama-style decoder of
``--layers`` (24) blocks at hidden ``--hidden`` (2048), MLP ``--inter`` (5632), vocab
``--vocab`` (32000), TinyLlama-1.1B's shape but with full-width K/V (no GQA), so
24 x 51.4M + 2 x 65.5M (embedding, LM head) = 1.36B parameters, ``--dtype`` float16 (2.7 GB) by
default. Each block: the RMSNorm chain as torch's dynamo exporter writes a Llama norm
(Cast to fp32 when the model is fp16, Pow, ReduceMean with axes as input, Add eps, Sqrt,
Reciprocal, Mul, Cast back, Mul weight), Q/K/V MatMuls, a stand-in for attention
(Softmax(q * k) * v: no real attention maths, but a valid graph), O MatMul, residual Add,
second norm, gate/up MatMuls, SiLU (Sigmoid, Mul), down MatMul, residual Add; a final norm and
the LM head. 2 x 24 + 1 = 49 norms. Weights are a repeated random block, written as external
data with ``onnx.save_model(..., save_as_external_data=True)`` into a temp folder under /tmp
(refused unless the disk has twice the room the run needs), removed at the end.

Timed: ``normexport.fuse.load_onnx`` (external data stays on disk until read),
``fuse_model(model, "ort")``, ``save_onnx`` (external data again: > 1.8 GB). Then a sanity
check that the generator makes a valid, runnable model and the fusion keeps its outputs: the
same generator at a toy size (2 layers, hidden 64, fp32) run on onnxruntime before and after.

    .venv/bin/python bench/bench_fuse_scale.py                 # the recorded run (~1-2 min)
    .venv/bin/python bench/bench_fuse_scale.py --layers 2      # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from normexport.fuse import fuse_model, load_onnx, save_onnx  # noqa: E402

DTYPES = {"float16": (np.float16, TensorProto.FLOAT16), "float32": (np.float32, TensorProto.FLOAT)}


class Builder:
    """Nodes, initializers and unique names for one graph."""

    def __init__(self, dtype: str, seed: int = 0, block: int = 1 << 16):
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.nodes: list = []
        self.inits: list = []
        self.n = 0
        rng = np.random.default_rng(seed)
        self.block = (rng.standard_normal(block) * 0.02).astype(self.np_dtype)
        self.params = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def weight(self, name: str, shape: tuple[int, ...], around_one: bool = False) -> str:
        size = int(np.prod(shape))
        reps = -(-size // self.block.size)
        arr = np.tile(self.block, reps)[:size].reshape(shape)
        if around_one:
            arr = (arr + 1).astype(self.np_dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.params += size
        return name

    def const(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        out = self.name(base or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"node_{out}", **attrs))
        return out


def rms_norm(b: Builder, x: str, weight: str, fp16: bool) -> str:
    """The chain dynamo emits for a Llama RMSNorm (``weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)``)."""
    h = b.op("Cast", [x], "h", to=TensorProto.FLOAT) if fp16 else x
    sq = b.op("Pow", [h, "two"], "pow")
    mean = b.op("ReduceMean", [sq, "axes_last"], "mean", keepdims=1)
    var = b.op("Add", [mean, "eps"], "add")
    root = b.op("Sqrt", [var], "sqrt")
    inv = b.op("Reciprocal", [root], "rsqrt")
    y = b.op("Mul", [h, inv], "mul")
    if fp16:
        y = b.op("Cast", [y], "to_copy", to=TensorProto.FLOAT16)
    return b.op("Mul", [weight, y], "mul_w")


def build_decoder(path: Path, layers: int, hidden: int, inter: int, vocab: int, dtype: str, external: bool) -> dict:
    """Write the decoder to ``path`` (weights beside it in ``<name>.data`` when ``external``)."""
    fp16 = dtype == "float16"
    b = Builder(dtype)
    b.const("two", 2.0)
    b.const("axes_last", [-1], np.int64)
    b.const("eps", 1e-6)
    embed = b.weight("model.embed_tokens.weight", (vocab, hidden))
    x = b.op("Gather", [embed, "input_ids"], "embedding", axis=0)
    for i in range(layers):
        p = f"model.layers.{i}"
        n = rms_norm(b, x, b.weight(f"{p}.input_layernorm.weight", (hidden,), True), fp16)
        q = b.op("MatMul", [n, b.weight(f"{p}.self_attn.q_proj.weight", (hidden, hidden))], "q")
        k = b.op("MatMul", [n, b.weight(f"{p}.self_attn.k_proj.weight", (hidden, hidden))], "k")
        v = b.op("MatMul", [n, b.weight(f"{p}.self_attn.v_proj.weight", (hidden, hidden))], "v")
        att = b.op("Softmax", [b.op("Mul", [q, k], "qk")], "softmax", axis=-1)
        o = b.op("MatMul", [b.op("Mul", [att, v], "attn"), b.weight(f"{p}.self_attn.o_proj.weight", (hidden, hidden))], "o")
        x = b.op("Add", [x, o], "residual")
        n = rms_norm(b, x, b.weight(f"{p}.post_attention_layernorm.weight", (hidden,), True), fp16)
        g = b.op("MatMul", [n, b.weight(f"{p}.mlp.gate_proj.weight", (hidden, inter))], "gate")
        u = b.op("MatMul", [n, b.weight(f"{p}.mlp.up_proj.weight", (hidden, inter))], "up")
        silu = b.op("Mul", [g, b.op("Sigmoid", [g], "sigmoid")], "silu")
        d = b.op("MatMul", [b.op("Mul", [silu, u], "gated"), b.weight(f"{p}.mlp.down_proj.weight", (inter, hidden))], "down")
        x = b.op("Add", [x, d], "residual")
    n = rms_norm(b, x, b.weight("model.norm.weight", (hidden,), True), fp16)
    b.op("MatMul", [n, b.weight("lm_head.weight", (hidden, vocab))], "logits")
    b.nodes[-1].output[0] = "logits"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", b.onnx_dtype, ["batch", "seq", vocab])]
    graph = helper.make_graph(b.nodes, "llama_style_decoder", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="bench_fuse_scale")
    model.ir_version = 8
    nodes, params = len(b.nodes), b.params
    del b, graph
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    del model
    gc.collect()
    return {"nodes": nodes, "params": params}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def sanity_check(tmp: Path) -> str:
    """The generator at a toy size, fp32: valid (checker), runs on onnxruntime, and the fused
    model computes the same logits."""
    import onnxruntime as ort

    src, dst = tmp / "toy.onnx", tmp / "toy.fused.onnx"
    build_decoder(src, layers=2, hidden=64, inter=172, vocab=128, dtype="float32", external=False)
    onnx.checker.check_model(str(src), full_check=True)
    m = load_onnx(src)
    rep = fuse_model(m, "ort")
    save_onnx(m, dst)
    ids = np.random.default_rng(0).integers(0, 128, (1, 16), dtype=np.int64)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    outs = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0] for p in (src, dst)]
    diff = float(np.max(np.abs(outs[0] - outs[1])))
    ok = rep.fused == 5 and diff < 1e-4
    return (f"toy model (2 layers, hidden 64, fp32): onnx.checker full_check passes; fused {rep.fused}/5 norms; "
            f"onnxruntime logits before vs after fusion: max abs diff {diff:.1e} -> {'OK' if ok else 'MISMATCH'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="time normexport's fusion on a 1B-parameter-scale ONNX graph with external data")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16")
    ap.add_argument("--target", default="ort")
    ap.add_argument("--tmp", default="/tmp", help="parent of the temp folder (removed at the end)")
    args = ap.parse_args(argv)

    itemsize = np.dtype(DTYPES[args.dtype][0]).itemsize
    h, i, v, L = args.hidden, args.inter, args.vocab, args.layers
    params = L * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h
    weight_bytes = params * itemsize
    needed = 2 * weight_bytes + (64 << 20)  # the source model and the fused copy, plus slack
    free = shutil.disk_usage(args.tmp).free
    print(f"# bench_fuse_scale\n\nMachine: {common.machine_line(1)}\n\nCommand: `{common.command_line()}`\n", flush=True)
    print(f"Graph: {L} layers, hidden {h}, MLP {i}, vocab {v}, {args.dtype}: {params / 1e9:.2f}B parameters, "
          f"{weight_bytes / 1e9:.2f} GB of weights. Disk: {free / 1e9:.1f} GB free under {args.tmp}, this run needs {needed / 1e9:.1f} GB.", flush=True)
    if free < 2 * needed:
        print(f"refusing: {free / 1e9:.1f} GB free is less than twice the {needed / 1e9:.1f} GB this run writes", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="bench-fuse-scale-", dir=args.tmp))
    src_dir, out_dir = tmp / "src", tmp / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    try:
        t = time.perf_counter()
        built = build_decoder(src_dir / "model.onnx", L, h, i, v, args.dtype, external=True)
        gen_s = time.perf_counter() - t
        src_bytes = dir_bytes(src_dir)
        t = time.perf_counter()
        onnx.checker.check_model(str(src_dir / "model.onnx"))
        check_s = time.perf_counter() - t
        print(f"generated in {gen_s:.1f} s: {built['nodes']} nodes, {built['params'] / 1e9:.2f}B parameters, "
              f"{src_bytes / 1e9:.2f} GB on disk (model.onnx + model.onnx.data); onnx.checker passes ({check_s:.1f} s)\n", flush=True)

        os.sync()  # the timed load should not compete with the generator's pending writes
        t = time.perf_counter()
        model = load_onnx(src_dir / "model.onnx")
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        rep = fuse_model(model, args.target)
        fuse_s = time.perf_counter() - t
        t = time.perf_counter()
        save_onnx(model, out_dir / "model.fused.onnx")
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        os.sync()  # save_onnx's writes may still sit in the page cache; not part of the fusion
        sync_s = time.perf_counter() - t
        out_bytes = dir_bytes(out_dir)
        del model
        gc.collect()

        t = time.perf_counter()
        fused_proto = onnx.load_model(str(out_dir / "model.fused.onnx"), load_external_data=False)
        ops = common.op_counts(fused_proto.graph)
        reload_s = time.perf_counter() - t
        # every external-data file the fused model names must be beside it
        locations = {e.value for init in fused_proto.graph.initializer for e in init.external_data if e.key == "location"}
        missing = sorted(loc for loc in locations if not (out_dir / loc).is_file())
        inline = sum(1 for init in fused_proto.graph.initializer if init.data_location != TensorProto.EXTERNAL)
        expected = 2 * L + 1
        rows = [
            ["normexport.fuse.load_onnx", f"{load_s:.2f}"],
            [f"normexport.fuse.fuse_model(model, \"{args.target}\")", f"**{fuse_s:.2f}**"],
            ["normexport.fuse.save_onnx (external data)", f"{save_s:.2f}"],
            ["load + fuse + save", f"{load_s + fuse_s + save_s:.2f}"],
            ["(then os.sync(): flushing the saved weights to disk)", f"({sync_s:.2f})"],
        ]
        print(common.md_table(["step", "seconds"], rows, "lr"))
        print()
        rows = [
            ["nodes before / after", f"{rep.nodes_before} / {rep.nodes_after}"],
            ["norms fused (expected 2 x layers + 1)", f"{rep.fused} (expected {expected}) {'OK' if rep.fused == expected else 'MISMATCH'}"],
            ["fused ops in the output", common.fmt_ops(common.norm_ops(ops))],
            ["near-misses left alone", str(len(rep.skipped))],
            ["FuseReport.seconds", f"{rep.seconds:.2f}"],
            ["files: source / fused", f"{src_bytes / 1e9:.2f} GB / {out_bytes / 1e9:.2f} GB ({', '.join(sorted(p.name for p in out_dir.iterdir()))})"],
            ["fused model's weights", f"{len(fused_proto.graph.initializer) - inline} external in {', '.join(sorted(locations)) or '-'}, {inline} inline; "
             + (f"**BROKEN: {', '.join(missing)} not beside the fused model**" if missing else "all external files present")],
            ["reading the fused graph back (onnx, no weights)", f"{reload_s:.2f} s"],
        ]
        print(common.md_table(["", ""], rows, "ll"))
        print()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"removed {tmp}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as toy:
        print(sanity_check(Path(toy)))
    return 0 if rep.fused == expected and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
