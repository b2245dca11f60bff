"""Names the fusion gives to new values, initializers and nodes: unique against every name in
the model (main graph, subgraphs and functions), so that no new value shadows or is shadowed
by one the model already has (an initializer named like a graph input would replace it).

onnx_ir's NameAuthority names only values and nodes that have no name, and does not track
graph inputs or initializers; ``Names`` tracks all of them, and ``rename_new`` gives a fresh
name to anything the rewriter created under a name already in use.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir


def _scopes(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    yield from model.graphs()
    for function in model.functions.values():
        yield function
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield attr.value
                elif attr.type == ir.AttributeType.GRAPHS:
                    yield from attr.value


def _values_of(scope: ir.Graph | ir.Function) -> Iterator[ir.Value]:
    yield from scope.inputs
    yield from scope.outputs
    if isinstance(scope, ir.Graph):
        yield from scope.initializers.values()
    for node in scope:
        yield from (v for v in node.inputs if v is not None)
        yield from node.outputs


def model_names(model: ir.Model) -> tuple[set[str], list[ir.Value], list[ir.Node]]:
    """Every value and node name in use, and the values and nodes that carry them."""
    names: set[str] = set()
    values: dict[int, ir.Value] = {}
    nodes: dict[int, ir.Node] = {}
    for scope in _scopes(model):
        for v in _values_of(scope):
            values[id(v)] = v
            if v.name:
                names.add(v.name)
        for node in scope:
            nodes[id(node)] = node
            if node.name:
                names.add(node.name)
    return names, list(values.values()), list(nodes.values())


class Names:
    """Fresh names for one model: ``fresh(base)`` is ``base`` if no value, initializer or node
    of the model (or given out before) has it, else ``base_2``, ``base_3``, ..."""

    def __init__(self, model: ir.Model):
        self.taken, values, nodes = model_names(model)
        # Strong references: the objects the model had before the rewrite (ids stay unique).
        self._original = {id(v): v for v in values} | {id(n): n for n in nodes}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def rename_new(self, model: ir.Model) -> int:
        """Give a fresh name to every value or node created since ``Names(model)`` whose name
        is empty or used by another value or node now in the model. Graph outputs keep theirs
        (they are the model's interface). Returns how many were renamed."""
        in_use: set[str] = set()
        new_values, new_nodes = [], []
        for scope in _scopes(model):
            for v in _values_of(scope):
                if id(v) in self._original and self._original[id(v)] is v:
                    in_use.add(v.name or "")
                elif v.is_graph_output():
                    in_use.add(v.name or "")
                else:
                    new_values.append(v)
            for node in scope:
                if id(node) in self._original and self._original[id(node)] is node:
                    in_use.add(node.name or "")
                else:
                    new_nodes.append(node)
        self.taken |= in_use
        renamed = 0
        seen: set[int] = set()
        for obj in new_values + new_nodes:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            name = obj.name or ""
            if name and name not in in_use:
                in_use.add(name)
                continue
            base = name or (f"node_{obj.op_type}" if isinstance(obj, ir.Node) else "value")
            obj.name = self.fresh(base)
            in_use.add(obj.name)
            renamed += 1
        return renamed
