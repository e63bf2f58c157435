"""Finding each quantized layer in a float ONNX graph: its input, output and node(s).

The float graph reads each layer's weight and bias as graph inputs `<layer>.weight` and
`<layer>.bias` (`onnx_float.py`): a Conv or Gemm whose weight input is `<layer>.weight` is the
layer; a Linear applied to a 3-D tensor exports as MatMul(x, Transpose(`<layer>.weight`)) plus an
Add of `<layer>.bias`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

from modiff_trt.errors import ArtifactError


@dataclass
class LayerSite:
    """Where layer `name` sits: x -> [removed nodes] -> y, with the op's attributes."""

    name: str
    op: str  # Conv | Gemm | MatMul
    x: str
    y: str
    attributes: list[onnx.AttributeProto]
    removed: list[int] = field(default_factory=list)  # indices into graph.node

    @property
    def position(self) -> int:
        """Index after which the replacement can run: the last removed node."""
        return max(self.removed)

    def relocated(self, graph: onnx.GraphProto, new_index: dict[int, int]) -> LayerSite:
        """This site in `graph`, a rewrite of the graph it was found in that kept every node and
        output name but moved nodes (`new_index`: old -> new) and may have renamed the input."""
        removed = [new_index[i] for i in self.removed]
        return LayerSite(self.name, self.op, graph.node[removed[0]].input[0], self.y, self.attributes, removed)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            users.setdefault(name, []).append(i)
    return users


def layer_inputs(layers: Iterable[str]) -> set[str]:
    """The graph inputs that carry the float weights and biases of `layers` (all of them, plus
    biases a layer may not have: only the names matter)."""
    return {f"{name}.{part}" for name in layers for part in ("weight", "bias")}


def _bias_add(graph: onnx.GraphProto, users: dict[str, list[int]], tensor: str, bias: str) -> int | None:
    """Index of the Add of input `bias` to `tensor` (the MatMul + Add form of a Linear)."""
    for i in users.get(tensor, []):
        node = graph.node[i]
        if node.op_type == "Add" and bias in node.input:
            return i
    return None


def _transposed_weight(graph: onnx.GraphProto, producers: dict[str, int], tensor: str) -> str | None:
    """The input name X when `tensor` is Transpose(X) with perm [1, 0], else None."""
    index = producers.get(tensor)
    if index is None:
        return None
    node = graph.node[index]
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.input[0] if node.op_type == "Transpose" and perm == [1, 0] else None


def find_sites(graph: onnx.GraphProto, layers: Iterable[str]) -> dict[str, LayerSite]:
    """Locate every layer of `layers` by its weight input; error if one is missing or read twice."""
    wanted = set(layers)
    users = _consumers(graph)
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    sites: dict[str, LayerSite] = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = node.input[1] if node.op_type != "MatMul" else _transposed_weight(graph, producers, node.input[1])
        layer = weight[: -len(".weight")] if weight and weight.endswith(".weight") else None
        if layer not in wanted:
            continue
        if layer in sites:
            raise ArtifactError(
                f"layer {layer} is applied more than once in the forward: a shared layer is not exported"
            )
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            raise ArtifactError(f"layer {layer}: Gemm without transB=1 is not a torch Linear export")
        if node.op_type != "MatMul":
            sites[layer] = LayerSite(layer, node.op_type, node.input[0], node.output[0], list(node.attribute), [index])
            continue
        add = _bias_add(graph, users, node.output[0], f"{layer}.bias")
        removed = [index] + ([add] if add is not None else [])
        y = graph.node[add].output[0] if add is not None else node.output[0]
        sites[layer] = LayerSite(layer, "MatMul", node.input[0], y, [], removed)
    missing = sorted(wanted - set(sites))
    if missing:
        raise ArtifactError(
            f"{len(missing)} quantized layer(s) not found in the exported graph (e.g. {missing[:3]}); "
            "the model's forward may apply a layer in an unsupported form"
        )
    return sites
