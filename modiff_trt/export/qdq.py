"""The Q/DQ + MoDiff-state pass: rewrite each quantized layer of a float ONNX graph.

For layer L (input x, output y) the pass emits, in the float type F of the graph:

- plain (Q-Diffusion):  y = Op(DQ(Q(Clip(x))), DQ(W_int8)) + b
- warm-up, fp:          y = Op(x, W_deq) + b;           a_hat_out = x, o_hat_out = y
- warm-up, quantized:   a = DQ(Q(Clip(x))); y = Op(a, DQ(W_int8)) + b; a_hat_out = a, o_hat_out = y
- step:                 rq = DQ(Q(Clip(x - a_hat_in))); y = o_hat_in + Op(rq, DQ(W_int8))
                        a_hat_out = a_hat_in + rq,   o_hat_out = y

- step, constant input:  y = o_hat_in; o_hat_out = o_hat_in   (no a_hat: see LayerScales.constant_input)
- step, a_hat shared:    as step, with the owner's a_hat_in and no a_hat_out (`shared_state.py`)

With step groups (scales calibrated per group of sampling steps) the step graph keeps the
constant scale s_0 and reads this step's ratios from the `step_scale_ratio` input [2, Q] (one
column per quantizer, in layer order): rq = DQ(Q(Clip(r * s_0/s_g))) * s_g/s_0 and, by linearity,
y = o_hat_in + Op(DQ(...), DQ(W_int8)) * s_g/s_0, so the Q/DQ pair still feeds the Op directly.

Q/DQ are symmetric int8 with a constant zero point 0 and a constant positive scale; b-bit grids
(b < 8) are exact on int8 through the Clip to [-2^(b-1), 2^(b-1)-1] * scale. Layers in a float
activation format (FP8, NVFP4) take that format's form instead (`float_formats.py`). Weights are int8
initializers with a per-output-channel DequantizeLinear on axis 0. Split layers (skip concats)
quantize their two channel groups separately and sum two convolutions. State tensors travel in
the state dtype S; Casts bridge S and F when they differ. In fp16 graphs every Q/DQ scale is
floored at fp16's smallest normal (2^-14): below it a scale is subnormal, and the calibrators'
1e-8 floor rounds to 0, which TensorRT's ONNX parser rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from modiff_trt.errors import ArtifactError
from modiff_trt.export import naming
from modiff_trt.export.float_formats import TRT_DOMAIN, fp8_fake_quant, nvfp4_emulated, nvfp4_trt
from modiff_trt.export.sites import LayerSite, layer_inputs
from modiff_trt.export.weight_store import WeightStore
from modiff_trt.quant import QuantLayer, QuantUNet
from modiff_trt.quant.quantizers import int_range

GraphKind = Literal["plain", "warmup", "step"]
ONNX_TYPE = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16}
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2^-14 = 6.103515625e-05


def scale_floor(float_dtype: str | np.dtype) -> float:
    """The smallest Q/DQ scale a graph of `float_dtype` may hold (0: no floor beyond the calibrators')."""
    return FP16_MIN_NORMAL if np.dtype(float_dtype) == np.float16 else 0.0


@dataclass
class Emitter:
    """Collects the nodes and initializers of one layer's replacement, with unique names."""

    prefix: str
    float_dtype: np.dtype
    store: WeightStore = field(default_factory=WeightStore)

    def __post_init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self.scale_floor = scale_floor(self.float_dtype)

    def floor(self, scale):
        """`scale` raised to this graph's scale floor (see `scale_floor`)."""
        return np.maximum(scale, self.scale_floor)

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(self.store.tensor(name, value))
        return name

    def float_const(self, hint: str, value) -> str:
        return self.const(hint, np.asarray(value, dtype=self.float_dtype))

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.fresh(op_type), **attrs))
        return output

    def convert(self, tensor: str, to: np.dtype, output: str | None = None) -> str:
        """Cast when dtypes differ, else an Identity when a fixed output name is needed."""
        if np.dtype(to) != self.float_dtype:
            return self.op("Cast", [tensor], output, to=ONNX_TYPE[np.dtype(to)])
        return self.op("Identity", [tensor], output) if output else tensor


class ActGrid(NamedTuple):
    """An activation quantizer as kernels see it: scale, the integer range of its int8 codes, and
    its format (`int`, or a float format whose scale is all it needs)."""

    scale: float
    lo: int
    hi: int
    format: str = "int"


