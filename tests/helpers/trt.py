"""A tiny synthetic MoDiff export (two int8 Q/DQ convs with state I/O) for the TensorRT tests.

Written with onnx.helper so the tests do not depend on the exporter: warm-up graph
(fp warm-up: a_hat = x, o_hat = conv(x) + b) and step graph (r = x - a_hat, rq = DQ(Q(r)),
a_hat += rq, o_hat += conv(rq)), chained through two layers, `eps = o_hat(last) + 1e-3 * t`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modiff_trt.export.manifest import (
    ExportSection,
    GraphSpec,
    LayerSpec,
    Manifest,
    ModelSection,
    TensorSpec,
    sha256_file,
)
from modiff_trt.export.naming import CONTEXT, EPS, T, X, state_input, state_output
from modiff_trt.quant import QuantConfig
from modiff_trt.sampling import DDIMSampler, NoiseSchedule

C, H, W = 4, 4, 4
LAYERS = ("block.conv1", "block.conv2")
ACT_SCALE = 0.02
OPSET = 19  # fp16 Q/DQ scales need opset 19 (TensorRT 10.0 parses 9-20)
_ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def _weights(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in LAYERS:
        w = rng.normal(0, 0.3, (C, C, 3, 3)).astype(np.float32)
        scale = (np.abs(w).reshape(C, -1).max(axis=1) / 127).astype(np.float32)
        w_int = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
        out[layer] = (w_int, scale, rng.normal(0, 0.1, C).astype(np.float32))
    return out


def _graph(kind: str, dtype: str) -> onnx.ModelProto:
    fdt = _ONNX_DTYPE[dtype]
    npf = np.dtype(dtype)
    nodes, inits = [], []
    batch_shape = ["batch", C, H, W]
    inputs = [
        helper.make_tensor_value_info(X, fdt, batch_shape),
        helper.make_tensor_value_info(T, TensorProto.FLOAT, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info(EPS, fdt, batch_shape)]
    if kind == "step":
        inits.append(numpy_helper.from_array(np.array(ACT_SCALE, dtype=npf), "act_scale"))
        inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), "zp"))
    current = X
    for i, (layer, (w_int, w_scale, bias)) in enumerate(_weights().items()):
        inits += [
            numpy_helper.from_array(w_int, f"w{i}_int"),
            numpy_helper.from_array(w_scale.astype(npf), f"w{i}_scale"),
            numpy_helper.from_array(np.zeros(C, np.int8), f"w{i}_zp"),
        ]
        if kind == "warmup":
            inits.append(numpy_helper.from_array(bias.astype(npf), f"b{i}"))
        nodes.append(helper.make_node("DequantizeLinear", [f"w{i}_int", f"w{i}_scale", f"w{i}_zp"], [f"w{i}"], axis=0))
        a_out, o_out = state_output("a_hat", layer), state_output("o_hat", layer)
        outputs += [helper.make_tensor_value_info(n, fdt, batch_shape) for n in (a_out, o_out)]
        if kind == "warmup":
            nodes.append(helper.make_node("Identity", [current], [a_out]))
            nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [o_out], pads=[1, 1, 1, 1]))
        else:
            a_in, o_in = state_input("a_hat", layer), state_input("o_hat", layer)
            inputs += [helper.make_tensor_value_info(n, fdt, batch_shape) for n in (a_in, o_in)]
            nodes += [
                helper.make_node("Sub", [current, a_in], [f"r{i}"]),
                helper.make_node("QuantizeLinear", [f"r{i}", "act_scale", "zp"], [f"rq{i}_int"]),
                helper.make_node("DequantizeLinear", [f"rq{i}_int", "act_scale", "zp"], [f"rq{i}"]),
                helper.make_node("Add", [a_in, f"rq{i}"], [a_out]),
                helper.make_node("Conv", [f"rq{i}", f"w{i}"], [f"d{i}"], pads=[1, 1, 1, 1]),
                helper.make_node("Add", [o_in, f"d{i}"], [o_out]),
            ]
        current = o_out
    inits.append(numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "t_shape"))
    inits.append(numpy_helper.from_array(np.array(1e-3, dtype=npf), "t_gain"))
    nodes += [
        helper.make_node("Cast", [T], ["t_f"], to=fdt),
        helper.make_node("Reshape", ["t_f", "t_shape"], ["t4"]),
        helper.make_node("Mul", ["t4", "t_gain"], ["t_term"]),
        helper.make_node("Add", [current, "t_term"], [EPS]),
    ]
    graph = helper.make_graph(nodes, kind, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14
    onnx.checker.check_model(model)
    return model


def _specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    out = []
    for v in values:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        out.append(TensorSpec(v.name, dtype, dims))
    return out


def make_tiny_export(out: Path, dtype: str = "float32", batch_size: int | None = None) -> Manifest:
    """Write manifest.json + warmup.onnx + step.onnx into `out` and return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for kind in ("warmup", "step"):
        model = _graph(kind, dtype)
        path = out / f"{kind}.onnx"
        onnx.save(model, path)
        graphs[kind] = GraphSpec(path.name, sha256_file(path), _specs(model.graph.input), _specs(model.graph.output))
    manifest = Manifest(
        model=ModelSection("ddim", "tiny", "0" * 64, None, None, False, (C, H, W), None),
        quant=QuantConfig(8, 8, act_scales="static", state_dtype=dtype),
        sampling=DDIMSampler(NoiseSchedule("linear", 1e-4, 0.02), steps=10),
        export=ExportSection(OPSET, dtype, dtype, "plain", batch_size, "trt", 1, None, (), 0.0),
        graphs=graphs,
        layers=[LayerSpec(n, "conv2d", 8, 8, [ACT_SCALE], None, [C, H, W], [C, H, W]) for n in LAYERS],
        tool_version="test",
    )
    (out / "manifest.json").write_text(manifest.to_json())
    return manifest


