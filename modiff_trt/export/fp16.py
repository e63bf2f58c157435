"""Carry the float parts of a graph in fp16, for strongly typed TensorRT engines.

TensorRT 11 (and 10.x with the STRONGLY_TYPED flag) takes precision from the graph, so an
fp32 ONNX builds an fp32 engine. This pass converts the graph to fp16 except the timestep
embedding: `t` reaches 999 and sin/cos of t * freq in fp16 would be garbage (fp16 has a step
of 0.5 at 999). The region that depends on `t` alone stays fp32 up to the first quantized
layer (or any node that also sees x), where a Cast to fp16 is inserted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modiff_trt.export import naming
from modiff_trt.export.sites import LayerSite

FP32, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16
# (op, input index) pairs that ONNX requires to stay float32 whatever the data type is.
KEEP_FP32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _fp32_region(graph: onnx.GraphProto, stop_nodes: set[int]) -> set[int]:
    """Indices of nodes computed from `t` and constants only, before any node in `stop_nodes`.

    Constant nodes have no inputs, so they all belong here: they stay fp32 and fp16 readers get
    a Cast, like any other region output.
    """
    constants = {i.name for i in graph.initializer}
    fp32_tensors = {naming.T} | constants
    region: set[int] = set()
    for index, node in enumerate(graph.node):
        inputs = [i for i in node.input if i]
        if index not in stop_nodes and all(i in fp32_tensors for i in inputs):
            region.add(index)
            fp32_tensors.update(node.output)
    return region


def _weightless(model: onnx.ModelProto, keep_bytes: int = 1 << 16) -> onnx.ModelProto:
    """A copy for type inference whose large initializers keep name, type and shape but no data.

    Shape inference serialises the model, which fails past protobuf's 2 GB (SD in fp32); it only
    needs the data of small shape-like constants, which are kept.
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        if len(init.raw_data) > keep_bytes:
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.add(key="location", value="(omitted for type inference)")
    return light


def convert_to_fp16(
    model: onnx.ModelProto, sites: dict[str, LayerSite]
) -> tuple[onnx.ModelProto, dict[str, LayerSite]]:
    """An fp16 copy of `model` and the quantized layers' `sites` relocated into it.

    The layers never join the fp32 region. Relocating the sites (Casts shift node indices and may
    rename a layer's input) spares the exporter a second search of the converted graph.
    """
    stop_nodes = {i for site in sites.values() for i in site.removed}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inferred = onnx.shape_inference.infer_shapes(_weightless(model)).graph
    float_tensors = {
        v.name
        for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
        if v.type.tensor_type.elem_type == FP32
    }
    region = _fp32_region(graph, stop_nodes)
    region_outputs = {o for i in region for o in graph.node[i].output}
    initializers = {init.name: init for init in graph.initializer}
    converted: dict[str, str] = {}
    casts: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []

    shared = {i for r in region for i in graph.node[r].input if i in initializers}
    new_index: dict[int, int] = {}

    def fp16_initializer(name: str) -> str:
        """fp16 version of an initializer: in place (same name, so layers are still found by
        their weight names) unless the fp32 region reads it too."""
        if name not in converted:
            value = numpy_helper.to_array(initializers[name]).astype(np.float16)
            converted[name] = f"{name}__fp16" if name in shared else name
            if name in shared:
                graph.initializer.append(numpy_helper.from_array(value, converted[name]))
            else:
                initializers[name].CopyFrom(numpy_helper.from_array(value, name))
        return converted[name]

    for index, node in enumerate(graph.node):
        if index in region:
            new_nodes.append(node)
            continue
        for k, name in enumerate(node.input):
            if (node.op_type, k) in KEEP_FP32_INPUTS or not name:
                continue
            if name in converted:
                node.input[k] = converted[name]
            elif name in initializers and initializers[name].data_type == FP32:
                node.input[k] = fp16_initializer(name)
            elif name in float_tensors and (name in region_outputs or name == naming.T):
                if name not in casts:
                    casts[name] = f"{name}__to_fp16"
                    new_nodes.append(helper.make_node("Cast", [name], [casts[name]], to=FP16, name=casts[name]))
                node.input[k] = casts[name]
        if node.op_type == "Cast" and any(a.name == "to" and a.i == FP32 for a in node.attribute):
            node.attribute[0].i = FP16
        new_index[index] = len(new_nodes)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for value in list(graph.input) + list(graph.output):
        if value.name != naming.T and value.type.tensor_type.elem_type == FP32:
            value.type.tensor_type.elem_type = FP16
    del graph.value_info[:]
    return out, {name: site.relocated(graph, new_index) for name, site in sites.items()}