def act_grid(layer: QuantLayer, scale: float, zero_point: float | None = None) -> ActGrid:
    """The int8 view of a layer's b-bit activation quantizer (or its float format's scale).

    An asymmetric grid with zero point z has codes x_int - z in [-z, 2^b - 1 - z]: the values of
    a symmetric int8 quantizer clipped to that range, exact whenever the range fits int8.
    """
    if scale <= 0 or not np.isfinite(scale):
        raise ArtifactError(f"layer {layer.name}: activation scale {scale} is not a positive number; recalibrate")
    if layer.format.format != "int":
        return ActGrid(float(scale), 0, 0, layer.format.format)
    bits = layer.act_bits
    lo, hi = int_range(bits) if zero_point is None else (-int(zero_point), 2**bits - 1 - int(zero_point))
    if lo < -128 or hi > 127:
        raise ArtifactError(
            f"layer {layer.name}: the {bits}-bit asymmetric activation grid (zero point {zero_point:.0f}) spans "
            f"[{lo}, {hi}], outside int8: TensorRT needs symmetric int8; calibrate symmetric scales instead"
        )
    return ActGrid(float(scale), lo, hi)


def quantize_codes(em: Emitter, x: str, grid: ActGrid, zero_point: np.ndarray | None = None) -> tuple[str, str, str]:
    """Clip to the grid's range (when narrower than int8), then QuantizeLinear: (codes, scale, zero point).

    The zero point defaults to int8 0 (TensorRT); a uint8 128 gives the same grid shifted by 128.
    """
    s = em.float_const("scale", grid.scale)
    zp = em.const("zero_point", np.array(0, dtype=np.int8) if zero_point is None else zero_point)
    if (grid.lo, grid.hi) != (-128, 127):
        scale = np.float64(grid.scale)
        x = em.op("Clip", [x, em.float_const("lo", grid.lo * scale), em.float_const("hi", grid.hi * scale)])
    return em.op("QuantizeLinear", [x, s, zp]), s, zp


def _fake_quant(em: Emitter, x: str, grid: ActGrid, emulate_nvfp4: bool = False) -> str:
    """DQ(Q(x)) on the grid: int8 Q/DQ with zero point 0 after a Clip to the grid, FP8 Q/DQ, or NVFP4
    in TensorRT's form (or its standard-op emulation for ONNX Runtime)."""
    if grid.format == "fp8":
        return fp8_fake_quant(em, x, grid.scale)
    if grid.format == "nvfp4":
        return (nvfp4_emulated if emulate_nvfp4 else nvfp4_trt)(em, x, grid.scale)
    return em.op("DequantizeLinear", list(quantize_codes(em, x, grid)))


def weight_codes(layer: QuantLayer, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [O, group channels, ...], per-output-channel float64 scale [O]) of one channel group."""
    codes = layer.weight_codes[:, layer.groups[group]].numpy()
    if codes.min() < -128 or codes.max() > 127:
        raise ArtifactError(
            f"layer {layer.name}: integer weights span [{codes.min():.0f}, {codes.max():.0f}], outside int8; "
            "8-bit asymmetric weights cannot run on symmetric int8 kernels exactly: use symmetric weights"
        )
    return codes.astype(np.int8), layer.weight_scale[:, group].numpy().astype(np.float64)


def _weight(em: Emitter, layer: QuantLayer, group: int, quantized: bool) -> str:
    """Weight of one channel group as int8 + per-channel DQ (axis 0); unquantized: the whole float weight."""
    if not quantized or layer.weight_codes is None:
        return em.float_const("w", layer.w_deq.numpy())
    codes, scale = weight_codes(layer, group)
    w = em.const("w_int8", codes)
    zp = em.const("w_zero_point", np.zeros(codes.shape[0], dtype=np.int8))
    return em.op("DequantizeLinear", [w, em.float_const("w_scale", em.floor(scale)), zp], axis=0)


def op_attributes(site: LayerSite) -> dict:
    """The attributes (strides, pads, ...) of the layer's original node."""
    return {a.name: helper.get_attribute_value(a) for a in site.attributes}


def _apply(em: Emitter, site: LayerSite, x: str, w: str, bias: np.ndarray | None, output: str | None = None) -> str:
    """Op(x, w) (+ bias) in the form the layer had: Conv, Gemm(transB) or MatMul(x, w^T)."""
    attrs = op_attributes(site)
    b = [em.float_const("bias", bias)] if bias is not None else []
    if site.op == "MatMul":
        y = em.op("MatMul", [x, em.op("Transpose", [w], perm=[1, 0])], None if b else output)
        return em.op("Add", [y, b[0]], output) if b else y
    return em.op(site.op, [x, w, *b], output, **attrs)


