"""Build small ONNX graphs that spell one RMSNorm (or a near-miss) a chosen way, and the
float64 NumPy reference of what the spelling computes. Used by the example and the
property-based fusion tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.2x/1.3x read it; set explicitly for hand-built graphs

NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


@dataclass(frozen=True)
class Spelling:
    shape: tuple = (2, 5, 16)
    dtype: int = TensorProto.FLOAT  # the model's dtype (input and output)
    compute_fp32: bool = False  # Cast x to fp32 for the norm, cast back after (Llama style)
    square: str = "pow"  # pow | mul
    inverse: str = "reciprocal"  # div | reciprocal | div1 | pow
    swap_mul: bool = False  # Mul(inv, x) instead of Mul(x, inv)
    swap_add: bool = False  # Add(eps, mean)
    axes_input: bool = True  # ReduceMean axes as an input (opset 18) or an attribute (opset 17)
    positive_axis: bool = False  # axes = [rank-1] instead of [-1]
    n_axes: int = 1  # normalize over the last n dims
    eps: float = 1e-6
    weight: str = "after"  # none | after (cast back, then Mul) | before (Mul in fp32, then cast) | gemma (1 + w)
    swap_weight: bool = False
    weight_shape: str = "vector"  # vector [H] | padded [1, 1, H] | bad [T, 1] (near-miss)
    bias: bool = False
    residual: bool = False  # x = a + b, the sum also a graph output
    shared_cast: bool = False  # the fp32 Cast of x is also used elsewhere (a graph output)
    # near-misses
    keepdims0: bool = False
    eps_input: bool = False  # eps is a graph input, not a constant
    extra_consumer: bool = False  # the mean square is also a graph output
    layernorm: bool = False  # subtract the mean first
    exponent: float = 2.0
    inverse_exponent: float = -0.5
    wrong_axis: bool = False  # mean over axis -2 instead of the last

    @property
    def opset(self) -> int:
        return 18 if self.axes_input else 17

    @property
    def near_miss(self) -> bool:
        return (
            self.keepdims0 or self.eps_input or self.extra_consumer or self.layernorm or self.exponent != 2.0
            or self.inverse_exponent != -0.5 or self.wrong_axis
        )


def build(sp: Spelling, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    dt = NP[sp.dtype]
    nodes, inits, inputs, outputs = [], [], [], []
    rank = len(sp.shape)
    hidden = tuple(sp.shape[rank - sp.n_axes :])

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=f"{op}_{out}", **attrs))
        return out

    comp = TensorProto.FLOAT if sp.compute_fp32 else sp.dtype
    cdt = NP[comp]
    if sp.residual:
        inputs += [helper.make_tensor_value_info("a", sp.dtype, sp.shape), helper.make_tensor_value_info("b", sp.dtype, sp.shape)]
        x = node("Add", ["a", "b"], "x")
        outputs.append(helper.make_tensor_value_info("x", sp.dtype, sp.shape))
    else:
        inputs.append(helper.make_tensor_value_info("x", sp.dtype, sp.shape))
        x = "x"
    h = node("Cast", [x], "h", to=comp) if sp.compute_fp32 else x
    if sp.compute_fp32 and sp.shared_cast:
        outputs.append(helper.make_tensor_value_info("h", comp, sp.shape))
    if sp.layernorm:
        m0 = node("ReduceMean", [h, const("ln_axes", np.array([-1], np.int64))] if sp.axes_input else [h], "ln_mean", **({} if sp.axes_input else {"axes": [-1]}))
        h = node("Sub", [h, m0], "centered")
    if sp.square == "pow":
        sq = node("Pow", [h, const("two", np.array(sp.exponent, cdt))], "sq")
    else:
        sq = node("Mul", [h, h], "sq")
    if sp.wrong_axis:
        axes = [-2]  # a dim that is not the last
    else:
        axes = list(range(-sp.n_axes, 0))
        if sp.positive_axis:
            axes = [a + rank for a in axes]
    kd = 0 if sp.keepdims0 else 1
    if sp.axes_input:
        ms = node("ReduceMean", [sq, const("axes", np.array(axes, np.int64))], "ms", keepdims=kd)
    else:
        ms = node("ReduceMean", [sq], "ms", axes=axes, keepdims=kd)
    if sp.eps_input:
        inputs.append(helper.make_tensor_value_info("eps", comp, []))
        eps = "eps"
    else:
        eps = const("eps", np.array(sp.eps, cdt))
    var = node("Add", [eps, ms] if sp.swap_add else [ms, eps], "var")
    if sp.extra_consumer:
        outputs.append(helper.make_tensor_value_info("ms", comp, None))
    if sp.inverse == "div":
        normed = node("Div", [h, node("Sqrt", [var], "rms")], "normed")
    else:
        if sp.inverse == "reciprocal":
            inv = node("Reciprocal", [node("Sqrt", [var], "rms")], "inv")
        elif sp.inverse == "div1":
            inv = node("Div", [const("one", np.array(1.0, cdt)), node("Sqrt", [var], "rms")], "inv")
        else:
            inv = node("Pow", [var, const("neg_half", np.array(sp.inverse_exponent, cdt))], "inv")
        normed = node("Mul", [inv, h] if sp.swap_mul else [h, inv], "normed")

    if sp.weight_shape == "vector":
        wshape = hidden
    elif sp.weight_shape == "padded":
        wshape = (1,) * (rank - sp.n_axes) + hidden
    else:  # bad: varies along a dim that is not normalized
        wshape = (sp.shape[-2], 1)
    w = (1.0 + 0.2 * rng.standard_normal(wshape)).astype(np.float64)
    bias = (0.1 * rng.standard_normal(hidden)).astype(np.float64)

    y = normed
    weight_dtype = comp if sp.weight == "before" or (sp.weight == "gemma") else sp.dtype
    if sp.weight == "before" or sp.weight == "gemma":
        if sp.weight == "gemma":
            wname = node("Add", [const("w_raw", (w - 1.0).astype(NP[weight_dtype])), const("one_w", np.array(1.0, NP[weight_dtype]))], "w_gemma")
        else:
            wname = const("w", w.astype(NP[weight_dtype]))
        y = node("Mul", [wname, y] if sp.swap_weight else [y, wname], "scaled")
    if sp.compute_fp32:
        y = node("Cast", [y], "back", to=sp.dtype)
    if sp.weight == "after":
        wname = const("w", w.astype(dt))
        y = node("Mul", [wname, y] if sp.swap_weight else [y, wname], "scaled2")
    if sp.bias:
        y = node("Add", [y, const("bias", bias.astype(dt))], "biased")
    nodes[-1].output[0] = "y"
    outputs.insert(0, helper.make_tensor_value_info("y", sp.dtype, None))
    graph = helper.make_graph(nodes, "rms", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", sp.opset)])
    model.ir_version = IR_VERSION

    feed = {}
    if sp.residual:
        feed["a"] = rng.standard_normal(sp.shape).astype(dt)
        feed["b"] = rng.standard_normal(sp.shape).astype(dt)
    else:
        feed["x"] = (rng.standard_normal(sp.shape) * 2).astype(dt)
    if sp.eps_input:
        feed["eps"] = np.array(sp.eps, NP[comp])
    return model, feed


def reference(sp: Spelling, model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """What the spelling computes, in float64, from the model's own weights: the RMSNorm
    formula, independent of onnxruntime."""
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    x = feed["a"].astype(np.float64) + feed["b"].astype(np.float64) if sp.residual else feed["x"].astype(np.float64)
    axes = tuple(range(-sp.n_axes, 0))
    y = x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + sp.eps)
    if sp.weight == "gemma":
        y = y * (inits["w_raw"] + 1.0)
    elif sp.weight != "none":
        y = y * inits["w"]
    if sp.bias:
        y = y + inits["bias"]
    return y


def variant(**kw) -> Spelling:
    return replace(Spelling(), **kw)
