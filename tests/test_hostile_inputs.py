"""Hostile inputs on the newer surfaces: Hugging Face configs that lie about their sizes or
types, RMSNorms inside If branches, Loop bodies and functions, sparse and hollow initializers,
empty files and archive members that inflate far past their stored size. Each ends with exit 2
(the user's files intact, nothing written) or a fused model that onnxruntime runs and that
matches the float64 reference."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ort_helper
from cli_helper import assert_refused, invoke
from normexport.errors import NormexportError
from rms_graphs import build, reference, variant

transformers = pytest.importorskip("transformers")

from hf_folders import DECODER, FAMILIES, save_tiny  # noqa: E402
from normexport.hf import config_checks  # noqa: E402
from normexport.hf.folder import build_config, meta_shapes  # noqa: E402


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}



# ---------------------------------------------------------------------------------------------
# Hugging Face configs


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("hf") / "llama")


BAD_CONFIGS = {
    "heads zero": ({"num_attention_heads": 0}, "num_attention_heads is 0, not a positive integer"),
    "hidden as a string": ({"hidden_size": "64"}, 'hidden_size is "64", not a positive integer'),
    "hidden as a bool": ({"hidden_size": True}, "hidden_size is true"),
    "layers as a float": ({"num_hidden_layers": 2.0}, "num_hidden_layers is 2.0"),
    "negative vocabulary": ({"vocab_size": -5}, "vocab_size is -5"),
    "kv heads do not divide": ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    "hidden does not divide without head_dim": ({"hidden_size": 66, "head_dim": None}, "not a multiple of"),
    "odd head_dim (transformers refuses)": ({"head_dim": 15}, "RoPE requires an even rotary dimension"),
    "nested text_config on llama": ({"text_config": {"hidden_size": 32}}, "its text config is a dict"),
    "unknown dtype": ({"torch_dtype": "float99"}, 'torch_dtype is "float99", not a torch dtype'),
    "nested config with a bad size": ({"vision_config": {"hidden_size": -1}}, "vision_config.hidden_size is -1"),
    "more layers than the weights hold": ({"num_hidden_layers": 100000}, "num_hidden_layers is 100000, but the weights hold layers 0..1 only"),
    "sizes past the machine's memory": ({"vocab_size": 10**12}, "memory is available"),
    "experts as a string": ({"num_experts": "8"}, 'num_experts is "8", not a non-negative integer'),
    "hidden size the weights do not have": ({"hidden_size": 100000}, "of shape [1000, 100000], the weights hold [1000, 64]"),
    "MLP size the weights do not have": ({"intermediate_size": 10**7}, "of shape [64, 10000000], the weights hold [64, 128]"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_exit_2_before_any_build(tmp_path, llama_folder, case):
    change, words = BAD_CONFIGS[case]
    folder = tmp_path / "m"
    shutil.copytree(llama_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    before = digest(folder)
    out = tmp_path / "o"
    assert_refused(invoke("convert", folder, "-o", out, "--no-validate"), out, words)
    assert digest(folder) == before
    # inspect builds through the same loader
    r = invoke("inspect", folder)
    assert r.exit_code == 2 and words in r.stderr, r.stderr


def test_pickled_weights_are_checked_against_the_config_too(tmp_path, llama_folder):
    """.bin weights (with --trust-pickle): their shapes are read on the meta device, so a
    config with more layers than they hold is refused as for safetensors."""
    from safetensors.torch import load_file

    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(load_file(llama_folder / "model.safetensors"), folder / "pytorch_model.bin")
    cfg = json.loads((llama_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100000}))
    out = tmp_path / "o"
    assert_refused(invoke("convert", folder, "-o", out, "--trust-pickle", "--no-validate"), out, "weights hold layers 0..1 only")
    assert config_checks.pickle_tensors(folder) == {k: list(v) for k, v in config_checks.safetensors_tensors(llama_folder).items()}


def test_memory_refusal_names_the_estimate_and_the_memory(llama_folder):
    config = build_config(llama_folder, json.loads((llama_folder / "config.json").read_text()))
    text = config_checks.text_config(config, "cfg")
    need = config_checks.check_fits(llama_folder, text, 4, "cfg", memory=1 << 40)
    stored = sum(int(np.prod(s)) for s in config_checks.safetensors_tensors(llama_folder).values())
    assert need == 4 * stored  # the weights are the larger of the two counts for a complete folder
    with pytest.raises(NormexportError) as e:
        config_checks.check_fits(llama_folder, text, 4, "cfg", memory=need - 1)
    assert f"{need / (1 << 20):.0f} MiB" in e.value.message and "available" in e.value.message


def _tiny_families():
    from models.hf_tiny import _SPECS

    cases = {f"folder-{name}": (cfg, model, {**DECODER, **over}) for name, (cfg, model, over) in FAMILIES.items()}
    cases.update({name: (spec[0], spec[1], spec[2]) for name, spec in _SPECS.items()})
    return cases


TINY = _tiny_families()


@pytest.mark.parametrize("name", list(TINY))
def test_valid_tiny_configs_pass_and_the_estimate_is_a_lower_bound(tmp_path, name):
    """Every family the project tests (MoE, Gemma, T5, Phi-3, ...): the checks accept the
    config save_pretrained wrote, and the parameter estimate is at most the real count."""
    cfg_cls, model_cls, kwargs = TINY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs))
    model.save_pretrained(tmp_path)
    config = build_config(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    text = config_checks.text_config(config, name)
    actual = sum(p.numel() for p in model.parameters())
    assert 0 < config_checks.estimate_parameters(text) <= actual
    assert config_checks.check_fits(tmp_path, text, 4, name) >= 4 * config_checks.estimate_parameters(text)
    if model_cls.endswith("EncoderModel"):
        return  # the auto class builds the whole encoder-decoder, not this class
    shapes = meta_shapes(transformers.AutoModelForCausalLM, config, False, tmp_path)
    exact = config_checks.check_against_weights(shapes, config_checks.safetensors_tensors(tmp_path), 4, name)
    assert exact == 4 * sum(t.numel() for t in model.state_dict().values())
    with pytest.raises(NormexportError, match="memory is available"):
        config_checks.check_against_weights(shapes, None, 4, name, memory=exact - 1)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3", "gemma3n_text", "t5", "gemma3", "qwen2_vl", "gpt_oss", "mamba2", "gpt2"])
def test_real_size_default_configs_pass(tmp_path, model_type):
    """transformers' default config of each family (real sizes, nested text configs, per-layer
    lists): accepted, and the estimate stays below the parameters of the model on the meta device."""
    from transformers import CONFIG_MAPPING, AutoModel

    CONFIG_MAPPING[model_type]().save_pretrained(tmp_path)
    config = build_config(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    text = config_checks.text_config(config, model_type)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    assert 0 < config_checks.estimate_parameters(text) <= sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Norms inside subgraphs


def _value_info(name, sp):
    return helper.make_tensor_value_info(name, sp.dtype, sp.shape)


def if_model(sp):
    """The norm (rms_graphs' spelling) in the then-branch of an If; the else-branch passes x through."""
    inner, feed = build(sp, seed=3)
    g = inner.graph
    then = helper.make_graph(list(g.node), "then", [], [_value_info("y", sp)], list(g.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [], [_value_info("y_else", sp)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then, else_branch=other)], "if_norm",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), _value_info("x", sp)], [_value_info("out", sp)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", sp.opset)])
    model.ir_version = inner.ir_version
    return model, inner, feed


def loop_model(sp):
    """The norm in a Loop body, applied to its own result on each iteration."""
    inner, feed = build(sp, seed=4)
    g = inner.graph
    nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    for n in g.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.input[:] = ["carried" if i == "x" else i for i in copy.input]
        nodes.append(copy)
    body = helper.make_graph(
        nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _value_info("carried", sp)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value_info("y", sp)], list(g.initializer),
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["out"], name="loop", body=body)], "loop_norm",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []), _value_info("x", sp)], [_value_info("out", sp)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", sp.opset)])
    model.ir_version = inner.ir_version
    return model, inner, feed


SUBGRAPH_SPELLINGS = {
    "fp32": variant(),
    "fp16 computed in fp32": variant(compute_fp32=True, dtype=TensorProto.FLOAT16),
    "opset 17 axes attribute": variant(axes_input=False),
    "weight over 1 KB (an input in the load check's copy)": variant(shape=(2, 3, 512)),
}
FUSED = {"ort": "SimplifiedLayerNormalization", "onnx": "RMSNormalization", "decompose": None}


def _subgraph_ops(model: onnx.ModelProto) -> set[str]:
    ops, stack = set(), [model.graph]
    while stack:
        g = stack.pop()
        for n in g.node:
            if g is not model.graph:
                ops.add(n.op_type)
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
    return ops


def _tolerance(sp):
    return 2e-2 if sp.dtype == TensorProto.FLOAT16 else 1e-5


def _fused_subgraph_model(tmp_path, make, sp, target):
    """``make(sp)``'s model saved and fused by the CLI for ``target`` (exit 0, the source left
    byte for byte as it was): the model, its inner norm graph, its feed and the fused file."""
    model, inner, feed = make(sp)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    r = invoke("fuse", src, "-o", out, "--target", target)
    assert r.exit_code == 0, r.output + r.stderr
    assert src.read_bytes() == before
    return model, inner, feed, out


@pytest.mark.parametrize("target", list(FUSED))
@pytest.mark.parametrize("spelling", list(SUBGRAPH_SPELLINGS))
def test_norm_in_if_branch_is_fused_and_runs(tmp_path, spelling, target):
    sp = SUBGRAPH_SPELLINGS[spelling]
    model, inner, feed, out = _fused_subgraph_model(tmp_path, if_model, sp, target)
    fused = onnx.load(out)
    ops = _subgraph_ops(fused)
    assert "ReduceMean" not in ops if FUSED[target] else "ReduceMean" in ops
    if FUSED[target]:
        assert FUSED[target] in ops
    rng = np.random.default_rng(11)
    for cond in (True, False):
        x = (rng.standard_normal(sp.shape) * 3).astype(feed["x"].dtype)
        got = ort_helper.run(out, {"cond": np.array(cond), "x": x})[0].astype(np.float64)
        orig = ort_helper.run(model, {"cond": np.array(cond), "x": x})[0].astype(np.float64)
        want = reference(sp, inner, {"x": x}) if cond else x.astype(np.float64)
        np.testing.assert_allclose(got, want, atol=_tolerance(sp), rtol=_tolerance(sp))
        np.testing.assert_allclose(got, orig, atol=_tolerance(sp), rtol=_tolerance(sp))


@pytest.mark.parametrize("target", list(FUSED))
@pytest.mark.parametrize("spelling", list(SUBGRAPH_SPELLINGS))
def test_norm_in_loop_body_is_fused_and_runs(tmp_path, spelling, target):
    sp = SUBGRAPH_SPELLINGS[spelling]
    model, inner, feed, out = _fused_subgraph_model(tmp_path, loop_model, sp, target)
    if FUSED[target]:
        assert FUSED[target] in _subgraph_ops(onnx.load(out))
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(sp.shape) * 3).astype(feed["x"].dtype)
    want = x.astype(np.float64)
    for _ in range(3):
        want = reference(sp, inner, {"x": want})
    got = ort_helper.run(out, {"n": np.array(3, np.int64), "x": x})[0].astype(np.float64)
    orig = ort_helper.run(model, {"n": np.array(3, np.int64), "x": x})[0].astype(np.float64)
    np.testing.assert_allclose(got, want, atol=3 * _tolerance(sp), rtol=3 * _tolerance(sp))
    np.testing.assert_allclose(got, orig, atol=3 * _tolerance(sp), rtol=3 * _tolerance(sp))


