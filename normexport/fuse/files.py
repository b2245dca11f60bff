"""Checks on an ONNX model read from disk, before anything reads its weights, and a writer
whose memory does not grow with the model.

* ``check_external_data``: every external-data file a tensor names lies inside the model's
  folder (no absolute path, no ``..``, no symlink out of it, no hard link), exists and holds
  the bytes the tensor says. Nothing outside the folder is opened.
* ``check_acyclic``: the graph (and each subgraph) has no cycle.
* ``write_inline``: one .onnx file with every weight inline, written one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from normexport.errors import NormexportError, first_line


def _tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs and functions."""
    for graph in model.graphs():
        yield from (v.const_value for v in graph.initializers.values() if v.const_value is not None)
    nodes = [n for g in model.graphs() for n in g]
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    for node in nodes:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse (exit 2) external data outside ``path``'s folder, missing, or too short."""
    folder = os.path.abspath(path.parent)
    folder_real = os.path.realpath(folder)
    sizes: dict[str, int] = {}
    for tensor in _tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = os.fspath(tensor.location)
        where = os.path.normpath(os.path.join(folder, location))
        if os.path.isabs(location) or not _inside(where, folder) or not _inside(os.path.realpath(where), folder_real):
            raise NormexportError(
                f"{path}: tensor '{tensor.name}' points at external data '{location}', outside the model's folder; not read",
                "external data must be a file beside the model (a relative path, no '..', no symlink out of the folder)",
            )
        if where not in sizes:
            if not os.path.isfile(where):
                raise NormexportError(f"{path}: external data file '{location}' (tensor '{tensor.name}') is missing",
                                      f"put '{location}' beside the model, as it was exported")
            if os.stat(where).st_nlink > 1:  # may be a file from anywhere, linked in; onnx_ir refuses it too
                raise NormexportError(f"{path}: external data file '{location}' has other hard links; not read",
                                      f"replace '{location}' by a plain copy of the data (cp, not ln)")
            sizes[where] = os.path.getsize(where)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[where]:
            raise NormexportError(f"{path}: external data file '{location}' is {sizes[where]} bytes, tensor '{tensor.name}' needs {end}",
                                  "the .data file is truncated or belongs to another model: copy it again with the model")


def check_acyclic(model: ir.Model, path: Path) -> None:
    """Refuse (exit 2) a graph or subgraph with a cycle, naming a node on it."""
    for graph in model.graphs():
        nodes = list(graph)
        index = {id(n): i for i, n in enumerate(nodes)}
        deps = [set() for _ in nodes]
        for i, node in enumerate(nodes):
            for v in _reads(node):
                p = v.producer()
                if p is not None and id(p) in index:
                    deps[i].add(index[id(p)])
        state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 done
        for start in range(len(nodes)):
            if state[start]:
                continue
            stack = [(start, iter(deps[start]))]
            state[start] = 1
            while stack:
                i, it = stack[-1]
                j = next(it, None)
                if j is None:
                    state[i] = 2
                    stack.pop()
                elif state[j] == 1:
                    name = nodes[j].name or f"{nodes[j].op_type} #{j}"
                    raise NormexportError(f"{path}: graph has a cycle (through node '{name}')",
                                          "an ONNX graph must be acyclic: re-export the model")
                elif state[j] == 0:
                    state[j] = 1
                    stack.append((j, iter(deps[j])))


def _reads(node: ir.Node) -> Iterator[ir.Value]:
    """The values a node reads: its inputs and what its subgraphs take from outside."""
    yield from (v for v in node.inputs if v is not None)
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for g in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(g):
                yield from (v for v in inner.inputs if v is not None and v.graph is not g and v.graph is not inner.graph)


MERGE_CHUNK = 16 << 20
GRAPH_FIELD = 7  # ModelProto.graph


def read_model_proto(path: Path):
    """The ModelProto in ``path``, parsed a slice of the graph's fields at a time.

    onnx.load reads the whole file into memory and then parses it: twice the model at once.
    Protobuf merges repeated occurrences of a message, so the graph's records (nodes,
    initializers, ...) can be merged in slices of about MERGE_CHUNK bytes: the peak is the
    parsed model plus one slice (or one tensor, if larger). Only the record boundaries of
    the top two levels are read here; protobuf parses everything."""
    import onnx

    model = onnx.ModelProto()
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        for field, wire, start, payload, stop in _records(f, 0, end):
            if field == GRAPH_FIELD and wire == 2:
                _merge_slices(f, model.graph, payload, stop)
            else:
                f.seek(start)
                model.MergeFromString(f.read(stop - start))
            f.seek(stop)
    return model


def _merge_slices(f, message, begin: int, end: int) -> None:
    chunk = begin
    for _, _, start, _, stop in _records(f, begin, end):
        if stop - chunk > MERGE_CHUNK and start > chunk:
            _merge_range(f, message, chunk, start)
            chunk = start
        f.seek(stop)
    _merge_range(f, message, chunk, end)


