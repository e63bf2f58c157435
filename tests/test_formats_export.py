"""FP8 / NVFP4 through calibration and export: per-layer MoDiff exactness on ONNX Runtime, the
TensorRT NVFP4 form against its emulation, the float-format lint rules, the manifest."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from modiff_trt.calibrators import CalibrationOptions, calibrate, load_calibration
from modiff_trt.engines.ort_backend import OrtRunner, session_options
from modiff_trt.engines.torch_backend import load_reference
from modiff_trt.errors import ArtifactError, ConfigError
from modiff_trt.export.exporter import export_model
from modiff_trt.export.lint import lint_export, lint_graph
from modiff_trt.export.manifest import load_manifest
from modiff_trt.models import load_config
from modiff_trt.quant import QuantConfig
from modiff_trt.sampling import make_sampler
from modiff_trt.sampling.conditioning import RandomContext
from tests.helpers.export import BETAS, SEQ, SHAPE, check_step_layers, export
from tests.helpers.ldm import ldm_states, small_ldm


@pytest.fixture
def noise():
    return torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "config",
    [QuantConfig(8, 8, act_format="fp8"), QuantConfig(8, 8, act_format="fp8", split=True, first_step="quantized")],
    ids=["fp8", "fp8-split-quantized-warmup"],
)
def test_fp8_step_graph_follows_modiff_per_layer_and_passes_lint(tmp_path, tiny_model, noise, config):
    """TensorRT's FP8 Q/DQ graph on ONNX Runtime: rq on the FP8 grid equals the reference's Q(x - a_hat)
    bit for bit and o_hat accumulates f(rq, Wq); narrow convs stay INT8 and say why."""
    qmodel, out = export(tmp_path, tiny_model, config)
    assert check_step_layers(out, qmodel, noise) == len(qmodel.layers) * (len(SEQ) - 1)
    assert lint_export(out) == []
    manifest = load_manifest(out)
    assert manifest.export.opset == 19
    formats = {layer.name: layer for layer in manifest.layers}
    assert formats["down.0.block.0.conv1"].act_format == "fp8" and formats["temb.dense.0"].act_format == "fp8"
    for name in ("conv_in", "conv_out"):  # 3 image channels: TensorRT has no FP8 kernel
        assert (formats[name].act_format, formats[name].act_bits) == ("int", 8)
        assert "channels: TensorRT's FP8 convs need >= 16" in formats[name].format_note
    step = onnx.load(str(out / "step.onnx"))
    fp8_q = [
        n
        for n in step.graph.node
        if n.op_type == "QuantizeLinear"
        and numpy_helper.to_array(next(i for i in step.graph.initializer if i.name == n.input[2])).dtype.name
        == "float8_e4m3fn"
    ]
    assert len(fp8_q) == sum(len(qmodel.layers[n].groups) for n, s in formats.items() if s.act_format == "fp8")


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_float_format_exports_of_an_sd_shaped_model(tmp_path, fmt):
    """SD-shaped UNet calibrated for the format. NVFP4: the Linears (attention projections,
    feed-forward, time embedding) go NVFP4, convs FP8/INT8; its ort-cpu graph runs the same
    arithmetic. FP8: TensorRT's graph runs on ORT as it is. Either passes the per-layer check
    along PLMS with guidance (3-D MatMul sites included) and the lint; ORT refuses TensorRT's
    NVFP4 graph with a clear error."""
    bits = 4 if fmt == "nvfp4" else 8
    path, ckpt, _ = small_ldm(tmp_path, "sd", seed=1)
    cfg = load_config(path)
    context, sampler = RandomContext(cfg.context_shape), make_sampler(cfg, steps=2)
    cal = tmp_path / f"sd-{fmt}.safetensors"
    calibrate(
        cfg,
        ckpt,
        cal,
        sampler,
        CalibrationOptions(act_bits=bits, act_format=fmt, cali_st=3, cali_n=2, batch_size=2),
        conditioning=context,
        progress=False,
    )
    assert load_calibration(cal).meta["act_format"] == fmt
    cfg, unet, qmodel = load_reference(path, ckpt, QuantConfig(8, bits, act_scales="static", act_format=fmt), cal)
    kinds = {(layer.kind, layer.format.format) for layer in qmodel.layers.values()}
    assert kinds == {("linear", fmt), ("conv2d", "fp8"), ("conv2d", "int")}
    targets = ("ort-cpu", "trt") if fmt == "nvfp4" else ("trt",)
    for target in targets:
        export_model(
            unet,
            qmodel,
            cfg,
            tmp_path / target,
            checkpoint=ckpt,
            calibration=cal,
            guidance=True,
            sampler=sampler,
            target=target,
        )
        assert lint_export(tmp_path / target) == []
    noise = torch.randn(1, *cfg.sample_shape, generator=torch.Generator().manual_seed(5))
    checked = check_step_layers(
        tmp_path / targets[0], qmodel, noise, run=lambda m: ldm_states(m, sampler, noise, context)
    )
    assert checked == len(qmodel.layers) * (sampler.model_calls() - 1)
    if fmt == "nvfp4":
        trt_step = onnx.load(str(tmp_path / "trt" / "step.onnx"))
        quantizers = [n for n in trt_step.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
        # layers whose input never changes (cross-attention K/V on the context) pass o_hat through
        assert (
            len(quantizers)
            == sum(
                layer.format.format == "nvfp4" and not layer.scales.constant_input for layer in qmodel.layers.values()
            )
            > 0
        )
        with pytest.raises(ArtifactError, match="--target ort-cpu"):
            OrtRunner(tmp_path / "trt")


class TRT_FP4DynamicQuantize(OpRun):  # named after the op it stands in for
    """TensorRT's dynamic NVFP4 quantization as its operator documentation describes it, through
    ml_dtypes' own E4M3/E2M1 casts (16-element blocks along the last dim; a zero block stays zero)."""

    op_domain = "trt"

    def _run(self, x, scale, axis=-1, block_size=16, scale_type=None):
        blocks = x.reshape(-1, block_size).astype(np.float32)
        amax = np.abs(blocks).max(axis=-1, keepdims=True)
        b = np.clip(amax / 6 / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        step = b.astype(np.float32) * scale
        q = np.where(step > 0, blocks / np.where(step > 0, step, 1), 0).astype(ml_dtypes.float4_e2m1fn)
        return q.reshape(x.shape), b.reshape(*x.shape[:-1], -1)


class _DequantizeLinear(OpRun):
    """DequantizeLinear for both domains (a custom op of that name replaces the evaluator's own):
    per tensor, per axis, or blocked, each scale covering `block_size` elements along `axis`."""

    def _run(self, x, scale, zero_point=None, axis=1, block_size=0, output_dtype=None):
        def spread(v):  # a per-axis or blocked parameter, broadcast against x
            if block_size:
                return np.repeat(v, block_size, axis=axis)
            return v.reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)]) if v.size > 1 else v

        zero = 0 if zero_point is None else spread(zero_point.astype(np.float32))
        return (((x.astype(np.float32) - zero) * spread(scale)).astype(np.float32),)