def test_norm_inside_a_function_is_left_alone_with_a_reason(tmp_path):
    sp = variant()
    inner, feed = build(sp, seed=5)
    g = inner.graph
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
    fn = helper.make_function("local", "Norm", ["x"], ["y"], consts + list(g.node), [helper.make_opsetid("", sp.opset)])
    graph = helper.make_graph([helper.make_node("Norm", ["x"], ["out"], domain="local")], "fn_norm", [_value_info("x", sp)], [_value_info("out", sp)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", sp.opset), helper.make_opsetid("local", 1)], functions=[fn])
    model.ir_version = inner.ir_version
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    r = invoke("fuse", src, "-o", out, "--allow-none")
    assert r.exit_code == 0, r.output + r.stderr
    assert "function(s) not searched" in r.output
    got = ort_helper.run(out, {"x": feed["x"]})[0]
    np.testing.assert_allclose(got.astype(np.float64), reference(sp, inner, feed), atol=1e-5, rtol=1e-5)
    assert invoke("fuse", src, "-o", tmp_path / "g.onnx").exit_code == 2  # without --allow-none: no norm where it looks


@pytest.mark.parametrize("hidden", [16, 512])
def test_fused_model_onnxruntime_cannot_load_is_not_written(tmp_path, monkeypatch, hidden):
    """A lowering that skipped a subgraph leaves the internal op behind: onnxruntime cannot
    load the result while it loads the input, so nothing is written."""
    from normexport.fuse import targets

    lower_graph = targets._lower_graph
    monkeypatch.setattr(targets, "_lower_graph", lambda model, graph, *a, **k: lower_graph(model, graph, *a, **k) if graph is model.graph else [])
    model, _, _ = if_model(variant(shape=(2, 3, hidden)))
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    assert_refused(invoke("fuse", src, "-o", out), out, "does not load in onnxruntime though the input does")


# ---------------------------------------------------------------------------------------------
# Sparse, hollow and empty ONNX inputs


def _sparse_weight_model(indices_2d: bool = False, bad_index: bool = False):
    sp = variant()
    model, feed = build(sp, seed=6)
    w = next(t for t in model.graph.initializer if t.name == "w")
    arr = numpy_helper.to_array(w).copy()
    arr[::3] = 0.0  # a weight that is really sparse
    flat = arr.reshape(-1)
    idx = np.nonzero(flat)[0].astype(np.int64)
    if bad_index:
        idx[-1] = flat.size + 7
    indices = idx.reshape(-1, 1) if indices_2d else idx
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(flat[np.nonzero(flat)[0]], "w"), numpy_helper.from_array(indices, "w_indices"), list(arr.shape))
    model.graph.initializer.remove(w)
    model.graph.sparse_initializer.append(sparse)
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    del dense.graph.sparse_initializer[:]
    dense.graph.initializer.append(numpy_helper.from_array(arr, "w"))
    return sp, model, dense, feed


@pytest.mark.parametrize("indices_2d", [False, True])
def test_sparse_norm_weight_is_made_dense(tmp_path, indices_2d):
    sp, model, dense, feed = _sparse_weight_model(indices_2d)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    r = invoke("fuse", src, "-o", out)
    assert r.exit_code == 0, r.output + r.stderr
    fused = onnx.load(out)
    assert [n.op_type for n in fused.graph.node] == ["SimplifiedLayerNormalization"]
    rng = np.random.default_rng(13)
    x = (rng.standard_normal(sp.shape) * 2).astype(np.float32)
    want = reference(sp, dense, {"x": x})
    np.testing.assert_allclose(ort_helper.run(out, {"x": x})[0].astype(np.float64), want, atol=1e-5, rtol=1e-5)
    # the API takes a ModelProto with the same sparse weight and leaves the caller's proto as it was
    import normexport

    fused_proto, report = normexport.fuse(model)
    assert report.fused == 1 and len(model.graph.sparse_initializer) == 1
    np.testing.assert_allclose(ort_helper.run(fused_proto, {"x": x})[0].astype(np.float64), want, atol=1e-5, rtol=1e-5)


def test_sparse_weight_with_an_index_out_of_range_is_refused(tmp_path):
    _, model, _, _ = _sparse_weight_model(bad_index=True)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    assert_refused(invoke("fuse", src, "-o", out), out, "sparse initializer 'w' is not readable")


@pytest.mark.parametrize("how", ["no data", "short raw data", "short typed data", "negative dim"])
def test_initializer_declaring_more_than_it_holds_is_refused(tmp_path, how):
    model, _ = build(variant(), seed=7)
    w = next(t for t in model.graph.initializer if t.name == "w")
    values = numpy_helper.to_array(w)
    if how == "no data":
        w.ClearField("raw_data")
        del w.dims[:]
        w.dims.extend([10**6, 10**6])
    elif how == "short raw data":
        w.raw_data = values.tobytes()[:-4]
    elif how == "short typed data":
        w.ClearField("raw_data")
        w.float_data.extend(values.reshape(-1)[:-1].tolist())
    else:
        w.dims[0] = -16
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    assert_refused(invoke("fuse", src, "-o", out, "--allow-none"), out, "initializer 'w'")
    assert src.read_bytes() == before


@pytest.mark.parametrize("command", ["fuse", "inspect"])
def test_empty_file_is_not_an_onnx_model(tmp_path, command):
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    src.write_bytes(b"")
    args = ["fuse", src, "-o", out, "--allow-none"] if command == "fuse" else ["inspect", src]
    r = invoke(*args)
    assert r.exit_code == 2 and "empty (0 bytes)" in r.stderr, r.output + r.stderr
    assert not out.exists()


def test_model_without_a_graph_is_refused(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    src.write_bytes(onnx.ModelProto(ir_version=10, producer_name="x").SerializeToString())
    assert_refused(invoke("fuse", src, "-o", out, "--allow-none"), out, "no graph with outputs")


# ---------------------------------------------------------------------------------------------
# Archives


class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_pt2_member_that_inflates_past_its_stored_size_is_refused_before_reading(tmp_path):
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(Double(), (torch.randn(2, 3),)), src)
    top = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    with zipfile.ZipFile(src, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open(f"{top}/data/weights/extra", "w", force_zip64=True) as f:
            block = bytes(1 << 22)
            for _ in range(40):  # 160 MiB of zeros, stored in well under 1 MiB
                f.write(block)
    assert src.stat().st_size < (2 << 20)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "o.onnx"
    assert_refused(invoke("convert", src, "-o", out), out, "declares 167772160 bytes", "not inflated")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


def test_archive_members_past_the_memory_available_are_refused(tmp_path):
    from normexport.load import check_member_sizes

    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(Double(), (torch.randn(2, 3),)), src)
    infos = zipfile.ZipFile(src).infolist()
    total = sum(i.file_size for i in infos)
    check_member_sizes(src, infos, memory=total)
    with pytest.raises(NormexportError, match="more than the"):
        check_member_sizes(src, infos, memory=total - 1)
