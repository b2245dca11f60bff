"""Peak memory of load + fuse + save against the model's size: it must stay under 2x the
model plus a constant (the interpreter with onnx, onnx_ir, onnxscript and onnxruntime loaded).

Each case generates a decoder-like ONNX graph with onnx.helper (no PyTorch export): ``--layers``
blocks of RMSNorm, Q/K/V/O MatMuls, residual Add, RMSNorm, gate/up/down MatMuls, residual Add;
a final norm and an LM head. Then a child process runs ``normexport.fuse.load_onnx``,
``fuse_model`` and ``save_onnx`` and reports its peak resident memory (VmHWM from
/proc/self/status: anonymous and file-backed pages, so memory-mapped weights count). A second
child that only imports the same modules (and loads nothing) gives the constant.

Cases (each can be picked with ``--case``):
* ``inline``: ~300 MB fp32, weights inline in the .onnx, norms as torch's dynamo chain;
* ``inline-constants``: the same weights as Constant nodes instead of initializers;
* ``external``: ~2.7 GB fp16 with external data, norms as the dynamo chain (Cast to fp32);
* ``external-weightless``: ~2.7 GB fp16 with external data, every norm the opset-23 form
  torch writes for ``F.rms_norm(x, shape)`` without weight: ``RMSNormalization(x,
  ConstantOfShape(Shape(x)))``. The fused model's data must stay the size of the source's.

    .venv/bin/python bench/bench_fuse_memory.py                    # all cases (~5 min, 8 GB disk)
    .venv/bin/python bench/bench_fuse_memory.py --case inline       # one case
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from normexport.fuse.ops import RMS_NORMALIZATION  # noqa: E402

CASES = {
    # name: (layers, hidden, inter, vocab, dtype, external, norm, weights as)
    "inline": (6, 1024, 2816, 8000, "float32", False, "chain", "initializers"),
    "inline-constants": (6, 1024, 2816, 8000, "float32", False, "chain", "constants"),
    "external": (24, 2048, 5632, 32000, "float16", True, "chain", "initializers"),
    "external-weightless": (24, 2048, 5632, 32000, "float16", True, "exporter-weightless", "initializers"),
}
NP = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


class Graph:
    def __init__(self, dtype: str, weights_as: str):
        self.np_dtype, self.onnx_dtype = NP[dtype]
        self.weights_as = weights_as
        self.nodes, self.inits, self.n = [], [], 0
        self.block = (np.random.default_rng(0).standard_normal(1 << 16) * 0.02).astype(self.np_dtype)

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.n += 1
        out = f"{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"node_{out}", **attrs))
        return out

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        size = int(np.prod(shape))
        arr = np.tile(self.block, -(-size // self.block.size))[:size].reshape(shape)
        if self.weights_as == "constants":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(arr, name)))
            return name
        return self.const(name, arr)

    def norm(self, x: str, form: str, hidden: int, tag: str) -> str:
        if form == "exporter-weightless":
            ones = self.op("ConstantOfShape", [self.op("Shape", [x])], value=helper.make_tensor("v", self.onnx_dtype, [1], [1]))
            return self.op(RMS_NORMALIZATION, [x, ones], axis=-1, epsilon=1e-6, stash_type=1)
        fp16 = self.onnx_dtype == TensorProto.FLOAT16
        h = self.op("Cast", [x], to=TensorProto.FLOAT) if fp16 else x
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [self.op("ReduceMean", [self.op("Pow", [h, "two"]), "axes_last"], keepdims=1), "eps"])])])
        y = self.op("Mul", [h, inv])
        if fp16:
            y = self.op("Cast", [y], to=TensorProto.FLOAT16)
        w = self.weight(f"{tag}.weight", (hidden,))
        return self.op("Mul", [w, y])


def build(path: Path, layers, hidden, inter, vocab, dtype, external, norm, weights_as) -> int:
    """Write the model; returns its size on disk in bytes (.onnx plus .data)."""
    g = Graph(dtype, weights_as)
    g.const("two", np.array(2.0, np.float32))
    g.const("axes_last", np.array([-1], np.int64))
    g.const("eps", np.array(1e-6, np.float32))
    x = g.op("Gather", [g.weight("embed", (vocab, hidden)), "input_ids"], axis=0)
    for i in range(layers):
        n = g.norm(x, norm, hidden, f"l{i}.attn_norm")
        q, k, v = (g.op("MatMul", [n, g.weight(f"l{i}.{p}", (hidden, hidden))]) for p in "qkv")
        att = g.op("Mul", [g.op("Softmax", [g.op("Mul", [q, k])], axis=-1), v])
        x = g.op("Add", [x, g.op("MatMul", [att, g.weight(f"l{i}.o", (hidden, hidden))])])
        n = g.norm(x, norm, hidden, f"l{i}.mlp_norm")
        gate = g.op("MatMul", [n, g.weight(f"l{i}.gate", (hidden, inter))])
        up = g.op("MatMul", [n, g.weight(f"l{i}.up", (hidden, inter))])
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        x = g.op("Add", [x, g.op("MatMul", [g.op("Mul", [silu, up]), g.weight(f"l{i}.down", (inter, hidden))])])
    n = g.norm(x, norm, hidden, "final_norm")
    g.op("MatMul", [n, g.weight("lm_head", (hidden, vocab))])
    g.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(g.nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", g.onnx_dtype, ["batch", "seq", vocab])], initializer=g.inits)
    opset = 23 if norm == "exporter-weightless" else 18
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bench_fuse_memory")
    model.ir_version = 10
    del g, graph
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return dir_bytes(path.parent)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


CHILD = r"""
import json, sys, time
from normexport.fuse import fuse_model, load_onnx, save_onnx
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
if sys.argv[1] == "baseline":
    print(json.dumps({"peak": hwm()}))
    sys.exit(0)