DEQUANTIZE = [type("DequantizeLinear", (_DequantizeLinear,), {"op_domain": domain}) for domain in ("", "trt")]


def _layer_subgraph(path, layer: str) -> onnx.ModelProto:
    """The step graph of `path` from layer's residual (its Sub) to its GEMM output: the nodes
    that output depends on, walked back to the residual and the initializers."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.name.startswith(f"{layer}/")]
    residual = next(n.output[0] for n in nodes if n.op_type == "Sub")
    gemm = next(n.output[0] for n in nodes if n.op_type in ("Gemm", "MatMul"))
    keep, used, todo = set(), set(), [gemm]
    while todo:
        tensor = todo.pop()
        if tensor == residual or not tensor:
            continue
        if tensor in inits:
            used.add(tensor)
            continue
        node = producer[tensor]
        if id(node) not in keep:
            keep.add(id(node))
            todo.extend(node.input)
    graph = helper.make_graph(
        [n for n in model.graph.node if id(n) in keep],
        "layer",
        [helper.make_tensor_value_info(residual, onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(gemm, onnx.TensorProto.FLOAT, None)],
        [inits[n] for n in sorted(used)],
    )
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def test_tensorrt_nvfp4_form_computes_the_emulated_arithmetic(tmp_path, tiny_model, noise):
    """Per NVFP4 layer, TensorRT's form (ONNX's reference evaluator, with TensorRT's quantizer and
    DequantizeLinear written from their documentation) and the ort-cpu emulation on ONNX Runtime
    give the reference's f(Q(r), Wq), on real residuals."""
    import onnxruntime as ort

    from modiff_trt.sampling import ddim_sample

    config = QuantConfig(8, 4, act_format="nvfp4")
    qmodel, trt_dir = export(tmp_path, tiny_model, config, name="trt")
    _, ort_dir = export(tmp_path, tiny_model, config, name="ort", target="ort-cpu")
    residuals = {}
    nvfp4 = [name for name, layer in qmodel.layers.items() if layer.format.format == "nvfp4"]
    for name in nvfp4:
        qmodel.layers[name].register_forward_pre_hook(
            lambda m, args, name=name: residuals.setdefault(name, []).append(
                args[0] - m.a_hat if m.a_hat is not None else None
            )
        )
    ddim_sample(qmodel, noise, SEQ[:3], BETAS)
    assert len(nvfp4) == 10 and set(residuals) == set(nvfp4)  # the time-embedding Linears
    for name, seen in residuals.items():
        layer, r = qmodel.layers[name], seen[-1]
        want = layer.apply_weight(layer.quantize_step_input(r), bias=False).numpy()
        trt_graph = _layer_subgraph(trt_dir / "step.onnx", name)
        evaluator = ReferenceEvaluator(trt_graph, new_ops=[TRT_FP4DynamicQuantize, *DEQUANTIZE])
        got_trt = evaluator.run(None, {trt_graph.graph.input[0].name: r.numpy()})[0]
        ort_graph = _layer_subgraph(ort_dir / "step.onnx", name)
        session = ort.InferenceSession(
            ort_graph.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
        got_ort = session.run(None, {ort_graph.graph.input[0].name: r.numpy()})[0]
        assert np.allclose(got_trt, want, rtol=1e-5, atol=1e-6) and np.allclose(got_ort, want, rtol=1e-5, atol=1e-6)
        assert np.abs(r.numpy()).max() > 0


def _mutate(model: onnx.ModelProto, op_type: str, **attrs) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.op_type == op_type)
    for key, value in attrs.items():
        for a in node.attribute:
            if a.name == key:
                node.attribute.remove(a)
                break
        node.attribute.append(helper.make_attribute(key, value))
    return out