def _merge_range(f, message, begin: int, end: int) -> None:
    if end > begin:
        f.seek(begin)
        message.MergeFromString(f.read(end - begin))


def _records(f, begin: int, end: int):
    """(field, wire type, record start, payload start, record end) of each record in
    [begin, end); leaves the file anywhere (callers seek)."""
    pos = begin
    while pos < end:
        start = pos
        f.seek(pos)
        key, pos = _varint(f, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(f, pos)
            payload = pos
        elif wire == 2:
            length, payload = _varint(f, pos)
            stop = payload + length
        elif wire in (1, 5):
            payload, stop = pos, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        if stop > end:
            raise ValueError(f"a protobuf record runs past the end of its message (byte {stop} > {end})")
        yield field, wire, start, payload, stop
        pos = stop


def _varint(f, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError("the file ends inside a protobuf varint")
        pos += 1
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a protobuf varint longer than 10 bytes")


LIFT_ELEMENTS = 1 << 16


def write_inline(model: ir.Model, path: Path) -> None:
    """Write ``model`` as one .onnx file with every tensor inline, holding one tensor at a time.

    Protobuf merges a message that appears twice in its encoding (repeated fields append),
    so a ModelProto is the model without its initializers, followed by one
    ``ModelProto(graph=GraphProto(initializer=[t]))`` per initializer: onnx and onnxruntime
    parse that as the whole model. Memory: the graph's structure plus the largest tensor."""
    import onnx
    import onnx_ir.passes.common as common_passes

    # Constant nodes hold their tensors inside the graph's structure: the large ones become
    # initializers (the same values), which are written one at a time.
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=LIFT_ELEMENTS)(model)
    for node in (n for g in model.graphs() for n in g):  # rare: a Constant node's external tensor
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy(), name=attr.value.name))
    graph = model.graph
    initializers = list(graph.initializers.values())
    graph.initializers.clear()
    try:
        head = ir.serde.serialize_model(model)
    finally:
        for v in initializers:
            graph.initializers.add(v)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        del head
        for v in initializers:
            if v.const_value is not None:
                f.write(_initializer_part(onnx.ModelProto(), v).SerializeToString())


def _initializer_part(part, value: ir.Value):
    tensor = value.const_value
    proto = part.graph.initializer.add()
    if isinstance(tensor, ir.ExternalTensor):  # inline its bytes, then unmap its file
        proto.data_type = tensor.dtype.value
        proto.dims.extend(tensor.shape.numpy())
        proto.raw_data = tensor.tobytes()
        try:
            tensor.release()
        except BufferError:
            pass  # a view of it is still held elsewhere: the mapping stays
    else:
        ir.serde.serialize_tensor_into(proto, tensor)
    proto.name = value.name
    return part


# ---------------------------------------------------------------------------------------------
# Tensors as declared against the data present; sparse initializers


