"""TensorRT-readiness lint: the explicit-quantization rules, checked on the ONNX files alone.

It reads graphs, not our exporter's intentions, so it also catches hand-edited or foreign
graphs; `export` runs it on every export before writing it. Rules (TensorRT's
explicit-quantization requirements, docs/export.md):

- `forbidden-op`: no QLinear*/ConvInteger/MatMulInteger/DynamicQuantizeLinear in TensorRT graphs
  (skipped for target `ort-cpu`, whose integer kernels are the point; there a uint8 zero point
  of 128 also passes `zero-point`: it is the same symmetric int8 grid stored unsigned)
- `opset` / `ir-version`: default-domain opset 17..20 (fp16 Q/DQ needs >= 19), IR version <= 10
- `zero-point`: every Q/DQ has an explicit int8 constant zero point equal to 0
- `scale`: scales are constant, finite and > 0 (fp16 scales at least fp16's smallest normal,
  2^-14: smaller ones are subnormal, and TensorRT's parser rejects those that round to 0); scalar
  for activations; 1-D per-channel scales (axis 0) only on a DequantizeLinear of a constant weight
- `qdq-inputs`: a Conv/Gemm/MatMul fed by any DequantizeLinear has DQ on both inputs
- `state-pairs`: every `*_in.L` state input has its `*_out.L` output with the same dtype/shape
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modiff_trt.export import naming
from modiff_trt.export.manifest import load_manifest
from modiff_trt.export.qdq import FP16_MIN_NORMAL

FORBIDDEN = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
             "QLinearAdd", "QLinearMul", "QLinearConcat", "MatMulIntegerToFloat", "QGemm"}
OPSET_RANGE = (17, 20)
MAX_IR = 10
PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Cast"}


@dataclass(frozen=True)
class LintIssue:
    graph: str
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: [{self.rule}] {self.node}: {self.message}"


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for node in g.node:
            if node.op_type == "Constant" and node.attribute:
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {o: n for n in g.node for o in n.output}

    def source(self, tensor: str) -> onnx.NodeProto | None:
        """The node producing `tensor`, looking through layout-only ops."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in PASS_THROUGH:
            node = self.producer.get(node.input[0])
        return node


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_qdq(g: _Graph, node: onnx.NodeProto, name: str, opset: int, target: str = "trt") -> list[LintIssue]:
    issues = []
    label = node.name or node.output[0]
    if len(node.input) < 3 or not node.input[2]:
        issues.append(LintIssue(name, "zero-point", label, "no zero point (defaults to uint8): give an int8 constant 0"))
    elif node.input[2] not in g.consts:
        issues.append(LintIssue(name, "zero-point", label, "zero point is computed, not a constant"))
    else:
        zp = g.consts[node.input[2]]
        if target == "ort-cpu" and zp.dtype == np.uint8 and np.all(zp == 128):
            pass  # symmetric int8 grid shifted onto uint8 for ONNX Runtime's u8 kernels
        elif zp.dtype != np.int8:
            issues.append(LintIssue(name, "zero-point", label, f"zero point is {zp.dtype}, TensorRT needs int8"))
        elif np.any(zp != 0):
            issues.append(LintIssue(name, "zero-point", label, "non-zero zero point: TensorRT needs symmetric Q/DQ"))
    scale = g.consts.get(node.input[1])
    if scale is None:
        issues.append(LintIssue(name, "scale", label, "scale is computed at run time: TensorRT needs a build-time constant"))
        return issues
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        issues.append(LintIssue(name, "scale", label, "scale must be finite and > 0"))
    elif scale.dtype == np.float16 and np.any(scale < FP16_MIN_NORMAL):
        issues.append(LintIssue(name, "scale", label, f"fp16 scale {float(scale.min()):.3g} is below fp16's smallest "
                                f"normal {FP16_MIN_NORMAL:.3g} (subnormal): re-export, the exporter floors it"))
    if scale.dtype == np.float16 and opset < 19:
        issues.append(LintIssue(name, "opset", label, f"fp16 Q/DQ scales need opset >= 19 (graph has {opset})"))
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        on_weight = node.op_type == "DequantizeLinear" and node.input[0] in g.consts
        if not on_weight:
            issues.append(LintIssue(name, "scale", label, "per-channel scale on an activation: activations need a scalar scale"))
        elif axis != 0 or scale.ndim != 1:
            issues.append(LintIssue(name, "scale", label, f"per-channel weight scale must be 1-D on axis 0 (axis={axis})"))
    return issues


def lint_graph(model: onnx.ModelProto, name: str = "graph", target: str = "trt") -> list[LintIssue]:
    """Every rule violation in one ONNX graph (state pairing included)."""
    issues: list[LintIssue] = []
    opset = _opset(model)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        issues.append(LintIssue(name, "opset", "model", f"opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}"))
    if model.ir_version > MAX_IR:
        issues.append(LintIssue(name, "ir-version", "model", f"IR version {model.ir_version} > {MAX_IR}"))
    g = _Graph(model)
    for node in model.graph.node:
        label = node.name or node.output[0]
        if node.op_type in FORBIDDEN and target == "trt":
            issues.append(LintIssue(name, "forbidden-op", label, f"{node.op_type} is not allowed in a TensorRT graph"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            issues.extend(_check_qdq(g, node, name, opset, target))
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            fed = [(src := g.source(i)) is not None and src.op_type == "DequantizeLinear" for i in node.input[:2]]
            if any(fed) and not all(fed):
                which = "activation" if not fed[0] else "weight"
                issues.append(LintIssue(name, "qdq-inputs", label, f"quantized {node.op_type} without Q/DQ on its {which} input"))
    issues.extend(_state_pairs(model, name))
    return issues


def _io(values) -> dict[str, tuple[int, list]]:
    return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values}


def _state_pairs(model: onnx.ModelProto, name: str) -> list[LintIssue]:
    inputs, outputs = _io(model.graph.input), _io(model.graph.output)
    issues = []
    for tensor, spec in inputs.items():
        if tensor.split(".", 1)[0] in ("a_hat_in", "o_hat_in"):
            out = naming.output_for_input(tensor)
            if out not in outputs:
                issues.append(LintIssue(name, "state-pairs", tensor, f"state input without output {out}"))
            elif outputs[out] != spec:
                issues.append(LintIssue(name, "state-pairs", tensor, f"{out} differs in dtype/shape ({outputs[out]} vs {spec})"))
    return issues


def lint_export(export_dir: str | Path) -> list[LintIssue]:
    """Lint every graph of an export directory, and check warm-up/step state outputs agree."""
    manifest = load_manifest(export_dir)
    target = manifest.export.get("target", "trt")
    models = {key: onnx.load(str(Path(export_dir) / g.file)) for key, g in manifest.graphs.items()}
    issues = [issue for key, model in models.items() for issue in lint_graph(model, key, target)]
    if "warmup" in models and "step" in models:
        warm, step = _io(models["warmup"].graph.output), _io(models["step"].graph.output)
        step_inputs = {k for k in _io(models["step"].graph.input) if k.split(".", 1)[0] in ("a_hat_in", "o_hat_in")}
        if set(warm) != set(step):
            issues.append(LintIssue("warmup", "state-pairs", "outputs", "warm-up and step graphs return different state"))
        missing = {naming.output_for_input(i) for i in step_inputs} ^ {o for o in step if o != naming.EPS}
        if missing:
            issues.append(LintIssue("step", "state-pairs", "outputs", f"unpaired state tensors: {sorted(missing)[:5]}"))
    return issues