class GroupKernel(Protocol):
    """Emits one channel group of a quantized layer: (dequantized input, float Op output).

    The graph form of the MoDiff bookkeeping (residual, state Adds, split/concat) is shared by
    every target; only how `Op(Q(x), Wq)` is computed differs, so targets plug in here.
    """

    def __call__(
        self,
        em: Emitter,
        site: LayerSite,
        layer: QuantLayer,
        x: str,
        group: int,
        grid: ActGrid,
        bias: np.ndarray | None,
        output: str | None = None,
    ) -> tuple[str, str]: ...


def dequantized_op(
    em: Emitter,
    site: LayerSite,
    layer: QuantLayer,
    x: str,
    group: int,
    grid: ActGrid,
    bias: np.ndarray | None,
    output: str | None = None,
    emulate_nvfp4: bool = False,
) -> tuple[str, str]:
    """Op(DQ(Q(x)), DQ(W_int8)) (+ bias), float output: the Q/DQ form of any activation format."""
    xq = _fake_quant(em, x, grid, emulate_nvfp4)
    return xq, _apply(em, site, xq, _weight(em, layer, group, True), bias, output)


def qdq_kernel(
    em: Emitter,
    site: LayerSite,
    layer: QuantLayer,
    x: str,
    group: int,
    grid: ActGrid,
    bias: np.ndarray | None,
    output: str | None = None,
) -> tuple[str, str]:
    """TensorRT form: Op(DQ(Q(Clip(x))), DQ(W_int8)) (+ bias), float output; NVFP4 through TensorRT's op."""
    return dequantized_op(em, site, layer, x, group, grid, bias, output)


Ratios = list[tuple[str, str]]  # per channel group: (pre, post) scalar tensor names in the graph


def _ratio_scalars(em: Emitter, first: int, count: int) -> Ratios:
    """This layer's (pre, post) multipliers: columns first..first+count-1 of `step_scale_ratio`."""

    def pick(row: int, column: int) -> str:
        return em.op("GatherND", [naming.STEP_SCALE_RATIO, em.const("ratio_index", np.array([row, column]))])

    return [(pick(0, first + i), pick(1, first + i)) for i in range(count)]


def _quantized_op(
    em: Emitter,
    site: LayerSite,
    layer: QuantLayer,
    x: str,
    scales: list[float] | None,
    zero_points: list[float] | None,
    bias: np.ndarray | None,
    output: str | None = None,
    kernel: GroupKernel = qdq_kernel,
    ratios: Ratios | None = None,
) -> tuple[str, str]:
    """(fake-quantized input, Op output): per channel group when the layer is split; `ratios`
    fold a step group's scale around each group's constant quantizer (no bias then)."""
    if layer.act_bits is None:  # weight-only: float activations, so the (exact) dequantized weight stays float too
        return x, _apply(em, site, x, _weight(em, layer, 0, quantized=False), bias, output)
    if scales is None:
        raise ArtifactError(f"layer {layer.name} has no static activation scale: export needs a calibration")
    # NVFP4's tensor scale stays an fp32 constant in every graph (TensorRT takes it so), so no fp16 floor
    grids = [
        act_grid(
            layer,
            float(scale if layer.format.format == "nvfp4" else em.floor(scale)),
            None if zero_points is None else zero_points[i],
        )
        for i, scale in enumerate(scales)
    ]

    def run(group: int, part: str, b: np.ndarray | None, out: str | None) -> tuple[str, str]:
        if ratios is None:
            return kernel(em, site, layer, part, group, grids[group], b, out)
        pre, post = ratios[group]
        xq, y = kernel(em, site, layer, em.op("Mul", [part, pre]), group, grids[group], None)
        return em.op("Mul", [xq, post]), em.op("Mul", [y, post], out)

    if len(layer.groups) == 1:
        return run(0, x, bias, output)
    if site.op != "Conv":
        raise ArtifactError(f"layer {layer.name}: split quantization is only supported for convolutions")
    sizes = em.const("split", np.array([g.stop - g.start for g in layer.groups], dtype=np.int64))
    parts = [em.fresh("group") for _ in layer.groups]
    em.nodes.append(helper.make_node("Split", [x, sizes], parts, name=em.fresh("Split"), axis=1))
    # The bias rides on the first group's Conv; the second group's Conv adds on top.
    pairs = [run(i, p, bias if i == 0 else None, None) for i, p in enumerate(parts)]
    return em.op("Concat", [q for q, _ in pairs], axis=1), em.op("Add", [y for _, y in pairs], output)