def proto_graphs(graph) -> Iterator:
    """``graph`` and every subgraph in it (GraphProtos)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


def _proto_tensors(model) -> Iterator:
    """(where, TensorProto) for every dense tensor of the model: initializers, tensor
    attributes and the parts of sparse tensors, in graphs, subgraphs and functions."""
    nodes = []
    for g in proto_graphs(model.graph):
        for t in g.initializer:
            yield f"initializer '{t.name}'", t
        for s in g.sparse_initializer:
            yield f"sparse initializer '{s.values.name}' (values)", s.values
            yield f"sparse initializer '{s.values.name}' (indices)", s.indices
        nodes.extend(g.node)
    for f in model.functions:
        for n in f.node:
            nodes.append(n)
            for a in n.attribute:
                if a.HasField("g"):
                    for g in proto_graphs(a.g):
                        nodes.extend(g.node)
    for n in nodes:
        for a in n.attribute:
            if a.HasField("t"):
                yield f"attribute '{a.name}' of node '{n.name or n.op_type}'", a.t
            for t in a.tensors:
                yield f"attribute '{a.name}' of node '{n.name or n.op_type}'", t
            if a.HasField("sparse_tensor"):
                yield f"attribute '{a.name}' of node '{n.name or n.op_type}' (values)", a.sparse_tensor.values


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_tensor_sizes(model, path) -> None:
    """Every inline tensor holds the data its dims declare (raw bytes or typed values):
    refuse (exit 2) a tensor that declares more elements than it carries, before anything
    allocates it. External data is checked by ``check_external_data``."""
    import onnx

    for where, t in _proto_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if any(d < 0 for d in t.dims):
            raise NormexportError(f"{path}: {where} has a negative dimension {list(t.dims)}", "the file is corrupt: export the model again")
        count = 1
        for d in t.dims:
            count *= d
        if count == 0:
            continue
        if t.data_type == onnx.TensorProto.STRING:
            if len(t.string_data) != count:
                raise NormexportError(f"{path}: {where} declares {count} strings but holds {len(t.string_data)}", "the file is corrupt or truncated: export the model again")
            continue
        try:
            bits = ir.DataType(t.data_type).bitwidth
        except Exception:
            raise NormexportError(f"{path}: {where} has an unknown data type {t.data_type}", "the file is corrupt: export the model again") from None
        if t.HasField("raw_data"):
            present, need = len(t.raw_data), (count * bits + 7) // 8
            unit = "bytes"
        else:
            present = max(len(getattr(t, f)) for f in _TYPED_FIELDS)
            complex_ = t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
            need = 2 * count if complex_ else (count * bits + 31) // 32 if bits < 8 else count
            unit = "values"
            if bits < 8 and present >= need:  # sub-byte types: packed, or one value per element
                continue
        if present != need:
            raise NormexportError(
                f"{path}: {where} declares dims {list(t.dims)} ({count} elements, {need} {unit}) but holds {present} {unit}",
                "the file is corrupt or truncated: export the model again",
            )


def densify_sparse(model, path, memory: int | None = None) -> int:
    """Each sparse initializer becomes the dense initializer it stands for (onnx_ir reads dense
    tensors only; a dropped one would leave its uses dangling). Returns how many."""
    import numpy as np
    from onnx import numpy_helper

    from normexport.hf.config_checks import available_memory

    count = 0
    for g in proto_graphs(model.graph):
        if not len(g.sparse_initializer):
            continue
        for s in list(g.sparse_initializer):
            name = s.values.name
            dims = list(s.dims)
            size = 1
            for d in dims:
                size *= d
            itemsize = max(ir.DataType(s.values.data_type).itemsize, 1)
            memory = available_memory() if memory is None else memory
            if any(d < 0 for d in dims) or (memory is not None and size * itemsize > memory):
                raise NormexportError(f"{path}: sparse initializer '{name}' declares dims {dims}, too large to make dense here", "store it as a dense initializer")
            try:
                values = numpy_helper.to_array(s.values).reshape(-1)
                indices = numpy_helper.to_array(s.indices).astype(np.int64)
                if indices.ndim == 2:  # [NNZ, rank] coordinates
                    indices = np.ravel_multi_index(tuple(indices.T), dims)
                indices = indices.reshape(-1)
                if len(indices) != len(values) or (len(indices) and (indices.min() < 0 or indices.max() >= size)):
                    raise ValueError("indices and values disagree, or an index lies outside the dims")
                dense = np.zeros(size, dtype=values.dtype)
                dense[indices] = values
            except Exception as e:
                raise NormexportError(f"{path}: sparse initializer '{name}' is not readable ({first_line(e, 160)})",
                                      "store it as a dense initializer") from None
            g.initializer.append(numpy_helper.from_array(dense.reshape(dims), name))
            count += 1
        del g.sparse_initializer[:]
    return count


# ---------------------------------------------------------------------------------------------
# Loading in onnxruntime


def runtime_copy(model: ir.Model) -> bytes | None:
    """The model as onnxruntime can load it without its weights: every tensor over 1 KB (and
    every external one) in an initializer becomes a graph input of the same type and shape,
    so that loading checks the graph, its types and its ops but reads no data. None where
    that cannot be built (a large tensor inside a function, or a name clash)."""
    import onnx

    from normexport.fuse.shapes import PLACEHOLDER_BYTES, structure_proto

    proto = structure_proto(model)
    main = proto.graph
    taken = {i.name for i in main.input} | {n for g in proto_graphs(main) for node in g.node for n in node.output}
    for g in proto_graphs(main):
        keep = []
        for t in g.initializer:
            big = t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > PLACEHOLDER_BYTES
            if not big:
                keep.append(t)
                continue
            if t.name in taken:
                return None
            taken.add(t.name)
            main.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)
        for node in list(g.node):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                a = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if a is not None and a.t.data_location == onnx.TensorProto.EXTERNAL:
                    main.input.append(onnx.helper.make_tensor_value_info(node.output[0], a.t.data_type, list(a.t.dims)))
                    g.node.remove(node)
    for f in proto.functions:
        for node in f.node:
            if any(a.HasField("t") and a.t.data_location == onnx.TensorProto.EXTERNAL for a in node.attribute):
                return None
    return proto.SerializeToString()


def runtime_load_error(data: bytes) -> str | None:
    """Why onnxruntime (CPU, optimizations off) cannot load ``data``; None when it can."""
    import onnxruntime as ort

    from normexport.runners import DEFAULT_BACKEND, backend_record

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    try:
        ort.InferenceSession(data, so, providers=list(backend_record(DEFAULT_BACKEND).providers))
    except Exception as e:
        return first_line(e)
    return None
