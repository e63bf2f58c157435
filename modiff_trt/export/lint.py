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
- `qdq-inputs`: a Conv/Gemm/MatMul fed by any DequantizeLinear has DQ on both inputs (TensorRT
  targets: it is how TensorRT fuses them into quantized kernels)
- `state-pairs`: every `*_in.L` state input has its `*_out.L` output with the same dtype/shape

Float formats (docs/formats.md): FP8 Q/DQ carry an FP8 E4M3 zero point of 0 and need opset >= 19;
- `fp8-conv`: a Conv fed by FP8 Q/DQ must be one TensorRT has FP8 kernels for (groups 1, >= 16
  input and output channels, <= 32 filter taps); other convs stay INT8
- `nvfp4`: TensorRT's dynamic block quantization (`trt::TRT_FP4DynamicQuantize`) takes a 2-D/3-D
  input whose blocked (last) dim is a static multiple of 16, blocks of 16 with FP8 block scales, a
  constant positive scalar tensor scale, and feeds a GEMM (MatMul/Gemm) through its two
  DequantizeLinear nodes, never a Conv; ONNX Runtime cannot run it (`forbidden-op` for ort-cpu)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modiff_trt.export import naming
from modiff_trt.export.float_formats import TRT_DOMAIN, TRT_FP4_QUANTIZE
from modiff_trt.export.manifest import load_manifest, read_graph
from modiff_trt.export.qdq import FP16_MIN_NORMAL
from modiff_trt.quant.formats import NVFP4_BLOCK, conv_fp8_blocker

FORBIDDEN = {
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "MatMulIntegerToFloat",
    "QGemm",
}
OPSET_RANGE = (17, 20)
MAX_IR = 10
PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Cast"}
FP8_OPSET = 19


@dataclass(frozen=True)
class LintIssue:
    graph: str
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: [{self.rule}] {self.node}: {self.message}"


class _Constants(Mapping[str, np.ndarray]):
    """A graph's constants, read on access: the lint reads only small ones (scales, zero points)
    and the shapes of weights, so a streamed model's gigabytes of weights are never loaded."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | None):
        self._base_dir = base_dir
        self._tensors = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute:
                self._tensors[node.output[0]] = node.attribute[0].t

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor, str(self._base_dir or "."))
        return numpy_helper.to_array(tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].dims)


class _Graph:
    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None):
        g = model.graph
        self.consts = _Constants(g, base_dir)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.shapes = _inferred_shapes(model)

    def source(self, tensor: str) -> onnx.NodeProto | None:
        """The node producing `tensor`, looking through layout-only ops."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in PASS_THROUGH:
            node = self.producer.get(node.input[0])
        return node


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Tensor shapes ONNX shape inference can tell (unknown dims as names or 0); {} if it fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph that cannot be inferred is linted without shapes
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in values
        if v.type.tensor_type.HasField("shape")
    }


def _is_fp8(array: np.ndarray) -> bool:
    return array.dtype.name == "float8_e4m3fn"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_qdq(g: _Graph, node: onnx.NodeProto, name: str, opset: int, target: str = "trt") -> list[LintIssue]:
    issues = []
    label = node.name or node.output[0]
    if len(node.input) < 3 or not node.input[2]:
        issues.append(
            LintIssue(name, "zero-point", label, "no zero point (defaults to uint8): give an int8 constant 0")
        )
    elif node.input[2] not in g.consts:
        issues.append(LintIssue(name, "zero-point", label, "zero point is computed, not a constant"))
    else:
        zp = g.consts[node.input[2]]
        if target == "ort-cpu" and zp.dtype == np.uint8 and np.all(zp == 128):
            pass  # symmetric int8 grid shifted onto uint8 for ONNX Runtime's u8 kernels
        elif _is_fp8(zp):
            if opset < FP8_OPSET:
                issues.append(
                    LintIssue(name, "opset", label, f"FP8 Q/DQ need opset >= {FP8_OPSET} (graph has {opset})")
                )
            if np.any(zp.astype(np.float32) != 0):
                issues.append(LintIssue(name, "zero-point", label, "non-zero FP8 zero point: TensorRT needs 0"))
        elif zp.dtype != np.int8:
            issues.append(
                LintIssue(name, "zero-point", label, f"zero point is {zp.dtype}, TensorRT needs int8 or FP8 E4M3")
            )
        elif np.any(zp != 0):
            issues.append(LintIssue(name, "zero-point", label, "non-zero zero point: TensorRT needs symmetric Q/DQ"))
    scale = g.consts.get(node.input[1])
    if scale is None:
        issues.append(
            LintIssue(name, "scale", label, "scale is computed at run time: TensorRT needs a build-time constant")
        )
        return issues
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        issues.append(LintIssue(name, "scale", label, "scale must be finite and > 0"))
    elif scale.dtype == np.float16 and np.any(scale < FP16_MIN_NORMAL):
        issues.append(
            LintIssue(
                name,
                "scale",
                label,
                f"fp16 scale {float(scale.min()):.3g} is below fp16's smallest "
                f"normal {FP16_MIN_NORMAL:.3g} (subnormal): re-export, the exporter floors it",
            )
        )
    if scale.dtype == np.float16 and opset < 19:
        issues.append(LintIssue(name, "opset", label, f"fp16 Q/DQ scales need opset >= 19 (graph has {opset})"))
    if scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        on_weight = node.op_type == "DequantizeLinear" and node.input[0] in g.consts
        if not on_weight:
            issues.append(
                LintIssue(name, "scale", label, "per-channel scale on an activation: activations need a scalar scale")
            )
        elif axis != 0 or scale.ndim != 1:
            issues.append(
                LintIssue(name, "scale", label, f"per-channel weight scale must be 1-D on axis 0 (axis={axis})")
            )
    return issues