def test_lint_catches_float_format_violations(tmp_path, tiny_model):
    _, fp8 = export(tmp_path, tiny_model, QuantConfig(8, 8, act_format="fp8", modulate=False), name="fp8")
    _, nvfp4 = export(tmp_path, tiny_model, QuantConfig(8, 4, act_format="nvfp4", modulate=False), name="nvfp4")
    plain, trt = onnx.load(str(fp8 / "unet.onnx")), onnx.load(str(nvfp4 / "unet.onnx"))
    assert lint_graph(plain) == [] and lint_graph(trt) == []

    def rules(model, target="trt"):
        return {issue.rule for issue in lint_graph(model, target=target)}

    # conv_in (3 channels) stays INT8; feeding it FP8 codes is what TensorRT has no kernel for
    bad_conv = onnx.ModelProto()
    bad_conv.CopyFrom(plain)
    fp8_zp = next(
        n.input[2] for n in bad_conv.graph.node if n.name.startswith("down.0.") and n.op_type == "QuantizeLinear"
    )
    for node in bad_conv.graph.node:
        if (
            node.name.startswith("conv_in/")
            and node.op_type in ("QuantizeLinear", "DequantizeLinear")
            and node.input[0] != "conv_in.weight"
            and len(node.input) > 2
            and node.input[0] not in {i.name for i in bad_conv.graph.initializer}
        ):
            node.input[2] = fp8_zp
    assert "fp8-conv" in rules(bad_conv)
    nonzero = onnx.ModelProto()
    nonzero.CopyFrom(plain)
    zp = next(i for i in nonzero.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN)
    zp.CopyFrom(helper.make_tensor(zp.name, onnx.TensorProto.FLOAT8E4M3FN, [], [1.0]))
    assert "zero-point" in rules(nonzero)
    old = onnx.ModelProto()
    old.CopyFrom(plain)
    old.opset_import[0].version = 17
    assert "opset" in rules(old)
    assert "nvfp4" in rules(_mutate(trt, "TRT_FP4DynamicQuantize", block_size=32))
    assert "nvfp4" in rules(_mutate(trt, "TRT_FP4DynamicQuantize", scale_type=onnx.TensorProto.FLOAT))
    assert "forbidden-op" in rules(trt, target="ort-cpu")


def test_float_format_calibration_and_export_errors(tmp_path, tiny_config, tiny_checkpoint, tiny_model):
    """Scales are stored in each layer's format (FP8: absmax / 448), checked on load, and the
    settings that cannot hold are refused with the option that fixes them."""
    cfg = load_config(tiny_config)
    sampler, common = make_sampler(cfg, steps=4), {"cali_st": 2, "cali_n": 2, "batch_size": 2}
    fp8 = calibrate(
        cfg,
        tiny_checkpoint,
        tmp_path / "fp8.safetensors",
        sampler,
        CalibrationOptions(act_format="fp8", **common),
        progress=False,
    )
    int8 = calibrate(
        cfg, tiny_checkpoint, tmp_path / "int8.safetensors", sampler, CalibrationOptions(**common), progress=False
    )
    loaded = load_calibration(tmp_path / "fp8.safetensors")
    assert loaded.meta["act_format"] == "fp8" and loaded.layers["conv_in"].act_format == "int"
    layer = "down.0.block.0.conv1"
    assert loaded.layers[layer].act_format == "fp8"
    assert fp8.layers[layer].act[0] * 448 == pytest.approx(int8.layers[layer].act[0] * 127, rel=1e-6)
    with pytest.raises(ArtifactError, match=r"--act-format int \(file: fp8\)"):
        load_reference(
            tiny_config, tiny_checkpoint, QuantConfig(8, 8, act_scales="static"), tmp_path / "fp8.safetensors"
        )
    with pytest.raises(ConfigError, match="method mse"):
        CalibrationOptions(act_bits=4, act_format="nvfp4", method="mse")
    _, float_model, every = load_reference(
        tiny_config, tiny_checkpoint, QuantConfig(8, 8, act_format="fp8", format_layers="all")
    )
    with pytest.raises(ConfigError, match="format_layers='all'"):
        export_model(float_model, every, load_config(tiny_config), tmp_path / "all")