def _emit_layer(
    em: Emitter,
    site: LayerSite,
    layer: QuantLayer,
    kind: GraphKind,
    state_dtype: np.dtype,
    kernel: GroupKernel,
    ratio_column: int | None = None,
    a_hat_owner: str | None = None,
) -> None:
    """Rewrite one layer; `ratio_column`: its first column of `step_scale_ratio` (step groups);
    `a_hat_owner`: the earlier layer whose `a_hat` this one reads and leaves to it to write
    (`shared_state.a_hat_owners`)."""
    bias = None if layer.module.bias is None else layer.module.bias.detach().numpy()
    s = layer.scales
    if kind == "plain":
        _quantized_op(em, site, layer, site.x, s.act, s.act_zero_point, bias, output=site.y, kernel=kernel)
        return
    a_out, o_out = naming.state_output("a_hat", layer.name), naming.state_output("o_hat", layer.name)
    unit = layer.state_unit()
    unit = None if unit is None else em.float_const("a_hat_unit", em.floor(unit.numpy()))
    if kind == "warmup":
        if layer.config.first_step == "fp" or layer.act_bits is None:
            a_hat = site.x
            _apply(em, site, site.x, _weight(em, layer, 0, quantized=False), bias, output=site.y)
        else:
            a_hat, _ = _quantized_op(
                em, site, layer, site.x, s.warmup, s.warmup_zero_point, bias, output=site.y, kernel=kernel
            )
        if unit is not None:
            a_hat = em.op("Div", [a_hat, unit])
    elif layer.scales.constant_input:
        # The input never changes, so the residual is exactly 0 and f(0) = 0: o_hat passes through.
        o_in = naming.state_input("o_hat", layer.name)
        em.op("Identity", [o_in], o_out)
        if state_dtype != em.float_dtype:
            em.op("Cast", [o_in], site.y, to=ONNX_TYPE[em.float_dtype])
        else:
            em.op("Identity", [o_in], site.y)
        return
    else:
        a_in = naming.state_input("a_hat", a_hat_owner or layer.name)
        o_in = naming.state_input("o_hat", layer.name)
        if state_dtype != em.float_dtype:
            a_in = em.op("Cast", [a_in], to=ONNX_TYPE[em.float_dtype])
            o_in = em.op("Cast", [o_in], to=ONNX_TYPE[em.float_dtype])
        # state_layout 'scaled': a_in is A = a_hat / unit (QuantLayer.state_unit), advanced by rq / unit
        residual = em.op("Sub", [site.x, a_in if unit is None else em.op("Mul", [a_in, unit])])
        ratios = None if ratio_column is None else _ratio_scalars(em, ratio_column, len(layer.groups))
        rq, f = _quantized_op(em, site, layer, residual, s.act, s.act_zero_point, None, kernel=kernel, ratios=ratios)
        a_hat = em.op("Add", [a_in, rq if unit is None else em.op("Div", [rq, unit])])
        em.op("Add", [o_in, f], site.y)
    # a follower's a_hat is its owner's (the same values): the owner writes it, `_live` drops this copy
    if a_hat_owner is None and not layer.scales.constant_input:
        em.convert(a_hat, state_dtype, a_out)
    em.convert(site.y, state_dtype, o_out)


def _state_value_infos(
    layers: dict[str, QuantLayer],
    shapes: dict[str, tuple[list[int], list[int]]],
    direction: str,
    state_dtype: np.dtype,
    batch: int | str,
    owners: dict[str, str],
) -> list[onnx.ValueInfoProto]:
    infos = []
    for name, layer in layers.items():
        for kind, shape in zip(naming.STATE_KINDS, shapes[name]):
            if kind not in naming.state_kinds(not layer.scales.constant_input and name not in owners):
                continue
            tensor = naming.state_input(kind, name) if direction == "in" else naming.state_output(kind, name)
            infos.append(helper.make_tensor_value_info(tensor, ONNX_TYPE[state_dtype], [batch, *shape]))
    return infos