def digits_export(
    out: Path,
    workdir: Path,
    float_dtype: str = "float16",
    batch_size: int | None = None,
    modulate: bool = True,
    step_groups: int = 1,
    state_layout: str = "plain",
    state_dtype: str = "float32",
) -> Path:
    """The embedded digits model, W8A8 with static scales calibrated on 10-step trajectories, exported
        to `out` with the real exporter (what users build): MoDiff warm-up + step, or the plain unet graph;
    `state_layout` 'scaled' carries a_hat in units of its residual scale.

        `workdir` holds the calibration file, reused between exports of the same kind."""
    from modiff_trt.engines.torch_backend import load_reference
    from modiff_trt.export.exporter import export_model
    from modiff_trt.models import load_config
    from modiff_trt.models.builtin import builtin_checkpoint
    from modiff_trt.pipeline import calibration_file
    from modiff_trt.quant import QuantConfig
    from modiff_trt.sampling import make_sampler

    model_cfg, checkpoint = load_config("digits"), builtin_checkpoint("digits")
    quant = QuantConfig(
        8, 8, modulate=modulate, act_scales="static", state_layout=state_layout, state_dtype=state_dtype
    )
    sampler = make_sampler(model_cfg, steps=10)
    workdir.mkdir(parents=True, exist_ok=True)
    calibration = calibration_file(
        model_cfg, checkpoint, quant, sampler, workdir, cali_st=9, cali_n=8, batch_size=8, step_groups=step_groups
    )
    _, float_model, qmodel = load_reference(model_cfg, checkpoint, quant, calibration)
    export_model(
        float_model,
        qmodel,
        model_cfg,
        out,
        checkpoint=checkpoint,
        calibration=calibration,
        sampler=sampler,
        float_dtype=float_dtype,
        batch_size=batch_size,
    )
    return out


class Recorder:
    """Wraps a runner: keeps every call's eps and a copy of the state the next call reads (CPU float32)."""

    def __init__(self, runner) -> None:
        self.runner, self.device, self.eps, self.states = runner, runner.device, [], []

    def reset_state(self) -> None:
        self.runner.reset_state()

    def __call__(self, x, t, context=None):
        eps = self.runner(x, t, context)
        self.eps.append(eps.float().cpu().clone())
        if self.runner.manifest.modulated:
            self.states.append({k: v.float().cpu().clone() for k, v in self.runner.state().items()})
        return eps


def sample_recorded(runner, export_dir: Path, n: int = 3, steps: int = 10):
    """(Recorder, final x on the CPU) of one trajectory of the export's sampler from per-image noise (seed 0)."""
    from modiff_trt.export.manifest import load_manifest
    from modiff_trt.sampling import image_noise, make_sampler

    manifest = load_manifest(export_dir)
    recorder = Recorder(runner)
    noise = image_noise(0, range(n), manifest.model.sample_shape).to(runner.device)
    x = make_sampler(manifest.sampling, steps=steps).trajectory(recorder, noise)
    return recorder, x.float().cpu()


__all__ = ["make_tiny_export", "digits_export", "Recorder", "sample_recorded", "C", "H", "W", "LAYERS", "CONTEXT"]