t = time.perf_counter()
m = load_onnx(sys.argv[1]); after_load = hwm()
r = fuse_model(m, sys.argv[3]); after_fuse = hwm()
save_onnx(m, sys.argv[2])
print(json.dumps({"load": after_load, "fuse": after_fuse, "peak": hwm(), "fused": r.fused, "notes": r.notes,
                  "nodes": [r.nodes_before, r.nodes_after], "seconds": time.perf_counter() - t}))
"""


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(name: str, tmp: Path) -> list[str]:
    layers, hidden, inter, vocab, dtype, external, norm, weights_as = CASES[name]
    src, dst = tmp / "src", tmp / "dst"
    src.mkdir()
    dst.mkdir()
    size = build(src / "model.onnx", layers, hidden, inter, vocab, dtype, external, norm, weights_as)
    r = child(str(src / "model.onnx"), str(dst / "model.fused.onnx"), "ort")
    out_size = dir_bytes(dst)
    base = child("baseline")["peak"]
    mb = 1 << 20
    over = r["peak"] - base
    return [name, f"{size / mb:.0f}", f"{base / mb:.0f}", f"{r['load'] / mb:.0f}", f"{r['fuse'] / mb:.0f}", f"{r['peak'] / mb:.0f}",
            f"**{over / size:.2f}**", f"{out_size / mb:.0f}", f"{r['fused']} ({r['nodes'][0]} -> {r['nodes'][1]} nodes)",
            f"{r['seconds']:.1f}", "; ".join(r["notes"]) or "-"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="peak memory of normexport's load + fuse + save against the model's size")
    ap.add_argument("--case", choices=list(CASES), action="append", help="a case to run (default: all)")
    ap.add_argument("--tmp", default="/tmp", help="parent of the temp folders (removed at the end)")
    args = ap.parse_args(argv)
    print(f"# bench_fuse_memory\n\nMachine: {common.machine_line(1)}\n\nCommand: `{common.command_line()}`\n", flush=True)
    rows = []
    for name in args.case or list(CASES):
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-fuse-memory-{name}-", dir=args.tmp))
        try:
            t = time.perf_counter()
            rows.append(run_case(name, tmp))
            print(f"{name}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(common.md_table(["case", "model MB", "baseline MB", "peak after load MB", "after fuse MB", "peak MB",
                           "(peak - baseline) / model", "fused output MB", "norms fused", "seconds", "notes"], rows, "lrrrrrrrlrl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
