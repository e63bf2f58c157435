"""Finding each quantized layer in a float ONNX graph: its input, output and node(s).

The exporter names initializers after parameters, so a Conv/Gemm whose weight input is
`<layer>.weight` is the layer. A Linear applied to a 3-D tensor exports as MatMul with a
pre-transposed weight (a new initializer name) plus an Add of the bias; that one is found by
comparing the initializer's values with the transposed weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

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


def _bias_add(
    graph: onnx.GraphProto,
    users: dict[str, list[int]],
    tensor: str,
    bias: np.ndarray | None,
    inits: dict[str, np.ndarray],
) -> int | None:
    """Index of the Add that adds `bias` to `tensor` (MatMul + Add form of a Linear)."""
    if bias is None:
        return None
    for i in users.get(tensor, []):
        node = graph.node[i]
        if node.op_type == "Add":
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            if other in inits and inits[other].shape == bias.shape and np.array_equal(inits[other], bias):
                return i
    return None


def find_sites(
    graph: onnx.GraphProto, weights: dict[str, tuple[np.ndarray, np.ndarray | None]]
) -> dict[str, LayerSite]:
    """Locate every layer in `weights` (name -> (weight, bias)); error if one is missing.

    Reads every initializer into numpy (gigabytes for SD), so an export calls it once and hands
    the sites to each graph pass.
    """
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users = _consumers(graph)
    sites: dict[str, LayerSite] = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight_name = node.input[1]
        layer = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else None
        if node.op_type in ("Conv", "Gemm") and layer in weights:
            if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
                raise ArtifactError(f"layer {layer}: Gemm without transB=1 is not a torch Linear export")
            sites[layer] = LayerSite(layer, node.op_type, node.input[0], node.output[0], list(node.attribute), [index])
            continue
        if node.op_type == "MatMul" and weight_name in inits:
            value = inits[weight_name]
            for name, (weight, bias) in weights.items():
                if name in sites or weight.ndim != 2 or value.shape != weight.T.shape:
                    continue
                if np.array_equal(value, weight.T):
                    add = _bias_add(graph, users, node.output[0], bias, inits)
                    removed = [index] + ([add] if add is not None else [])
                    y = graph.node[add].output[0] if add is not None else node.output[0]
                    sites[name] = LayerSite(name, "MatMul", node.input[0], y, [], removed)
                    break
    missing = [name for name in weights if name not in sites]
    if missing:
        raise ArtifactError(
            f"{len(missing)} quantized layer(s) not found in the exported graph (e.g. {missing[:3]}); "
            "the model's forward may reuse a layer or apply it in an unsupported form"
        )
    return sites