def lint_graph(
    model: onnx.ModelProto, name: str = "graph", target: str = "trt", base_dir: Path | None = None
) -> list[LintIssue]:
    """Every rule violation in one ONNX graph (state pairing included); `base_dir` holds its
    external data, of which only the constants a rule reads are loaded."""
    issues: list[LintIssue] = []
    opset = _opset(model)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        issues.append(LintIssue(name, "opset", "model", f"opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}"))
    if model.ir_version > MAX_IR:
        issues.append(LintIssue(name, "ir-version", "model", f"IR version {model.ir_version} > {MAX_IR}"))
    g = _Graph(model, base_dir)
    for node in model.graph.node:
        label = node.name or node.output[0]
        if node.op_type in FORBIDDEN and target == "trt":
            issues.append(LintIssue(name, "forbidden-op", label, f"{node.op_type} is not allowed in a TensorRT graph"))
        if node.domain == TRT_DOMAIN:
            if target != "trt":
                issues.append(
                    LintIssue(name, "forbidden-op", label, f"TensorRT's {node.op_type} cannot run on ONNX Runtime")
                )
            if node.op_type == TRT_FP4_QUANTIZE:
                issues.extend(_check_nvfp4(g, node, name))
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            issues.extend(_check_qdq(g, node, name, opset, target))
        if node.op_type == "Conv":
            issues.extend(_check_fp8_conv(g, node, name))
        if node.op_type in ("Conv", "Gemm", "MatMul") and target == "trt":
            fed = [(src := g.source(i)) is not None and src.op_type == "DequantizeLinear" for i in node.input[:2]]
            if any(fed) and not all(fed):
                which = "activation" if not fed[0] else "weight"
                issues.append(
                    LintIssue(name, "qdq-inputs", label, f"quantized {node.op_type} without Q/DQ on its {which} input")
                )
    issues.extend(_state_pairs(model, name))
    return issues


def _attr(node: onnx.NodeProto, key: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)


def _fp8_dq(g: _Graph, tensor: str) -> bool:
    """Whether `tensor` comes (through layout ops) from a DequantizeLinear of FP8 codes."""
    src = g.source(tensor)
    return (
        src is not None
        and src.op_type == "DequantizeLinear"
        and src.domain != TRT_DOMAIN
        and len(src.input) > 2
        and src.input[2] in g.consts
        and _is_fp8(g.consts[src.input[2]])
    )


def _conv_weight_shape(g: _Graph, tensor: str) -> tuple[int, ...] | None:
    """Shape of a Conv's constant weight, read through its DequantizeLinear."""
    if tensor in g.consts:
        return g.consts.shape(tensor)
    src = g.source(tensor)
    if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in g.consts:
        return g.consts.shape(src.input[0])
    return None


def _check_fp8_conv(g: _Graph, node: onnx.NodeProto, name: str) -> list[LintIssue]:
    if not _fp8_dq(g, node.input[0]):
        return []
    shape = _conv_weight_shape(g, node.input[1])
    if shape is None:
        return [LintIssue(name, "fp8-conv", node.name or node.output[0], "FP8 conv without a constant weight")]
    groups = _attr(node, "group", 1)
    blocker = conv_fp8_blocker(shape[1] * groups, shape[0], groups, tuple(shape[2:]))
    if blocker is None:
        return []
    return [LintIssue(name, "fp8-conv", node.name or node.output[0], f"{blocker}: keep this layer INT8")]


def _consumer_ops(g: _Graph, tensor: str) -> set[str]:
    """Op types that read `tensor`, looking through layout-only ops."""
    found: set[str] = set()
    for node in g.consumers.get(tensor, []):
        if node.op_type in PASS_THROUGH:
            found |= _consumer_ops(g, node.output[0])
        else:
            found.add(node.op_type)
    return found