def floored_scales(qmodel: QuantUNet, float_dtype: str) -> list[str]:
    """`layer/act`, `layer/warmup`, `layer/weight` for every scale a `float_dtype` graph raises to its floor."""
    floor, found = scale_floor(float_dtype), []
    for name, layer in qmodel.layers.items():
        s, config = layer.scales, layer.config
        floored = layer.act_bits is not None and layer.format.format != "nvfp4"  # NVFP4's tensor scale stays fp32
        used = {
            "act": s.act if floored and not s.constant_input else None,
            "warmup": s.warmup if floored and config.modulate and config.first_step == "quantized" else None,
            "weight": layer.weight_scale if layer.weight_codes is not None else None,
        }
        found += [
            f"{name}/{kind}"
            for kind, values in used.items()
            if values is not None and bool((np.asarray(values, dtype=np.float64) < floor).any())
        ]
    return found


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` minus those whose results nothing reads (ONNX Runtime would still run them): e.g. the
    dequantized input an integer kernel returns for a_hat, which a plain graph never uses."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


def ratio_columns(qmodel: QuantUNet) -> dict[str, int] | None:
    """Each layer's first column of `step_scale_ratio` (one column per channel group, layer
    order), or None when the model has no step groups (then the graph has no ratio input)."""
    if qmodel.step_groups is None or qmodel.config.act_bits is None:
        return None
    columns, first = {}, 0
    for name, layer in qmodel.layers.items():
        columns[name], first = first, first + len(layer.groups)
    return columns


def step_ratio_table(qmodel: QuantUNet) -> list[list[list[float]]] | None:
    """The `step_scale_ratio` value of every step group [G][2][quantizers], in `ratio_columns` order."""
    if ratio_columns(qmodel) is None:
        return None
    table = []
    for group in range(qmodel.step_groups.count):
        rows: list[list[float]] = [[], []]
        for layer in qmodel.layers.values():
            pre, post = layer.ratios[group]
            rows[0].extend(pre)
            rows[1].extend(post)
        table.append(rows)
    return table


def insert_quantization(
    model: onnx.ModelProto,
    qmodel: QuantUNet,
    sites: dict[str, LayerSite],
    kind: GraphKind,
    state_shapes: dict[str, tuple[list[int], list[int]]],
    float_dtype: str = "float32",
    state_dtype: str = "float32",
    kernel: GroupKernel = qdq_kernel,
    store: WeightStore | None = None,
    owners: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """A copy of the float graph `model` with every layer of `qmodel` rewritten for `kind`.

    `sites` locates the layers in `model` (`find_sites`, once per export: it is the same for
    every graph kind). `owners` ({follower: owner}, `shared_state.a_hat_owners`) lets layers
    that read one tensor with one quantizer carry one `a_hat` between them (default: none shared).

    `kernel` emits each quantized Op: TensorRT-style Q/DQ by default (`qdq_kernel`); the
    ort-cpu target passes integer kernels (`modiff_trt.export.ort_cpu`). `store` receives the
    new constants (default: inline in the graph; a streaming store writes them to its file).
    """
    store = store or WeightStore()
    owners = owners or {}
    fdt, sdt = np.dtype(float_dtype), np.dtype(state_dtype)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    layers = qmodel.layers
    replacements: dict[int, Emitter] = {}
    removed: set[int] = set()
    columns = ratio_columns(qmodel) if kind == "step" else None
    for name, site in sites.items():
        em = Emitter(name, fdt, store)
        column = None if columns is None else columns[name]
        _emit_layer(em, site, layers[name], kind, sdt, kernel, column, owners.get(name))
        replacements[site.position] = em
        removed.update(site.removed)
        graph.initializer.extend(em.initializers)
    nodes = []
    for index, node in enumerate(graph.node):
        if index in replacements:
            nodes.extend(replacements[index].nodes)
        if index not in removed:
            nodes.append(node)
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim: int | str = batch.dim_param or batch.dim_value
    if kind != "plain":
        if kind == "step":
            graph.input.extend(_state_value_infos(layers, state_shapes, "in", sdt, batch_dim, owners))
            if columns is not None:
                width = sum(len(layer.groups) for layer in layers.values())
                graph.input.append(helper.make_tensor_value_info(naming.STEP_SCALE_RATIO, ONNX_TYPE[fdt], [2, width]))
        graph.output.extend(_state_value_infos(layers, state_shapes, "out", sdt, batch_dim, owners))
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))
    used = {i for n in graph.node for i in n.input}
    float_inputs = layer_inputs(layers)  # the traced float weights: replaced above, so nothing may read them
    if used & float_inputs:
        raise ArtifactError(
            f"the float weight {sorted(used & float_inputs)[0]} is read outside its layer (the model's forward uses "
            "a layer's parameters directly): such a model cannot be exported"
        )
    kept_inputs = [value for value in graph.input if value.name not in float_inputs]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if any(n.domain == TRT_DOMAIN for n in graph.node) and all(o.domain != TRT_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    return out