def _check_nvfp4(g: _Graph, node: onnx.NodeProto, name: str) -> list[LintIssue]:
    label = node.name or node.output[0]

    def issue(message: str) -> LintIssue:
        return LintIssue(name, "nvfp4", label, message)

    issues = []
    if _attr(node, "block_size") != NVFP4_BLOCK:
        issues.append(issue(f"block_size {_attr(node, 'block_size')}: TensorRT's NVFP4 blocks are {NVFP4_BLOCK}"))
    if _attr(node, "scale_type") != onnx.TensorProto.FLOAT8E4M3FN:
        issues.append(issue("scale_type must be FLOAT8E4M3FN (NVFP4 block scales are E4M3)"))
    scale = g.consts.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None or scale.size != 1 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        issues.append(issue("the tensor scale must be a constant, finite, positive scalar"))
    shape = g.shapes.get(node.input[0])
    axis = _attr(node, "axis", -1)
    if shape is not None:
        if len(shape) not in (2, 3):
            issues.append(issue(f"input has rank {len(shape)}: TensorRT quantizes 2-D/3-D GEMM inputs"))
        elif axis not in (-1, -2, len(shape) - 1, len(shape) - 2):
            issues.append(issue(f"axis {axis}: TensorRT blocks the last or second-to-last dim"))
        else:
            extent = shape[axis]
            if not isinstance(extent, int) or extent <= 0 or extent % NVFP4_BLOCK:
                issues.append(issue(f"blocked dim {extent!r} must be a static multiple of {NVFP4_BLOCK}"))
    block_dq = [c for c in g.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
    scale_dq = (
        [c for c in g.consumers.get(node.output[1], []) if c.op_type == "DequantizeLinear"]
        if len(node.output) > 1
        else []
    )
    if len(block_dq) != 1 or len(scale_dq) != 1 or block_dq[0].input[1] != scale_dq[0].output[0]:
        issues.append(
            issue("outputs must feed DQ(x_fp4, DQ(block_scales, tensor_scale)), TensorRT's double quantization")
        )
        return issues
    if _attr(block_dq[0], "block_size") != NVFP4_BLOCK or _attr(block_dq[0], "axis", 1) != axis:
        issues.append(issue("the FP4 DequantizeLinear must block like the quantizer (block_size 16, same axis)"))
    users = _consumer_ops(g, block_dq[0].output[0]) & {"MatMul", "Gemm", "Conv", "ConvTranspose"}
    if users != {"MatMul"} and users != {"Gemm"}:  # element-wise readers (MoDiff's a_hat Add) are fine
        issues.append(
            issue(
                f"dequantized NVFP4 feeds {sorted(users) or 'no GEMM'}: TensorRT runs NVFP4 activations only into GEMMs"
            )
        )
    return issues


def _io(values) -> dict[str, tuple[int, list]]:
    return {
        v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in values
    }


def _state_pairs(model: onnx.ModelProto, name: str) -> list[LintIssue]:
    inputs, outputs = _io(model.graph.input), _io(model.graph.output)
    issues = []
    for tensor, spec in inputs.items():
        if tensor.split(".", 1)[0] in ("a_hat_in", "o_hat_in"):
            out = naming.output_for_input(tensor)
            if out not in outputs:
                issues.append(LintIssue(name, "state-pairs", tensor, f"state input without output {out}"))
            elif outputs[out] != spec:
                issues.append(
                    LintIssue(name, "state-pairs", tensor, f"{out} differs in dtype/shape ({outputs[out]} vs {spec})")
                )
    return issues


def lint_export(export_dir: str | Path) -> list[LintIssue]:
    """Lint every graph of an export directory, and check warm-up/step state outputs agree."""
    manifest = load_manifest(export_dir)
    target = manifest.export.target
    models = {key: read_graph(Path(export_dir) / g.file, external_data=False) for key, g in manifest.graphs.items()}
    issues = [issue for key, model in models.items() for issue in lint_graph(model, key, target, Path(export_dir))]
    if "warmup" in models and "step" in models:
        warm, step = _io(models["warmup"].graph.output), _io(models["step"].graph.output)
        step_inputs = {k for k in _io(models["step"].graph.input) if k.split(".", 1)[0] in ("a_hat_in", "o_hat_in")}
        if set(warm) != set(step):
            issues.append(
                LintIssue("warmup", "state-pairs", "outputs", "warm-up and step graphs return different state")
            )
        missing = {naming.output_for_input(i) for i in step_inputs} ^ {o for o in step if o != naming.EPS}
        if missing:
            issues.append(LintIssue("step", "state-pairs", "outputs", f"unpaired state tensors: {sorted(missing)[:5]}"))
    return issues
